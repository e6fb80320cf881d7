"""The comparison picture of a search: its metric against each searched parameter, one panel each.

Numbers go on a (log, when the values span decades) axis, anything else on categories with a
little jitter; pruned points are hollow. The PNG goes under $RUNYARD_HOME/searches/<name>/ and,
unless told not to, into a W&B run of the search's group (offline without an API key).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import redis

from trainer.paths import runyard_home
from worker.results import get_search, leaderboard

ALL_POINTS = 100_000
LOG_SPAN = 20.0  # max/min above this draws the axis in log scale


class NothingToPlot(ValueError):
    """The search is unknown or has no finished point yet."""


def comparison_rows(connection: redis.Redis, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The search's definition and its finished points (k-fold sets as their aggregate)."""
    definition = get_search(connection, name)
    if definition is None:
        raise NothingToPlot(f"no search named {name!r}: `schedule-search FILE` publishes one")
    rows = [row for row in leaderboard(connection, limit=ALL_POINTS, search=name) if row.get("metric")]
    if not rows:
        raise NothingToPlot(f"search {name!r} has no finished point yet: see `runyard status --search {name}`")
    return definition, rows


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)


def render(definition: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> Path:
    """Draw metric vs each searched parameter into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker or over ssh
    import matplotlib.pyplot as plt

    metric = definition["metric"]["name"]
    parameters = list(definition.get("parameters") or {}) or sorted({key for row in rows for key in row["params"]})
    columns = min(3, len(parameters))
    lines = math.ceil(len(parameters) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    jitter = random.Random(0)
    for axis, parameter in zip(axes.flat, parameters, strict=False):
        xs = [row["params"].get(parameter) for row in rows]
        ys = [row["metric"]["best"] for row in rows]
        pruned = [row.get("status") in ("pruned", "paused") for row in rows]
        sizes = [36 * (1 + (row.get("asha") or {}).get("rung", 0)) for row in rows]  # ASHA: bigger = deeper rung
        if _numeric(xs):
            positive = [x for x in xs if x > 0]
            if len(positive) == len(xs) and max(xs) / min(xs) > LOG_SPAN:
                axis.set_xscale("log")
        else:
            declared = (definition.get("parameters") or {}).get(parameter, {}).get("values") or []
            labels = list(dict.fromkeys([str(value) for value in declared] + [str(x) for x in xs]))
            xs = [labels.index(str(x)) + jitter.uniform(-0.12, 0.12) for x in xs]
            axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            axis.set_xlim(-0.5, len(labels) - 0.5)
        for x, y, hollow, size in zip(xs, ys, pruned, sizes, strict=True):
            axis.scatter([x], [y], s=size, facecolors="none" if hollow else "tab:blue", edgecolors="tab:blue")
        axis.set_xlabel(parameter)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(parameters) :]:
        axis.set_visible(False)
    hollow = "hollow = paused, size = rung reached" if any(row.get("asha") for row in rows) else "hollow = pruned"
    figure.suptitle(f"{definition['name']}: {metric} ({definition['method']}, {len(rows)} points; {hollow})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_to_wandb(definition: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """The picture and a table of the points in one W&B run of the search's group."""
    from trainer.tracking import WandbTracker

    project = next((row["wandb"].get("project") for row in rows if isinstance(row.get("wandb"), dict)), None)
    name = definition["name"]
    tracker = WandbTracker(
        f"{name}-comparison", path.parent, definition, project=project, group=name, job_type="compare"
    )
    try:
        if tracker.active:
            import wandb

            metric = definition["metric"]["name"]
            parameters = list(definition.get("parameters") or {})
            table = wandb.Table(columns=["run", "status", metric, *parameters])
            for row in rows:
                values = [row["params"].get(parameter) for parameter in parameters]
                table.add_data(row["run_name"], row.get("status"), row["metric"]["best"], *[str(v) for v in values])
            # The step grows with the finished points, so a later picture of the same search is kept too.
            tracker.log({"comparison": wandb.Image(str(path)), "points": table}, step=len(rows))
        return tracker.describe()
    finally:
        tracker.finish()


def compare_search(
    connection: redis.Redis, name: str, output: Path | None = None, log_wandb: bool = True
) -> dict[str, Any]:
    """Render the search's comparison picture (and log it to W&B); say where it went."""
    definition, rows = comparison_rows(connection, name)
    path = output or runyard_home() / "searches" / name / "comparison.png"
    render(definition, rows, path)
    written: dict[str, Any] = {"search": name, "png": str(path), "points": len(rows)}
    if log_wandb:
        written["wandb"] = log_to_wandb(definition, rows, path)
    return written

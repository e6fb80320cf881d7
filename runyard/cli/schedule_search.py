"""`schedule-search FILE` (also `runyard schedule-search`) and `runyard compare NAME`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from publisher.queue import publish_context
from runyard.cli.common import CONTEXT, connect_or_fail, console, fail, parse_duration
from runyard.cli.publish import enqueue_options
from schedule_search.config import SearchError
from schedule_search.publish import PublishReport, SearchConflict, outcome_kind, publish_search
from schedule_search.search import Search, load_search
from worker.connection import RedisUnavailable, connect
from worker.quotas import QuotaError

SHOWN_POINTS = 50
OUTCOME_LABELS = {
    "new": "new",
    "retried": "failed before: runs again",
    "finished": "done",
    "running": "running",
    "queued": "queued",
}


@click.command("schedule-search", context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the points and which are new or done; enqueue nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@enqueue_options("each point's job")
@click.option(
    "--owner",
    metavar="USER",
    help="Who the search's jobs belong to for fair share and quotas [RUNYARD_USER, else you].",
)
def schedule_search_command(
    file: Path, dry_run: bool, as_json: bool, retries: int, timeout: str, max_requeues: int, owner: str | None
) -> None:
    """Publish a grid, random or bayes search from a W&B-sweep YAML file; each point runs once.

    Every point is validated before anything is enqueued. Publishing the same file again
    enqueues only the points that are missing or failed: finished, queued and running points
    are skipped and reported, and two people publishing at once never double a point.

    \b
    A search file:
      name: b2-losses
      method: grid                      # grid | random | bayes
      metric: {name: val_f1, goal: maximize}
      early_terminate: {type: hyperband, min_iter: 2, eta: 3}   # or asha: pause + promote
      base: base-spec.yaml              # or fixed: {epochs: 30, ...}
      parameters:
        model: {values: [efficientnet_b2, resnet50]}
        loss: {values: [f1, focal, label_smoothing]}
        lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}   # random / bayes
    \b
    Examples:
      schedule-search grid.yaml --dry-run
      schedule-search grid.yaml
      runyard status --search b2-losses
      runyard leaderboard --search b2-losses
    """
    timeout_s = parse_duration(timeout)
    try:
        search = load_search(file)
    except SearchError as error:
        fail(f"invalid search, nothing enqueued:\n{error}")
    for warning in search.warnings:
        click.echo(f"warning: {warning}", err=True)
    _warn_missing_data(search)
    if dry_run:
        report = _dry_run_report(search)
        _print_dry_run(search, report, as_json)
        return
    connection = connect_or_fail()
    try:
        context = publish_context(owner) if owner else None  # None: publish_search's own (RUNYARD_USER)
        report = publish_search(
            connection, search, retries=retries, timeout_s=timeout_s, max_requeues=max_requeues, context=context
        )
    except SearchConflict as error:
        fail(f"nothing enqueued: {error}")
    except QuotaError as error:  # --owner or RUNYARD_USER names the owner of the search's jobs
        fail(f"--owner / RUNYARD_USER: {error}; nothing enqueued")
    if as_json:
        click.echo(json.dumps(_report_json(search, report), indent=2))
        return
    counts = report.counts()
    skipped = {kind: counts.get(kind, 0) for kind in ("finished", "running", "queued") if counts.get(kind)}
    click.echo(f"search {search.name}: {search.method}, {len(search.points)} points")
    retried = f", {counts['retried']} that failed before" if counts.get("retried") else ""
    click.echo(f"  enqueued {report.enqueued} ({counts.get('new', 0)} new{retried})")
    if skipped:
        click.echo("  skipped " + ", ".join(f"{count} {kind}" for kind, count in skipped.items()))
    queues = sorted({job["queue"] for job in report.jobs})
    if queues:
        click.echo(f"  on queue {', '.join(repr(name) for name in queues)}")
    click.echo(f"  follow it with `runyard status --search {search.name}`")
    click.echo(f"  results in `runyard leaderboard --search {search.name}`")


def _warn_missing_data(search: Search) -> None:
    for data_dir in sorted(search.points.data_dirs):
        if not Path(data_dir).expanduser().exists():
            click.echo(
                f"warning: data_dir {data_dir} does not exist on this box; the workers must see it there", err=True
            )


def _dry_run_report(search: Search) -> PublishReport | None:
    """What publishing would do, asked of the Redis that publishing would use.

    Without REDIS_URL that is the embedded server, started if need be (as `publish` does), so
    a first dry run says "new" for every point instead of "cannot tell".
    """
    try:
        connection = connect()
    except RedisUnavailable as error:
        click.echo(f"warning: cannot tell which points are done ({error})", err=True)
        return None
    return publish_search(connection, search, dry_run=True)


def _point_rows(search: Search, report: PublishReport | None) -> list[dict[str, Any]]:
    rows = []
    for point in search.points:
        outcome = report.outcomes.get(point.id) if report else None
        rows.append(
            {
                "index": point.index,
                "point": point.id,
                "kind": point.kind,
                "run_name": point.run_name,
                "params": point.params,
                "status": outcome_kind(outcome) if outcome else "unknown",
            }
        )
    return rows


def _print_dry_run(search: Search, report: PublishReport | None, as_json: bool) -> None:
    rows = _point_rows(search, report)
    new = sum(1 for row in rows if row["status"] in ("new", "retried"))
    if as_json:
        payload = {"dry_run": True, "search": search.name, "method": search.method, "points": rows}
        payload |= {"new": new if report else None, "done": sum(row["status"] == "finished" for row in rows)}
        click.echo(json.dumps(payload, indent=2, default=str))
        return
    out = console()
    table = Table(title=f"search {search.name} ({search.method}): {len(rows)} points")
    parameters = list(search.parameters)
    for column in ("#", "kind", "point", "status", *parameters):
        table.add_column(column, justify="right" if column == "#" else "left")
    for row in rows[:SHOWN_POINTS]:
        params = [_short(row["params"].get(name, "sampled" if row["kind"] == "trial" else "")) for name in parameters]
        table.add_row(str(row["index"]), row["kind"], row["point"], OUTCOME_LABELS.get(row["status"], "?"), *params)
    out.print(table)
    if len(rows) > SHOWN_POINTS:
        click.echo(f"... and {len(rows) - SHOWN_POINTS} more points (--json lists them all)")
    if report:
        done = sum(row["status"] == "finished" for row in rows)
        click.echo(f"{new} would be enqueued, {done} already done, {len(rows) - new - done} queued or running")
    click.echo("dry run: nothing enqueued", err=True)


def _report_json(search: Search, report: PublishReport) -> dict[str, Any]:
    return {
        "search": search.name,
        "method": search.method,
        "points": len(search.points),
        "enqueued": report.enqueued,
        "counts": report.counts(),
        "jobs": report.jobs,
        "warnings": search.warnings,
    }


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@click.command("compare", context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG to write.  [default: in $RUNYARD_HOME/searches]",
)
@click.option("--wandb/--no-wandb", "log_wandb", default=True, show_default=True, help="Also log the picture to W&B.")
@click.option("--json", "as_json", is_flag=True, help="Print where it went as JSON.")
def compare_command(name: str, output: Path | None, log_wandb: bool, as_json: bool) -> None:
    """Draw a search's metric against each searched parameter (PNG, and W&B).

    One panel per parameter, one dot per finished point (hollow: pruned), so the good region of
    each parameter is visible at a glance.
    """
    from schedule_search.plot import NothingToPlot, compare_search

    connection = connect_or_fail()
    try:
        written = compare_search(connection, name, output, log_wandb=log_wandb)
    except NothingToPlot as error:
        fail(str(error))
    if as_json:
        click.echo(json.dumps(written, indent=2))
    else:
        click.echo(f"wrote {written['png']} ({written['points']} points)")
        if written.get("wandb", {}).get("sync"):
            click.echo(f"  W&B (offline): upload with `{written['wandb']['sync']}`")

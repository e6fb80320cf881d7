"""`schedule-search FILE` (also `runyard schedule-search`) and `runyard compare NAME`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click
import redis
from rich.table import Table

from publisher.queue import publish_context
from runyard.cli.common import CONTEXT, connect_or_fail, console, fail, parse_duration
from runyard.cli.publish import enqueue_options
from schedule_search.config import SearchError
from schedule_search.points import Point
from schedule_search.publish import SearchConflict, outcome_kind, publish_search
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
        _print_dry_run(search, as_json)
        return
    connection = connect_or_fail()
    # --json: each enqueued job is printed as it is enqueued, never all held (a search can be 100,000 points).
    stream = JsonStream({"search": search.name, "method": search.method}, "jobs") if as_json else None
    try:
        context = publish_context(owner) if owner else None  # None: publish_search's own (RUNYARD_USER)
        report = publish_search(
            connection,
            search,
            retries=retries,
            timeout_s=timeout_s,
            max_requeues=max_requeues,
            context=context,
            on_job=stream.item if stream else None,
        )
    # Both come before the first claim: nothing is enqueued, nothing printed on stdout yet.
    except SearchConflict as error:
        fail(f"nothing enqueued: {error}")
    except QuotaError as error:  # --owner or RUNYARD_USER names the owner of the search's jobs
        fail(f"--owner / RUNYARD_USER: {error}; nothing enqueued")
    except BaseException as error:
        _close_on_error(stream, error)
        raise
    if stream:
        stream.close(
            {
                "points": len(search.points),
                "enqueued": report.enqueued,
                "counts": report.counts(),
                "warnings": search.warnings,
            }
        )
        return
    counts = report.counts()
    skipped = {kind: counts.get(kind, 0) for kind in ("finished", "running", "queued") if counts.get(kind)}
    click.echo(f"search {search.name}: {search.method}, {len(search.points)} points")
    retried = f", {counts['retried']} that failed before" if counts.get("retried") else ""
    click.echo(f"  enqueued {report.enqueued} ({counts.get('new', 0)} new{retried})")
    if skipped:
        click.echo("  skipped " + ", ".join(f"{count} {kind}" for kind, count in skipped.items()))
    if report.queues:
        click.echo(f"  on queue {', '.join(repr(name) for name in sorted(report.queues))}")
    click.echo(f"  follow it with `runyard status --search {search.name}`")
    click.echo(f"  results in `runyard leaderboard --search {search.name}`")


def _warn_missing_data(search: Search) -> None:
    for data_dir in sorted(search.points.data_dirs):
        if not Path(data_dir).expanduser().exists():
            click.echo(
                f"warning: data_dir {data_dir} does not exist on this box; the workers must see it there", err=True
            )


class JsonStream:
    """One JSON object printed as it is made: fixed keys, then a list item by item, then the rest.

    The printed document is what json.dumps(..., indent=2) of the whole would be, but for its
    list's items on one line each: `json.loads` of the output gives the same object.
    """

    def __init__(self, head: dict[str, Any], key: str) -> None:
        self.head, self.key, self.items, self.started = head, key, 0, False

    def item(self, value: Any) -> None:
        self._start()
        click.echo(("," if self.items else "") + "\n    " + json.dumps(value, default=str), nl=False)
        self.items += 1

    def close(self, tail: dict[str, Any]) -> None:
        self._start()
        fields = "".join(f",\n  {json.dumps(name)}: {_indented(value)}" for name, value in tail.items())
        click.echo(("\n  " if self.items else "") + "]" + fields + "\n}")

    def _start(self) -> None:
        if not self.started:
            self.started = True
            fields = "".join(f"  {json.dumps(name)}: {_indented(value)},\n" for name, value in self.head.items())
            click.echo("{\n" + fields + f"  {json.dumps(self.key)}: [", nl=False)


def _indented(value: Any) -> str:
    """`value` as json.dumps(indent=2) writes it one level down."""
    return json.dumps(value, indent=2, default=str).replace("\n", "\n  ")


def _close_on_error(stream: JsonStream | None, error: BaseException) -> None:
    """A --json document already begun ends valid, saying publishing stopped (the jobs listed are enqueued)."""
    if stream is not None and stream.started:
        stream.close({"error": str(error) or type(error).__name__})


def _dry_run_connection() -> redis.Redis | None:
    """The Redis that publishing would use, to tell which points are done.

    Without REDIS_URL that is the embedded server, started if need be (as `publish` does), so
    a first dry run says "new" for every point instead of "cannot tell".
    """
    try:
        return connect()
    except RedisUnavailable as error:
        click.echo(f"warning: cannot tell which points are done ({error})", err=True)
        return None


def _point_row(point: Point, outcome: str | None) -> dict[str, Any]:
    return {
        "index": point.index,
        "point": point.id,
        "kind": point.kind,
        "run_name": point.run_name,
        "params": point.params,
        "status": outcome_kind(outcome) if outcome else "unknown",
    }


def _print_dry_run(search: Search, as_json: bool) -> None:
    """Each point and what publishing would do with it: a table of the first SHOWN_POINTS, or --json of all."""
    connection = _dry_run_connection()
    stream = (
        JsonStream({"dry_run": True, "search": search.name, "method": search.method}, "points") if as_json else None
    )
    shown: list[dict[str, Any]] = []
    statuses: Counter[str] = Counter()

    def take(point: Point, outcome: str | None) -> None:
        row = _point_row(point, outcome)
        statuses[row["status"]] += 1
        if stream:
            stream.item(row)
        elif len(shown) < SHOWN_POINTS:
            shown.append(row)

    if connection is None:
        for point in search.points:
            take(point, None)
    else:
        publish_search(connection, search, dry_run=True, on_point=take)
    new, done = statuses["new"] + statuses["retried"], statuses["finished"]
    if stream:
        stream.close({"new": new if connection else None, "done": done})
        return
    total = statuses.total()
    out = console()
    table = Table(title=f"search {search.name} ({search.method}): {total} points")
    parameters = list(search.parameters)
    for column in ("#", "kind", "point", "status", *parameters):
        table.add_column(column, justify="right" if column == "#" else "left")
    for row in shown:
        params = [_short(row["params"].get(name, "sampled" if row["kind"] == "trial" else "")) for name in parameters]
        table.add_row(str(row["index"]), row["kind"], row["point"], OUTCOME_LABELS.get(row["status"], "?"), *params)
    out.print(table)
    if total > SHOWN_POINTS:
        click.echo(f"... and {total - SHOWN_POINTS} more points (--json lists them all)")
    if connection:
        click.echo(f"{new} would be enqueued, {done} already done, {total - new - done} queued or running")
    click.echo("dry run: nothing enqueued", err=True)


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

"""`runyard runs`, `runyard pull` and `runyard gc`: the runs in the run store (RUNYARD_STORE)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import click
from rich.table import Table

from runyard.cli.common import CONTEXT, console, fail
from trainer.paths import runs_root
from trainer.store import StoreError, display_url, open_store


def _store():
    try:
        return open_store()
    except StoreError as error:
        fail(str(error), code=1)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@click.command("runs", context_settings=CONTEXT)
@click.option("--search", metavar="NAME", help="Only the runs of this search.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
def runs_command(search, as_json):
    """The runs in the store: name, status, best val F1, size and the box that last wrote each.

    The store is RUNYARD_STORE (a shared path or s3://BUCKET/PREFIX), else $RUNYARD_HOME/runs.
    """
    store = _store()
    rows = []
    try:
        for name in store.run_names():
            run = store.describe(name)
            if run is None or (search and run.get("search") != search):
                continue
            best = run.get("best") or {}
            rows.append(
                {
                    "run_name": name,
                    "status": run.get("status", "unknown"),
                    "best_val_f1": best.get("val_f1"),
                    "best_epoch": best.get("epoch"),
                    "epoch": run.get("epoch"),
                    "size": store.run_size(name),
                    "box": run.get("box"),
                    "search": run.get("search"),
                    "store": store.run_url(name),
                }
            )
    except StoreError as error:
        fail(str(error), code=1)
    except Exception as error:
        from trainer.store import explain

        fail(explain(store.url, error), code=1)
    if as_json:
        click.echo(json.dumps({"store": display_url(store.url), "runs": rows}, indent=2))
        return
    table = Table(title=f"runs in {display_url(store.url)}")
    for column in ("run", "status", "best F1", "epoch", "size", "box"):
        table.add_column(column)
    for row in rows:
        f1 = f"{row['best_val_f1']:.4f} (epoch {row['best_epoch']})" if row["best_val_f1"] is not None else "-"
        table.add_row(
            row["run_name"], row["status"], f1, str(row["epoch"] or "-"), _megabytes(row["size"]), row["box"] or "-"
        )
    console().print(table)


@click.command("pull", context_settings=CONTEXT)
@click.argument("run")
@click.option(
    "--to",
    "destination",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to copy the run into.  [default: $RUNYARD_HOME/runs/RUN, the local cache]",
)
@click.option("--json", "as_json", is_flag=True, help="Print where the run is as JSON.")
def pull_command(run, destination, as_json):
    """Copy RUN from the store to this box (files already here with the right sha256 are kept)."""
    store = _store()
    target = destination or runs_root(None) / run
    try:
        if store.remote:
            store.pull(run, target)
        elif destination is None:
            if not (runs_root(None) / run).is_dir():
                fail(f"run {run}: no such run in {runs_root(None)} (see `runyard runs`)")
        else:
            source = Path(store.path(run))
            if not source.is_dir():
                fail(f"run {run}: no such run in {store.root} (see `runyard runs`)")
            shutil.copytree(source, target, dirs_exist_ok=True)
    except StoreError as error:
        fail(str(error), code=1)
    if as_json:
        click.echo(json.dumps({"run_name": run, "path": str(target), "store": store.run_url(run)}))
    else:
        click.echo(f"{run}: {target}")


@click.command("gc", context_settings=CONTEXT)
@click.option(
    "--keep-top",
    type=click.IntRange(0),
    metavar="N",
    help="Also drop best.pt of a search's finished runs outside its top N by best val F1.",
)
@click.option("--yes", is_flag=True, help="Delete. Without it, only print what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the deletions as JSON.")
def gc_command(keep_top, yes, as_json):
    """Free store space: drop last.pt/previous.pt of finished runs (their best.pt stays).

    Runs not finished keep everything (they may be resumed). Prints what it would delete
    unless --yes is given.
    """
    from trainer.retention import apply_deletions, plan_deletions

    store = _store()
    try:
        plan = plan_deletions(store, keep_top)
        if yes:
            apply_deletions(store, plan)
    except StoreError as error:
        fail(str(error), code=1)
    total = sum(deletion.size for deletion in plan)
    if as_json:
        click.echo(json.dumps({"deleted": yes, "bytes": total, "files": [asdict(item) for item in plan]}, indent=2))
        return
    verb = "deleted" if yes else "would delete"
    for deletion in plan:
        click.echo(f"{verb} {deletion.run_name}/{deletion.path} ({_megabytes(deletion.size)}): {deletion.reason}")
    click.echo(f"{verb} {len(plan)} file(s), {_megabytes(total)}" + ("" if yes else "; run with --yes to delete"))

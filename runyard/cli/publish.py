"""`publish`, `runyard status` and `runyard leaderboard`: the user's side of the queue.

Nothing here imports torch: `publish --help` stays fast and works on a box without it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import click
import yaml
from rich.table import Table

from contracts.job_meta import DEFAULT_MAX_REQUEUES
from contracts.spec import ExperimentSpec, SpecError, load_spec
from publisher.cancel import cancel_job, find_jobs
from publisher.options import given_options, merge, read_spec_file, spec_options
from publisher.queue import DEFAULT_RETRIES, JOB_TIMEOUT_S, publish_context, publish_experiment, rq_queue_name
from publisher.search_status import (
    DEFAULT_LIMIT,
    collect_search_status,
    search_leaderboard,
    search_leaderboard_table,
    search_status_table,
)
from publisher.sharing import preempted_table, print_owner_status, queued_table
from publisher.status import collect_status
from runyard.cli.common import CONTEXT, connect_or_fail, console, fail, parse_duration
from worker.fair_share import HOURLY_KEPT_H
from worker.quotas import QuotaError
from worker.results import get_search, leaderboard


def given_fields(config: str | None, parameters: dict[str, Any]) -> dict[str, Any]:
    """The spec fields the user gave: a --config file (if any) with the typed options on top."""
    base = read_spec_file(config) if config else {}
    return merge(base, given_options(parameters))


def build_spec(config: str | None, parameters: dict[str, Any]) -> ExperimentSpec:
    """The spec from a --config file (if any) with the typed options on top; SpecError if invalid."""
    return load_spec(given_fields(config, parameters))


def check_crop_here(spec: ExperimentSpec, data_here: bool) -> None:
    """Refuse a center_crop larger than the dataset's images where this box sees them; else warn."""
    crop = f"center_crop {spec.center_crop[0]}x{spec.center_crop[1]}"
    if not data_here or importlib.util.find_spec("PIL") is None:
        click.echo(
            f"warning: {crop} is not checked against the images here; the job fails if it does not fit", err=True
        )
        return
    from trainer.image_files import crop_problem, image_files

    problem = crop_problem(tuple(spec.center_crop), image_files(spec.data_dir))
    if problem:
        fail(f"invalid spec, nothing enqueued:\n{problem}")


def kfold_search_file(fields: dict[str, Any], k: int) -> str:
    """A search file that publishes `fields` as a k-fold set: k fold jobs and their aggregate."""
    fixed = {key: value for key, value in fields.items() if key not in ("kfold", "run_name")}
    document = {"method": "grid", "parameters": {"kfold.k": {"value": k}}}
    if fixed:
        document["fixed"] = fixed
    if fields.get("run_name"):
        document["name"] = fields["run_name"]
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None)


def enqueue_options(subject: str):
    """--retries, --timeout and --max-requeues, for every command that enqueues (publisher.queue.job_options)."""

    def add(command):
        for option in reversed(
            [
                click.option(
                    "--retries",
                    type=click.IntRange(0, 10),
                    default=DEFAULT_RETRIES,
                    show_default=True,
                    help="Retries after a crash.",
                ),
                click.option(
                    "--timeout", default="48h", show_default=True, help=f"Time limit of {subject} (3600, 90m, 48h, 2d)."
                ),
                click.option(
                    "--max-requeues",
                    type=click.IntRange(0, 100),
                    default=DEFAULT_MAX_REQUEUES,
                    show_default=True,
                    help=f"Times {subject} is requeued after its worker died before it fails as `crashed`.",
                ),
            ]
        ):
            command = option(command)
        return command

    return add


@click.command("publish", context_settings=CONTEXT)
@click.option("--config", "config", type=click.Path(dir_okay=False), help="YAML spec file used as the base.")
@click.option("--dry-run", is_flag=True, help="Validate and print the spec; enqueue nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@enqueue_options("the job")
@click.option(
    "--owner", metavar="USER", help="Who the job belongs to for fair share and quotas [RUNYARD_USER, else you]."
)
@click.option("--no-preempt", "no_preempt", is_flag=True, help="A `high` job may not stop this one to take its GPU.")
@spec_options
def publish_command(config, dry_run, as_json, retries, timeout, max_requeues, owner, no_preempt, **parameters):
    """Validate one experiment spec and put it on the Redis queue.

    Every spec field is an option; a --config YAML file gives the base and options override it.
    Redis is REDIS_URL if set (redis://, rediss://, unix://), else the embedded server.

    \b
    Examples:
      publish --model efficientnet_b2 --loss f1
      publish --config spec.yaml --lr 3e-4 --epochs 30 --dry-run
    """
    timeout_s = parse_duration(timeout) if timeout else JOB_TIMEOUT_S
    try:
        fields = given_fields(config, parameters)
        spec = load_spec(fields)
    except SpecError as error:
        fail(f"invalid spec, nothing enqueued:\n{error}")
    if spec.kfold.k > 1 and "fold" not in (fields.get("kfold") or {}):
        # One job would train fold 0 alone, with no aggregate: the set is schedule-search's to fan out.
        click.echo(
            f"error: kfold.k={spec.kfold.k} is a cross-validation of {spec.kfold.k} fold jobs and their aggregate, "
            "and publish queues one job; nothing enqueued.\n"
            "Save these lines as cv.yaml and run `schedule-search cv.yaml`:\n",
            err=True,
        )
        click.echo(kfold_search_file(fields, spec.kfold.k), err=True)
        fail(f"(or publish one fold on purpose with --kfold-fold 0..{spec.kfold.k - 1})")
    data_here = Path(spec.data_dir).expanduser().exists()
    if not data_here:
        click.echo(
            f"warning: data_dir {spec.data_dir} does not exist on this box; the workers must see it there",
            err=True,
        )
    if spec.center_crop:
        check_crop_here(spec, data_here)
    if dry_run:
        payload = spec.to_payload()
        if as_json:
            click.echo(json.dumps({"dry_run": True, "spec_hash": spec.spec_hash(), "spec": payload}, indent=2))
        else:
            click.echo(yaml.safe_dump(payload, sort_keys=False).rstrip())
            click.echo(f"# spec hash {spec.spec_hash()}; dry run: nothing enqueued", err=True)
        return
    try:
        context = publish_context(owner)
    except QuotaError as error:
        fail(f"--owner / RUNYARD_USER: {error}")
    connection = connect_or_fail()
    job = publish_experiment(
        connection,
        spec,
        context=context,
        retries=retries,
        timeout_s=timeout_s,
        max_requeues=max_requeues,
        preemptible=not no_preempt,
    )
    run_name = job.meta["run_name"]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "job_id": job.id,
                    "run_name": run_name,
                    "queue": job.origin,
                    "spec_hash": spec.spec_hash(),
                    "owner": job.meta["owner"],
                },
                indent=2,
            )
        )
    else:
        click.echo(f"published {run_name}")
        click.echo(f"  job {job.id} on queue '{rq_queue_name(spec)}' (spec {spec.spec_hash()})")
        click.echo("  follow it with `runyard status`; results in `runyard leaderboard`")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@click.command("status", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--search", "search", metavar="NAME", help="Only this search: each point's state, epoch and metric.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="With --search: points shown in detail (running, failed, missing first); 0: all. Counts cover all.",
)
@click.option("--owners", is_flag=True, help="Per owner: running, queued, GPU hours in the window, share, quota.")
@click.option(
    "--window",
    "window_h",
    type=click.FloatRange(min=0.01, max=HOURLY_KEPT_H),
    default=24,
    show_default=True,
    help=f"Hours for --owners (GPU hours are kept {HOURLY_KEPT_H} h).",
)
def status_command(as_json, search, limit, owners, window_h):
    """Queues, running and queued jobs (with why they wait), failed jobs with the reason, workers."""
    if search:
        _search_status(search, as_json, limit)
        return
    if owners:
        print_owner_status(connect_or_fail(), window_h * 3600, as_json, console())
        return
    status = collect_status(connect_or_fail())
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
        return
    out = console()
    queues = Table(title="queues")
    for column in ("queue", "queued", "running", "finished", "failed"):
        queues.add_column(column, justify="left" if column == "queue" else "right")
    for row in status["queues"]:
        if "error" in row:
            queues.add_row(row["name"], f"unreadable: {row['error']}", "-", "-", "-")
            continue
        queues.add_row(row["name"], str(row["queued"]), str(row["started"]), str(row["finished"]), str(row["failed"]))
    out.print(queues if status["queues"] else "no queues yet: publish something with `publish`")

    if status["running"]:
        running = Table(title="running")
        for column in ("run", "worker", "epoch", "val F1", "best F1", "ETA"):
            running.add_column(column)
        for row in status["running"]:
            epoch = f"{row['epoch'] or 0}/{row['epochs'] or '?'}"
            running.add_row(
                row["run_name"],
                row["worker"] or "-",
                epoch,
                _fmt(row["val_f1"]),
                _fmt(row["best_val_f1"]),
                _eta(row["eta_seconds"]),
            )
        out.print(running)
    if status["queued"]:
        out.print(queued_table(status["queued"]))
    if status["preempted"]:
        out.print(preempted_table(status["preempted"]))
    if status["failed"]:
        failed = Table(title="failed and cancelled")
        for column in ("run", "job", "reason", "error"):
            failed.add_column(column, overflow="fold")
        for row in status["failed"]:
            failed.add_row(row["run_name"] or "-", row["job_id"], row["failure_reason"] or "-", row["error"] or "-")
        out.print(failed)
    if status.get("quarantined"):
        quarantined = Table(title="quarantined: job records no worker can read (kept under runyard:refused:<job>)")
        for column in ("job", "queue", "reason"):
            quarantined.add_column(column, overflow="fold")
        for row in status["quarantined"]:
            quarantined.add_row(row["job_id"], row.get("queue") or "-", row["reason"])
        out.print(quarantined)
    if status.get("code_differs"):
        differs = Table(title="runs on other code than published (git)")
        for column in ("run", "worker", "code"):
            differs.add_column(column, overflow="fold")
        for row in status["code_differs"]:
            differs.add_row(row["run_name"] or "-", row["worker"] or "-", row["code"].get("reason", "-"))
        out.print(differs)
    if status.get("wandb_offline"):
        out.print("offline W&B runs; upload each with (on the worker's box, with WANDB_API_KEY set):")
        for row in status["wandb_offline"]:
            out.print(f"  {row['sync']}", soft_wrap=True)
    workers = Table(title="workers")
    for column in ("worker", "state", "queues", "job"):
        workers.add_column(column)
    for row in status["workers"]:
        workers.add_row(row["name"], row["state"], ",".join(row["queues"]), row["current_job"] or "-")
    out.print(
        workers if status["workers"] else "no workers running: start one with `worker --gpus 0` or `worker --cpu`"
    )


def _search_status(name: str, as_json: bool, limit: int) -> None:
    status = collect_search_status(connect_or_fail(), name, limit)
    if status is None:
        fail(f"no search named {name!r}: `schedule-search FILE` publishes one (its name is in the file or printed)")
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
    else:
        console().print(search_status_table(status))
        if status["shown"] < status["points"]:
            click.echo(f"showing {status['shown']} of {status['points']} points (--limit 0 shows all)")


def leaderboard_table(rows: list[dict[str, Any]], title: str = "leaderboard") -> Table:
    table = Table(title=title)
    for column in ("#", "run", "model", "loss", "best val F1", "acc", "epoch", "time"):
        table.add_column(column, justify="right" if column in ("#", "best val F1", "acc", "epoch") else "left")
    for rank, row in enumerate(rows, 1):
        best = row["best"]
        table.add_row(
            str(rank),
            row["run_name"],
            row.get("model", "-"),
            row.get("loss", "-"),
            _fmt(best.get("val_f1")),
            _fmt(best.get("val_acc"), 3),
            f"{best.get('epoch')}/{row.get('epochs_completed')}",
            _eta(row.get("durations", {}).get("total_s")),
        )
    return table


@click.command("leaderboard", context_settings=CONTEXT)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="Rows to show.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--search", "search", metavar="NAME", help="Only this search, best by its metric (k-fold: mean ± std).")
def leaderboard_command(limit, as_json, search):
    """Finished runs, best validation macro F1 first."""
    if search:
        connection = connect_or_fail()
        definition = get_search(connection, search)
        rows = search_leaderboard(connection, search, limit=limit)
        if definition is None and not rows:
            fail(f"no search named {search!r}: `schedule-search FILE` publishes one")
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            console().print(search_leaderboard_table(rows, search, definition) if rows else "no finished points yet")
        return
    rows = leaderboard(connect_or_fail(), limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo("no finished runs yet")
    else:
        console().print(leaderboard_table(rows))


@click.command("cancel", context_settings=CONTEXT)
@click.argument("jobs", nargs=-1, metavar="[JOB_ID|RUN_NAME]...")
@click.option("--search", default=None, metavar="NAME", help="Cancel every active job of this search.")
@click.option("--force", is_flag=True, help="Kill running jobs now (RQ's stop-job) instead of at the next step.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cancel_command(jobs, search, force, as_json):
    """Cancel queued or running experiments.

    Queued jobs are removed from their queue. A running job stops at its next step boundary
    (after the current optimizer step), keeps its checkpoint and ends as cancelled; --force
    kills its work horse at once instead.

    \b
    Examples:
      runyard cancel 2611271251_alice_efficientnet_b2_adam_f1_64_imgaug_30
      runyard cancel --search lr-sweep
    """
    if not jobs and not search:
        fail("name a job (its id or run name) or a search: runyard cancel JOB_ID|RUN_NAME | --search NAME")
    connection = connect_or_fail()
    matched = find_jobs(connection, list(jobs), search)
    if not matched:
        what = f"search {search!r}" if search else ", ".join(repr(name) for name in jobs)
        fail(f"no queued or running job matches {what}; `runyard status` lists them")
    found = {job.id for job in matched} | {job.meta.get("run_name") for job in matched}
    missing = [name for name in jobs if name not in found and not any(job.description == name for job in matched)]
    done = [cancel_job(connection, job, force=force) for job in matched]
    if as_json:
        click.echo(json.dumps({"cancelled": [item.to_dict() for item in done], "not_found": missing}, indent=2))
        return
    verbs = {
        "cancelled": "cancelled (it had not started)",
        "stopping": "stops at its next step boundary, checkpoint kept",
        "killed": "killed (--force)",
    }
    for item in done:
        click.echo(f"{item.run_name or item.job_id}: {verbs[item.action]}  [job {item.job_id}, was {item.was}]")
    for name in missing:
        click.echo(f"warning: no queued or running job matches {name!r}", err=True)

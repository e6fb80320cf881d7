"""`runyard demo`: the whole product on one laptop, in a few minutes, with no setup.

Embedded Redis, a generated dataset, two published experiments, a burst CPU worker running them
while this process shows their progress read back from Redis, then the leaderboard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rq.job import Job, JobStatus

from contracts.job_meta import read_job_meta
from contracts.spec import ExperimentSpec
from publisher.queue import publish_experiment
from runyard.cli.common import connect_or_fail, console
from runyard.cli.publish import leaderboard_table
from trainer.paths import runyard_home
from worker.results import get_run

DEMO_QUEUE = "demo"
DEMO_PROFILES = 180
DEMO_IMAGE_SIZE = (128, 96)

# Two experiments that differ in their loss; everything else is the demo's small-CPU recipe.
DEMO_VARIANTS = ({"loss": "cross_entropy"}, {"loss": "focal"})


def demo_specs(data_dir: Path, epochs: int) -> list[ExperimentSpec]:
    base = {
        "model": "test_efficientnet",
        "pretrained": False,
        "data_dir": str(data_dir / "train"),
        "resize": (64, 48),
        "epochs": epochs,
        "batch_size": 32,
        "valid_batch_size": 256,
        "lr": 3e-3,
        "scheduler": "cosine",
        "augmentation": "imgaug",
        "queue": DEMO_QUEUE,
        "wandb": {"group": "demo", "tags": ["demo"]},
    }
    return [ExperimentSpec(**(base | variant)) for variant in DEMO_VARIANTS]


def ensure_demo_data(data_dir: Path, console: Console) -> None:
    if (data_dir / "train" / "train.csv").exists():
        console.print(f"demo data: {data_dir} (already there)")
        return
    from trainer.demo_data import make_demo_dataset

    console.print(f"demo data: generating {DEMO_PROFILES} profiles into {data_dir} ...")
    counts = make_demo_dataset(data_dir, profiles=DEMO_PROFILES, image_size=DEMO_IMAGE_SIZE)
    console.print(f"demo data: {counts['train_images']} train images, {counts['eval_images']} eval images")


def watch(connection, jobs: list[Job], worker: subprocess.Popen, console: Console) -> None:
    """Progress bars fed by each job's meta in Redis, until the worker has finished."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[f1]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tasks = {job.id: progress.add_task(job.meta["run_name"], total=job.meta["epochs"], f1="queued") for job in jobs}
        while True:
            for job in jobs:
                job.refresh()
                report = job.meta.get("progress") or {}
                status = job.get_status()
                label = f"val F1 {report['val_f1']:.3f}" if report else status.value
                if status in (JobStatus.FAILED, JobStatus.STOPPED):
                    reason = read_job_meta(job.meta, job.id).failure_reason or "see runyard status"
                    label = f"[red]{status.value}: {reason}"
                progress.update(tasks[job.id], completed=report.get("epoch", 0), f1=label)
            if worker.poll() is not None:
                break
            time.sleep(0.5)


def run_demo(epochs: int, data_dir: Path | None, as_json: bool) -> dict[str, Any]:
    out = console(stderr=as_json)
    started = time.perf_counter()
    home = runyard_home()
    data_dir = Path(data_dir) if data_dir else home / "demo-data"
    ensure_demo_data(data_dir, out)
    connection = connect_or_fail()
    jobs = [publish_experiment(connection, spec, retries=0) for spec in demo_specs(data_dir, epochs)]
    for job in jobs:
        out.print(f"published {job.meta['run_name']} (job {job.id[:8]}) on queue '{DEMO_QUEUE}'")

    log_path = home / "logs" / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out.print(f"worker: one CPU worker in burst mode; its log is {log_path}")
    with open(log_path, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--cpu", "--burst", "--queues", DEMO_QUEUE],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        try:
            watch(connection, jobs, worker, out)
        except KeyboardInterrupt:
            worker.terminate()
            worker.wait()
            raise
    runs = [get_run(connection, job.meta["run_name"]) for job in jobs]
    finished = sorted((run for run in runs if run), key=lambda run: -run["best"]["val_f1"])
    summary = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "runs": finished,
        "failed": [job.meta["run_name"] for job, run in zip(jobs, runs, strict=True) if run is None],
        "best_val_f1": finished[0]["best"]["val_f1"] if finished else None,
    }
    if finished:
        out.print(leaderboard_table(finished, title="demo leaderboard"))
    for name in summary["failed"]:
        out.print(f"[red]{name} did not finish; see `runyard status` and {log_path}")
    if summary["failed"] and worker.returncode:
        why = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("worker: ")]
        summary["worker_error"] = why[-1] if why else f"the worker exited with status {worker.returncode}"
        out.print(f"[red]{escape(summary['worker_error'])}", soft_wrap=True)
    out.print(
        f"demo finished in {summary['wall_seconds']:.0f} s. Next: `runyard status`, `runyard leaderboard`, "
        f"the run dirs under {home / 'runs'}; `runyard redis stop` stops the embedded Redis."
    )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    if summary["failed"]:
        sys.exit(1)
    return summary


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--epochs", type=click.IntRange(1, 100), default=10, show_default=True, help="Epochs per experiment.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Demo dataset dir.  [default: $RUNYARD_HOME/demo-data]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def demo_command(epochs, data_dir, as_json):
    """Run the whole product locally: demo data, Redis, two experiments, a worker, the leaderboard.

    Uses REDIS_URL if set, else the embedded Redis under $RUNYARD_HOME (default ~/.runyard).
    """
    run_demo(epochs, data_dir, as_json)

"""`worker`: start one RQ worker process per GPU (or N on the CPU) and supervise them.

Each child gets CUDA_VISIBLE_DEVICES pinned to its GPU and a readable name (`host-gpu0`). The
children run in their own sessions, so Ctrl-C reaches only this parent, which passes it on:
the first Ctrl-C (or SIGTERM) lets running jobs finish, a second one stops them now.

Each child is `python -m worker.process` (worker.process.main): it runs RunyardWorkers
(worker.rq_worker) one after another while Redis comes and goes (worker.outage).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import click

from contracts.spec import current_host
from trainer.cores import core_share, default_loader_workers, default_torch_threads
from worker.code_version import CODE_DIR, FollowGitError, check_can_follow
from worker.connection import RedisUnavailable, connect
from worker.process import DEFAULT_QUEUES, process_command

log = logging.getLogger("runyard.worker")


def visible_gpu_count() -> int:
    """GPUs NVML can see (0 without nvidia-ml-py or a driver); never initialises CUDA."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def parse_gpus(value: str) -> list[str]:
    if value.strip().lower() == "all":
        count = visible_gpu_count()
        if count == 0:
            raise click.BadParameter("no GPU visible through NVML; use --cpu to train on the CPU", param_hint="--gpus")
        return [str(index) for index in range(count)]
    gpus = [part.strip() for part in value.split(",") if part.strip()]
    if not gpus or not all(gpu.isdigit() for gpu in gpus):
        raise click.BadParameter(
            f"{value!r} is not a comma list of GPU indices like 0,1,2,3 (or 'all')", param_hint="--gpus"
        )
    if len(set(gpus)) != len(gpus):
        raise click.BadParameter(f"{value!r} names a GPU twice", param_hint="--gpus")
    return gpus


def worker_slots(gpus: str | None, cpu: bool, workers: int, name: str) -> list[tuple[str, dict[str, str]]]:
    """(worker name, extra environment) for each worker process to start."""
    if gpus and cpu:
        raise click.UsageError("use either --gpus or --cpu, not both")
    if not cpu and gpus is None:
        detected = visible_gpu_count()
        if detected == 0:
            click.echo("worker: no GPU found, training on the CPU (pass --cpu to say so)", err=True)
            cpu = True
        else:
            gpus = ",".join(str(index) for index in range(detected))
    if cpu:
        # The share's cores go to DataLoader workers and torch threads, never more (trainer.cores).
        share = core_share(os.cpu_count() or 1, workers)
        threads = str(default_torch_threads(default_loader_workers("cpu", share), share))
        return [
            (
                f"{name}-cpu{index}",
                {
                    "CUDA_VISIBLE_DEVICES": "",
                    "OMP_NUM_THREADS": threads,
                    "RUNYARD_WORKERS_PER_BOX": str(workers),
                },
            )
            for index in range(workers)
        ]
    pinned = parse_gpus(gpus or "")
    return [
        (f"{name}-gpu{gpu}", {"CUDA_VISIBLE_DEVICES": gpu, "RUNYARD_WORKERS_PER_BOX": str(len(pinned))})
        for gpu in pinned
    ]


@click.command("worker", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--gpus",
    metavar="0,1,...|all",
    help="GPUs to use, one worker process each. Default: every GPU NVML sees.",
)
@click.option("--cpu", is_flag=True, help="Train on the CPU instead of GPUs.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="With --cpu: worker processes.",
)
@click.option(
    "--queues",
    default=DEFAULT_QUEUES,
    show_default=True,
    help="Queues to take jobs from, first has priority.",
)
@click.option("--burst", is_flag=True, help="Quit once the queues are empty (for scripts and CI).")
@click.option("--name", default=None, help="Worker name prefix.  [default: this host's name]")
@click.option("--max-jobs", type=click.IntRange(1), default=None, help="Quit each worker after this many jobs.")
@click.option(
    "--follow-git",
    is_flag=True,
    help="Before each job, fast-forward runyard's git checkout to its upstream and restart on the new code.",
)
@click.option(
    "--gpu-busy-above",
    type=click.FloatRange(0, 1),
    default=None,
    help="Wait while other processes hold more than this share of a GPU's memory.  [default: 0.25]",
)
def worker_command(gpus, cpu, workers, queues, burst, name, max_jobs, follow_git, gpu_busy_above):
    """Run training jobs from the Redis queue: one RQ worker per GPU.

    Redis is REDIS_URL if set, else the embedded server under $RUNYARD_HOME. W&B logs online
    when WANDB_API_KEY is set in this environment, offline otherwise.

    \b
    Examples:
      worker --gpus 0,1,2,3
      worker --cpu --burst          # run what is queued, then quit
      worker --gpus all --follow-git   # every job on the branch's latest commit
    """
    slots = worker_slots(gpus, cpu, workers, name or current_host())
    if gpu_busy_above is not None:
        slots = [(slot, env | {"RUNYARD_GPU_BUSY_FRACTION": str(gpu_busy_above)}) for slot, env in slots]
    if follow_git:
        try:
            upstream = check_can_follow(CODE_DIR)
        except FollowGitError as error:
            raise click.UsageError(f"--follow-git: {error}") from None
        click.echo(f"worker: following {upstream} in {CODE_DIR}", err=True)
    try:
        connect()  # fail here with one clear line, before starting children; starts the embedded server
    except RedisUnavailable as error:
        raise click.ClickException(str(error)) from None
    sys.exit(supervise(slots, queues, burst, max_jobs, follow_git))


def supervise(
    slots: list[tuple[str, dict[str, str]]],
    queues: str,
    burst: bool,
    max_jobs: int | None,
    follow_git: bool = False,
) -> int:
    """Start the worker processes, pass signals on, and wait; the exit code is the worst child's."""
    children: list[subprocess.Popen] = []
    for name, extra_env in slots:
        command = process_command("--name", name, "--queues", queues)
        if burst:
            command.append("--burst")
        if max_jobs:
            command += ["--max-jobs", str(max_jobs)]
        if follow_git:
            command.append("--follow-git")
        children.append(subprocess.Popen(command, env=os.environ | extra_env, start_new_session=True))
        click.echo(f"worker: started {name} (pid {children[-1].pid})", err=True)

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max((child.returncode or 0) for child in children)


@click.command("janitor", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--once", is_flag=True, help="Sweep once and exit (for cron or a script).")
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 3600),
    default=None,
    help="Seconds between sweeps.  [default: RUNYARD_JANITOR_INTERVAL or 10]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per requeued, failed or quarantined job.")
def janitor_command(once, interval, as_json):
    """Requeue jobs whose worker died: for a box that runs no worker.

    Every worker already runs this sweep in a thread; a job started by a runyard worker whose
    heartbeat has lapsed (kill -9, reboot, OOM killer) goes back to the front of its queue and
    resumes from its checkpoint. After its job's max_requeues crashes it fails as `crashed`.
    A job record that cannot be read is quarantined (see `runyard status`), never requeued.
    """
    from worker.janitor import Janitor

    try:
        connection = connect()
    except RedisUnavailable as error:
        raise click.ClickException(str(error)) from None
    janitor = Janitor(connection, f"{current_host()}-janitor")
    if interval is not None:
        janitor.interval = interval
    if not once and not as_json:
        click.echo(f"janitor: sweeping every {janitor.interval:g} s (Ctrl-C to stop)", err=True)
    try:
        while True:
            for outcome in janitor.sweep() if once or janitor.take_lease() else []:
                if as_json:
                    click.echo(json.dumps(outcome.to_dict()))
                elif outcome.action == "quarantined":
                    click.echo(f"quarantined job {outcome.job_id}: {outcome.reason}")
                else:
                    click.echo(
                        f"{outcome.action} {outcome.run_name or outcome.job_id} (job {outcome.job_id}, "
                        f"worker {outcome.worker}, crash {outcome.requeues})"
                    )
            if once:
                return
            time.sleep(janitor.next_wait())
    except KeyboardInterrupt:
        janitor.release_lease()
        click.echo("janitor: stopped", err=True)

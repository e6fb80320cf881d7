"""Chaos: M workers train N jobs while K random kill -9s take down busy workers and their horses.

Prints jobs lost, jobs completed twice, the longest time from a kill to its job's requeue, and
the epochs trained again per kill. Goals: 0, 0, <= 60 s, <= 1. The heartbeat and janitor run
with their defaults (15 s TTL, 10 s sweeps), as in production.

    python benchmarks/chaos.py --workers 3 --jobs 12 --kills 6

Everything is real: a redis-server with AOF, `python -m worker.process` workers (what `worker`
starts per GPU), timm's test_efficientnet trained on generated mask-status data, W&B offline.
A killed worker is replaced at once by a new one with a new name, as a rebooted box would be.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rq.job import Job, JobStatus  # noqa: E402
from rq.results import Result  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from benchmarks.servers import start_redis, start_worker_process, worker_env  # noqa: E402
from contracts.keys import heartbeat_key  # noqa: E402
from contracts.spec import load_spec  # noqa: E402
from publisher.queue import publish_experiment  # noqa: E402
from trainer.demo_data import make_demo_dataset  # noqa: E402

EPOCH_LINE = re.compile(r"^(\S+ \S+) INFO epoch (\d+)/(\d+) ")
ATTEMPT_LINE = re.compile(r"^(\S+ \S+) INFO run \S+: ")  # an attempt starts training (after its setup)


def start_worker(env: dict[str, str], name: str, logs: Path) -> subprocess.Popen:
    return start_worker_process(env, name, logs / f"{name}.log", mode="w")


def kill_9(worker: subprocess.Popen, horse_pid: int | None) -> None:
    """kill -9 the worker's process group and its work horse's (the horse calls setpgrp)."""
    for group in (worker.pid, horse_pid):
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    worker.wait()


def busy_workers(connection: redis.Redis, workers: dict[str, subprocess.Popen], epochs: int) -> list[tuple]:
    """(name, job id, horse pid, epoch) of workers training a job past its first epoch, not its last."""
    busy = []
    for name in workers:
        raw = connection.get(heartbeat_key(name))
        beat = json.loads(raw) if raw else {}
        if not beat.get("job_id") or not beat.get("horse_pid"):
            continue
        job = Job.fetch(beat["job_id"], connection=connection, serializer=JSONSerializer)
        epoch = (job.meta.get("progress") or {}).get("epoch") or 0
        if 1 <= epoch < epochs - 1:
            busy.append((name, job.id, beat["horse_pid"], epoch))
    return busy


def epoch_times(run_dir: Path) -> tuple[list[tuple[float, int]], list[float]]:
    """From the run's train.log: (unix time, epoch) of every epoch finished in any attempt, and the
    times attempts started training. Work since the later of the two is what a kill throws away."""
    epochs, starts = [], []
    log = run_dir / "train.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        if match := EPOCH_LINE.match(line):
            epochs.append((_unix(match.group(1)), int(match.group(2))))
        elif match := ATTEMPT_LINE.match(line):
            starts.append(_unix(match.group(1)))
    return epochs, starts


def _unix(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3, help="worker processes kept running (M)")
    parser.add_argument("--jobs", type=int, default=12, help="experiments to train (N)")
    parser.add_argument("--kills", type=int, default=6, help="kill -9s of busy workers (K)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per job")
    parser.add_argument("--image-size", default="64x64", help="training resolution (sets the epoch length)")
    parser.add_argument("--seed", type=int, default=0, help="random choice of victims and kill times")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    chooser = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="runyard-chaos-"))
    logs = work / "logs"
    logs.mkdir()
    server, url = start_redis(work, "--appendonly", "yes")
    connection = redis.Redis.from_url(url)
    env = worker_env(url, work / "home", RUNYARD_WORKERS_PER_BOX=str(args.workers))
    workers: dict[str, subprocess.Popen] = {}
    kills: list[dict] = []
    started = time.time()
    try:
        data = work / "data"
        make_demo_dataset(data, profiles=36, eval_profiles=6, image_size=(64, 48), seed=0)
        spec = {
            "model": "test_efficientnet",
            "pretrained": False,
            "data_dir": str(data / "train"),
            "resize": args.image_size,
            "epochs": args.epochs,
            "batch_size": 32,
            "augmentation": "base",
            "lr": 3e-3,
        }
        jobs = [publish_experiment(connection, load_spec(spec), context={}) for _ in range(args.jobs)]
        for index in range(args.workers):
            workers[f"chaos-{index}"] = start_worker(env, f"chaos-{index}", logs)
        print(
            f"chaos: {args.workers} workers, {args.jobs} jobs x {args.epochs} epochs, {args.kills} kill -9s", flush=True
        )

        next_kill = time.time() + chooser.uniform(5, 15)
        replacements = 0
        while time.time() - started < args.timeout:
            statuses = [job.get_status(refresh=True) for job in jobs]
            if all(status in (JobStatus.FINISHED, JobStatus.FAILED) for status in statuses):
                break
            if len(kills) < args.kills and time.time() >= next_kill:
                candidates = busy_workers(connection, workers, args.epochs)
                if candidates:
                    name, job_id, horse_pid, epoch = chooser.choice(candidates)
                    kill_9(workers.pop(name), horse_pid)
                    kills.append({"at": time.time(), "worker": name, "job_id": job_id, "epoch_done": epoch})
                    print(f"  {time.time() - started:6.1f} s  kill -9 {name} (job {job_id[:8]}, after epoch {epoch})")
                    replacements += 1
                    workers[f"chaos-r{replacements}"] = start_worker(env, f"chaos-r{replacements}", logs)
                    next_kill = time.time() + chooser.uniform(5, 15)
            time.sleep(0.2)
        wall = time.time() - started
        report = measure(connection, jobs, kills, args, wall)
    finally:
        for process in workers.values():
            kill_9(process, None)
        server.terminate()
        server.wait(30)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["goals_met"] else 1


def measure(connection: redis.Redis, jobs: list[Job], kills: list[dict], args, wall: float) -> dict:
    """The four figures, from Redis (statuses, RQ's result records, requeue logs) and the run dirs."""
    finished = twice = epochs_twice = 0
    for job in jobs:
        job.refresh()
        finished += job.get_status() == JobStatus.FINISHED
        twice += sum(result.type == Result.Type.SUCCESSFUL for result in job.results()) > 1
        if job.get_status() != JobStatus.FINISHED:
            continue
        result = job.return_value()
        times, starts = epoch_times(Path(result["run_dir"]))
        # A finished epoch logged twice was trained twice (its checkpoint was not resumed from).
        epochs_twice += len(times) - len({epoch for _when, epoch in times})
        for kill in (kill for kill in kills if kill["job_id"] == job.id):
            # The epoch in progress at the kill is trained again: count the part already trained.
            before = [when for when, _epoch in times if when <= kill["at"]] + [
                when for when in starts if when <= kill["at"]
            ]
            lost = kill["at"] - max(before) if before else result["durations"]["mean_epoch_s"]
            kill["partial_epoch"] = min(lost / result["durations"]["mean_epoch_s"], 1.0)
    requeue_seconds = []
    for kill in kills:
        job = next(job for job in jobs if job.id == kill["job_id"])
        log = [entry for entry in job.meta.get("requeue_log", []) if entry["worker"] == kill["worker"]]
        requeue_seconds.append(log[0]["at"] - kill["at"] if log else float("inf"))
    share = epochs_twice / len(kills) if kills else 0.0
    per_kill = [kill.get("partial_epoch", 1.0) + share for kill in kills]
    report = {
        "workers": args.workers,
        "jobs": args.jobs,
        "epochs": args.epochs,
        "kills": len(kills),
        "wall_seconds": round(wall, 1),
        "jobs_finished": finished,
        "jobs_lost": len(jobs) - finished,
        "jobs_completed_twice": twice,
        "max_seconds_to_requeue": round(max(requeue_seconds), 1) if kills else None,
        "mean_seconds_to_requeue": round(sum(requeue_seconds) / len(kills), 1) if kills else None,
        "finished_epochs_trained_twice": epochs_twice,
        "max_epochs_redone_per_kill": round(max(per_kill), 2) if kills else 0.0,
        "mean_epochs_redone_per_kill": round(sum(per_kill) / len(kills), 2) if kills else 0.0,
    }
    report["goals_met"] = (
        report["jobs_lost"] == 0
        and twice == 0
        and (report["max_seconds_to_requeue"] or 0) <= 60
        and report["max_epochs_redone_per_kill"] <= 1
        and len(kills) == args.kills
    )
    return report


def print_report(report: dict) -> None:
    rows = [
        ("jobs finished", f"{report['jobs_finished']}/{report['jobs']}"),
        ("jobs lost", report["jobs_lost"]),
        ("jobs completed twice", report["jobs_completed_twice"]),
        ("max seconds to requeue", f"{report['max_seconds_to_requeue']} (mean {report['mean_seconds_to_requeue']})"),
        (
            "epochs re-done per kill",
            f"max {report['max_epochs_redone_per_kill']}, mean {report['mean_epochs_redone_per_kill']} "
            f"(finished epochs trained twice: {report['finished_epochs_trained_twice']})",
        ),
        ("wall", f"{report['wall_seconds']} s"),
        ("goals (0, 0, <= 60 s, <= 1)", "met" if report["goals_met"] else "NOT met"),
    ]
    for label, value in rows:
        print(f"{label:>28}  {value}")


if __name__ == "__main__":
    sys.exit(main())

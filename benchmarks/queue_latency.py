"""Queue overhead: how long an idle worker takes to pick up a newly published experiment.

Starts a real redis-server and one real runyard worker process (`python -m worker.process`, what
`worker` starts per GPU), lets it go idle, then publishes tiny experiments one at a time with
`publisher.queue.publish_experiment` and measures, per job:
  - pick-up: RQ's enqueued_at -> started_at (both stamped by RQ: the publisher's enqueue and the
    worker's start of the job, before any training code runs);
  - seen started: from just before the publish call until a client polling Redis every 2 ms sees
    the job's status become started (an upper bound on pick-up, polling included);
  - first batch: from just before the publish call to the first line of the run's train.log
    (the trainer has built data, model and optimizer, and starts training).
Each job trains test_efficientnet for one epoch on a few generated images, then the worker is
left idle for --idle seconds (blocked on the queue, as a waiting worker is) before the next.

    python benchmarks/queue_latency.py --jobs 10 --json

Goal (issue 6): pick-up < 100 ms. The 1,000-point search publish figure is benchmarks/search.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rq.job import JobStatus  # noqa: E402

from benchmarks.servers import start_redis, start_worker_process, stop_processes, wait_until, worker_env  # noqa: E402
from contracts.spec import load_spec  # noqa: E402
from publisher.queue import publish_experiment  # noqa: E402
from trainer.demo_data import make_demo_dataset  # noqa: E402

GOAL_MS = 100


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# How often the figures are polled: finer than the pick-up times being measured.
POLL_S = 0.002


def worker_is_idle(connection: redis.Redis, name: str) -> bool:
    """The worker registered under `name` exists and is waiting for a job."""
    state = connection.hget(f"rq:worker:{name}", "state")
    return state is not None and state.decode() == "idle"


def first_log_line_time(train_log: Path) -> float | None:
    """Unix time of the first line of a run's train.log (its timestamp, to the millisecond)."""
    if not train_log.exists():
        return None
    first = train_log.read_text().split("\n", 1)[0]
    if len(first) < 23:
        return None
    return datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10, help="experiments published one after another")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds the worker waits idle before each")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="runyard-queue-latency-"))
    server, url = start_redis(work, "--save", "")
    connection = redis.Redis.from_url(url)
    env = worker_env(url, work / "home", WANDB_MODE="disabled")
    name = "latency-0"
    worker = start_worker_process(env, name, work / "worker.log", mode="w")
    rows = []
    try:
        data = work / "data"
        make_demo_dataset(data, profiles=12, eval_profiles=1, image_size=(64, 48), seed=0)
        spec = load_spec(
            {
                "model": "test_efficientnet",
                "pretrained": False,
                "data_dir": str(data / "train"),
                "resize": (32, 32),
                "epochs": 1,
                "batch_size": 32,
                "augmentation": "base",
                "pictures": False,
                "num_workers": 0,
            }
        )
        log(f"worker {name} starting (imports the trainer once) ...")
        wait_until(lambda: worker_is_idle(connection, name), 120, "the worker to register", interval=0.05)
        for index in range(args.jobs):
            time.sleep(args.idle)
            wait_until(lambda: worker_is_idle(connection, name), 60, "the worker to be idle", POLL_S)
            before = time.time()
            job = publish_experiment(connection, spec, context={})
            wait_until(lambda job=job: job.get_status(refresh=True) != JobStatus.QUEUED, 30, "the job to start", POLL_S)
            seen = time.time()
            wait_until(
                lambda job=job: job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED),
                300,
                "the job to end",
                0.05,
            )
            job.refresh()
            run_dir = Path(env["RUNYARD_HOME"]) / "runs" / job.kwargs["spec"]["run_name"]
            training = first_log_line_time(run_dir / "train.log")
            row = {
                "job": job.id,
                "status": job.get_status().value,
                "pickup_ms": (job.started_at - job.enqueued_at).total_seconds() * 1000,
                "seen_started_ms": (seen - before) * 1000,
                "training_starts_ms": (training - before) * 1000 if training else None,
            }
            rows.append(row)
            log(
                f"  job {index + 1}/{args.jobs}: pick-up {row['pickup_ms']:.1f} ms, seen started "
                f"{row['seen_started_ms']:.1f} ms, training starts "
                + (f"{row['training_starts_ms']:.0f} ms" if training else "(no train.log)")
            )
    finally:
        stop_processes(worker)
        stop_processes(server)

    pickups = [row["pickup_ms"] for row in rows]
    report = {
        "jobs": len(rows),
        "failed": sum(row["status"] != "finished" for row in rows),
        "pickup_ms": summary(pickups),
        "seen_started_ms": summary([row["seen_started_ms"] for row in rows]),
        "training_starts_ms": summary([row["training_starts_ms"] for row in rows if row["training_starts_ms"]]),
        "goal_ms": GOAL_MS,
        "goal_met": bool(pickups) and max(pickups) < GOAL_MS,
        "machine": {
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": [round(value, 1) for value in os.getloadavg()],
        },
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key in ("pickup_ms", "seen_started_ms", "training_starts_ms"):
            figures = report[key]
            print(f"{key:20s} median {figures['median']:8.1f}  p90 {figures['p90']:8.1f}  max {figures['max']:8.1f}")
        print(f"goal: every pick-up < {GOAL_MS} ms: {'met' if report['goal_met'] else 'MISSED'}")
    return 0 if report["goal_met"] and not report["failed"] else 1


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan")}
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 1),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
        "max": round(ordered[-1], 1),
    }


if __name__ == "__main__":
    sys.exit(main())

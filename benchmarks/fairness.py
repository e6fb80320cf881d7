"""Fairness: plain FIFO (RQ's dequeue, no preemption) beside fair share + preemption, same workload.

One owner (alice) floods the queue, two more (bob, carol) queue a few jobs a little later, and a
`high` job (dave) arrives while every worker is busy. Printed per mode: each owner's median wait,
each owner's share of the workers while all three had work queued, Jain's fairness index over
those shares (goal >= 0.95 with fair share), the `high` job's start latency (goal <= one epoch of
the preempted job + 2 s) and the work the preempted job re-did (goal <= one epoch).

    python benchmarks/fairness.py --workers 2 --flood 8 --later 3 --epochs 2

`--stop-points` compares instead where a preempted job stops (RUNYARD_PREEMPT_AT=step, epoch,
auto), side by side: one worker trains a 4-epoch `default` job with epochs of a few seconds, a
`high` job arrives halfway through its second epoch; printed per mode are the `high` job's start
latency, the victim's training thrown away (the partial epoch, re-done on resume), its set-up
(paid again on resume, on its own line) and its end-to-end time.

    python benchmarks/fairness.py --stop-points

Everything is real: a redis-server, `python -m worker.process` workers, timm's test_efficientnet
trained on generated data. The script samples every job's state every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rq.job import Job, JobStatus  # noqa: E402

from benchmarks.servers import start_redis, start_worker_process, stop_processes, worker_env  # noqa: E402
from contracts.spec import load_spec  # noqa: E402
from publisher.queue import publish_context, publish_experiment  # noqa: E402
from trainer.demo_data import make_demo_dataset  # noqa: E402
from worker.heartbeat import heartbeat_key  # noqa: E402
from worker.preemption import set_queue_preemption  # noqa: E402

SAMPLE_S = 0.2


def jain(shares: list[float]) -> float:
    """Jain's fairness index: 1 when every share is equal, 1/n when one takes everything."""
    total = sum(shares)
    squares = sum(share * share for share in shares)
    return total * total / (len(shares) * squares) if squares else 0.0


class Sampler:
    """Each job's first start, end, and which owners ran and had work queued at each sample."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection
        self.jobs: dict[str, Job] = {}
        self.published: dict[str, float] = {}
        self.first_start: dict[str, float] = {}
        self.samples: list[tuple[float, dict[str, int], set[str]]] = []  # (time, running per owner, owners queued)

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.published[job.id] = time.time()

    def sample(self) -> bool:
        """One look at every job; False once all have finished."""
        now = time.time()
        running: dict[str, int] = {}
        queued: set[str] = set()
        done = 0
        for job_id, job in self.jobs.items():
            status = job.get_status(refresh=True)
            owner = job.get_meta(refresh=True)["owner"]
            if status == JobStatus.STARTED:
                self.first_start.setdefault(job_id, now)
                running[owner] = running.get(owner, 0) + 1
            elif status == JobStatus.QUEUED:
                queued.add(owner)
            elif status in (JobStatus.FINISHED, JobStatus.FAILED):
                self.first_start.setdefault(job_id, now)
                done += 1
        self.samples.append((now, running, queued))
        return done < len(self.jobs)

    def run_until(self, predicate, limit_s: float) -> None:
        deadline = time.time() + limit_s
        while time.time() < deadline and not predicate():
            self.sample()
            time.sleep(SAMPLE_S)


def run_mode(mode: str, args: argparse.Namespace, work: Path, data: Path) -> dict:
    redis_process, url = start_redis(work, "--save", "")
    connection = redis.Redis.from_url(url)
    env = worker_env(url, work / "home", RUNYARD_SCHEDULING="fairshare" if mode == "fair share" else "fifo")
    if mode == "fifo":  # today's behaviour: a high job only jumps the queue
        for queue_name in ("default", "low"):
            set_queue_preemption(connection, queue_name, False)
    workers = []
    sampler = Sampler(connection)
    spec = load_spec(
        {
            "model": "test_efficientnet",
            "pretrained": False,
            "data_dir": str(data / "train"),
            "resize": "32x32",
            "epochs": args.epochs,
            "batch_size": 32,
            "lr": 3e-3,
        }
    )

    def publish(owner: str, **changes) -> Job:
        job = publish_experiment(connection, spec.model_copy(update=changes), context=publish_context(owner))
        sampler.add(job)
        return job

    try:
        for number in range(args.workers):
            workers.append(start_worker_process(env, f"bench-{number}", work / f"worker-{number}.log", mode="w"))
        deadline = time.time() + 120
        while not all(connection.exists(heartbeat_key(f"bench-{n}")) for n in range(args.workers)):
            if time.time() > deadline:
                raise RuntimeError("workers did not start")
            time.sleep(0.2)
        for _ in range(args.flood):
            publish("alice")
        sampler.run_until(lambda: len(sampler.first_start) >= args.workers, 120)
        for owner in ("bob", "carol"):
            for _ in range(args.later):
                publish(owner)
        # The high job once every worker is busy with a job past its first epoch.
        sampler.run_until(lambda: len(sampler.first_start) >= args.workers + 2, 300)
        high = publish("dave", priority="high", epochs=1)
        high_at = sampler.published[high.id]
        while sampler.sample():
            time.sleep(SAMPLE_S)
    finally:
        stop_processes(*workers)
        stop_processes(redis_process, timeout=10)

    owners = ("alice", "bob", "carol")
    waits = {owner: [] for owner in owners}
    for job_id, job in sampler.jobs.items():
        owner = job.meta["owner"]
        if owner in waits:
            waits[owner].append(sampler.first_start[job_id] - sampler.published[job_id])
    # Shares of the workers while alice, bob and carol all had work queued (sample-weighted).
    held = {owner: 0 for owner in owners}
    for _, running, queued in sampler.samples:
        if all(owner in queued for owner in owners):
            for owner in owners:
                held[owner] += running.get(owner, 0)
    total = sum(held.values())
    shares = [held[owner] / total if total else 0.0 for owner in owners]
    preempted = [job for job in sampler.jobs.values() if job.meta.get("preemptions")]
    entries = [entry for job in preempted for entry in job.meta["preemptions"]]
    redone = [entry.get("work_redone_s") for entry in entries]
    epoch_s = [
        (job.meta.get("progress") or {}).get("seconds") for job in sampler.jobs.values() if job.meta.get("progress")
    ]
    return {
        "mode": mode,
        "median_wait_s": {owner: round(statistics.median(values), 1) for owner, values in waits.items() if values},
        "shares_while_all_queued": dict(zip(owners, [round(share, 3) for share in shares], strict=True)),
        "jain": round(jain(shares), 3),
        "high_start_latency_s": round(sampler.first_start[high.id] - high_at, 1),
        "preemptions": len(redone),
        # Of the high job's latency: until a Preemptor asked, then until the victim had stopped.
        "asked_after_s": [round(e["requested_at"] - high_at, 1) for job in preempted for e in job.meta["preemptions"]],
        # ... the victim read the request (seen), then was wound down (stopped); the high job's start follows.
        "seen_after_s": [
            round(e["seen_at"] - high_at, 1) for job in preempted for e in job.meta["preemptions"] if e.get("seen_at")
        ],
        "stopped_after_s": [round(e["at"] - high_at, 1) for job in preempted for e in job.meta["preemptions"]],
        "stop_at": [entry.get("stop_at") for entry in entries],
        "training_redone_s": [round(value, 1) for value in redone if value is not None],  # the partial epoch
        "setup_paid_again_s": [round(entry["setup_s"], 1) for entry in entries if entry.get("setup_s") is not None],
        "since_checkpoint_s": [round(entry["work_lost_s"], 1) for entry in entries if "work_lost_s" in entry],
        "median_epoch_s": round(statistics.median([s for s in epoch_s if s]), 1) if epoch_s else None,
        "jobs": len(sampler.jobs),
        "ran_twice_or_more": sum(1 for job in sampler.jobs.values() if int(job.meta.get("attempts", 1)) > 1),
    }


def run_stop_point(mode: str, args: argparse.Namespace, work: Path, data: Path) -> dict:
    """One worker, a `default` job preempted halfway through its second epoch, RUNYARD_PREEMPT_AT=mode."""
    redis_process, url = start_redis(work, "--save", "")
    connection = redis.Redis.from_url(url)
    env = worker_env(url, work / "home", RUNYARD_PREEMPT_AT=mode)
    sampler = Sampler(connection)
    spec = load_spec(
        {
            "model": "test_efficientnet",
            "pretrained": False,
            "data_dir": str(data / "train"),
            "resize": args.stop_resize,
            "epochs": 4,
            "batch_size": 32,
            "lr": 3e-3,
        }
    )
    worker = start_worker_process(env, "bench-0", work / "worker.log", mode="w")
    try:
        deadline = time.time() + 120
        while not connection.exists(heartbeat_key("bench-0")):
            if time.time() > deadline:
                raise RuntimeError("the worker did not start")
            time.sleep(0.2)
        victim = publish_experiment(connection, spec, context=publish_context("alice"))
        sampler.add(victim)
        sampler.run_until(lambda: victim.get_meta(refresh=True).get("checkpoint_at"), 300)
        epoch_s = victim.meta["progress"]["seconds"]
        time.sleep(max(0.0, 0.5 * epoch_s - (time.time() - victim.meta["checkpoint_at"])))  # mid-epoch 2
        high = publish_experiment(
            connection,
            spec.model_copy(update={"priority": "high", "epochs": 1}),
            context=publish_context("dave"),
        )
        sampler.add(high)
        while sampler.sample():
            time.sleep(SAMPLE_S)
        victim.refresh()
    finally:
        stop_processes(worker)
        stop_processes(redis_process, timeout=10)
    entries = victim.meta.get("preemptions") or []
    entry = entries[0] if entries else {}
    high_at = sampler.published[high.id]
    return {
        "mode": mode,
        "epoch_s": round(epoch_s, 1),
        "stop_at": entry.get("stop_at"),
        "high_start_latency_s": round(sampler.first_start[high.id] - high_at, 1),
        "victim_seen_after_s": round(entry["seen_at"] - high_at, 1) if entry.get("seen_at") else None,
        "victim_stopped_after_s": round(entry["at"] - high_at, 1) if entry else None,
        "training_redone_s": entry.get("work_redone_s"),
        "setup_paid_again_s": entry.get("setup_s"),
        "victim_end_to_end_s": round(victim.ended_at.timestamp() - victim.enqueued_at.timestamp(), 1),
        "preemptions": len(entries),
        "victim_epochs": [row["epoch"] for row in victim.meta.get("history") or []],
    }


def print_table(results: list[dict]) -> None:
    print(f"{'':28}" + "".join(f"{result['mode']:>24}" for result in results))
    for key in results[0]:
        if key == "mode":
            continue
        print(f"{key:28}" + "".join(f"{json.dumps(result[key]):>24}" for result in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flood", type=int, default=8, help="alice's jobs, queued first")
    parser.add_argument("--later", type=int, default=3, help="bob's and carol's jobs each, queued next")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--stop-points", action="store_true", help="compare RUNYARD_PREEMPT_AT=step|epoch|auto")
    parser.add_argument("--stop-resize", default="160x160", help="the victim's image size (its epoch length)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="runyard-fairness-") as tmp:
        work = Path(tmp)
        data = work / "data"
        make_demo_dataset(data, profiles=36, eval_profiles=6, image_size=(64, 48), seed=0)
        results = []
        if args.stop_points:
            for mode in ("step", "epoch", "auto"):
                (work / mode).mkdir()
                results.append(run_stop_point(mode, args, work / mode, data))
        else:
            for mode in ("fifo", "fair share"):
                (work / mode.replace(" ", "-")).mkdir()
                results.append(run_mode(mode, args, work / mode.replace(" ", "-"), data))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

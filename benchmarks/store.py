"""The run store's cost: epoch time with RUNYARD_STORE (a shared dir, S3) over epoch time without.

Trains efficientnet_b2 (pretrained: false) with Adam, whose checkpoint is about 110 MB (weights
plus two Adam moments), on generated mask-status data; each epoch's checkpoint (and, when the
validation F1 improved, best.pt) is uploaded by the run store's background thread while the next
epoch trains. Goal: ratio <= 1.03. The S3 store is moto's standalone server (the only S3 server
installable here) in its own process on 127.0.0.1, reached through s3fs.

    python benchmarks/store.py --epochs 4 --profiles 30 --resize 96x96
    python benchmarks/store.py --stores none,s3 --s3-url s3://team-runs/bench   # a real bucket

The first epoch (model warm-up, and no upload of its own to overlap) is left out of the mean.

`--failover` measures the other figure: from kill -9 on box A to box B training the resumed
epoch, S3 store (goal <= 60 s). Each repetition starts a private redis-server and two idle
`python -m worker.process` workers with their own RUNYARD_HOMEs (two boxes that share nothing
but Redis and the bucket on moto's server) and publishes a tiny job (test_efficientnet, 64 px);
whichever worker takes it is box A. Just after the store's manifest holds epoch 2, box A's worker
and its work horse's process groups are killed with SIGKILL. The heartbeat and janitor keep their
production defaults (15 s TTL, 10 s sweeps, the sweeper's lease of 25 s), so what is measured is
what a team would see. With `--kill-lease-holder`, box A starts alone, takes the job and the
sweeper's lease, and box B starts idle after it (the kill then follows the next checkpoint): box
B's janitor must wait for the dead box's lease to lapse, the worst case. From the kill it times:
box A's heartbeat gone, its lease gone, the janitor's requeue, box B's work horse starting the job
(RQ's started_at), box B starting to train the resumed epoch (its train.log's "resuming after
epoch N" line, logged once the checkpoint is fetched and restored and the W&B run is open, right
before the epoch loop) and that epoch's report; and it checks that the run resumed from the
epoch the store held at the kill (>= 2, not 0).

    python benchmarks/store.py --failover --repeat 3
    python benchmarks/store.py --failover --repeat 3 --kill-lease-holder
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import kill_worker, start_redis, start_worker_process  # noqa: E402
from contracts.spec import load_spec  # noqa: E402
from trainer.demo_data import make_demo_dataset  # noqa: E402
from trainer.train import train  # noqa: E402

MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """moto's S3 server in its own process (its CPU is not the trainer's), with bucket `bench`; yields its endpoint."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=MOTO_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=MOTO_KEYS["AWS_SECRET_ACCESS_KEY"],
            region_name=MOTO_KEYS["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket="bench")
        yield endpoint
    finally:
        process.kill()
        process.wait(10)


def epoch_seconds(spec: dict, home: Path, store_env: dict[str, str]) -> dict:
    """Train `spec` with these store variables; the epochs' seconds and the checkpoint's size."""
    saved = {key: os.environ.get(key) for key in ("RUNYARD_HOME", "RUNYARD_STORE", *MOTO_KEYS, "AWS_ENDPOINT_URL")}
    os.environ["RUNYARD_HOME"] = str(home)
    os.environ.pop("RUNYARD_STORE", None)
    os.environ.update(store_env)
    seconds = []
    try:
        started = time.perf_counter()
        result = train(load_spec(spec), on_epoch=lambda report: seconds.append(report.seconds))
        total = time.perf_counter() - started
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    checkpoint = Path(result["run_dir"]) / "checkpoints" / "last.pt"
    return {
        "epochs_s": [round(value, 2) for value in seconds],
        "mean_s": statistics.fmean(seconds[1:]),
        "total_s": round(total, 2),
        "checkpoint_mb": round(checkpoint.stat().st_size / 1e6, 1),
    }


# Failover: kill -9 on box A to box B training the resumed epoch -------------------------------

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (.*)$")
RESUMING = re.compile(r"run \S+: resuming after epoch (\d+) ")
EPOCH_REPORT = re.compile(r"epoch (\d+)/\d+ ")
ATTEMPT = re.compile(
    r"run \S+: \S+ \(\d+ parameters\) on "
)  # an attempt's set-up is done (logged on a fresh start too)


def log_events(path: Path, after: float) -> list[tuple[float, str]]:
    """(unix time, message) of the INFO lines of a train.log written after `after`."""
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if (match := LOG_TIME.match(line)) and (
            when := datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        ) >= after:
            events.append((when, match.group(2)))
    return events


def wait(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def failover_once(index: int, work: Path, endpoint: str, spec: dict, timeout: float, lease_holder_dies: bool) -> dict:
    """One kill -9 of the box training a job, timed until the other box trains the resumed epoch."""
    import redis

    from contracts.keys import JANITOR_LEASE_KEY, heartbeat_key
    from publisher.queue import publish_experiment
    from trainer.store import open_store

    folder = work / f"failover-{index}"
    folder.mkdir()
    server, url = start_redis(folder, "--appendonly", "yes")
    store_env = {"RUNYARD_STORE": f"s3://bench/failover-{index}", "AWS_ENDPOINT_URL": endpoint} | MOTO_KEYS
    base = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "RUNYARD_", "AWS_"))}
    base |= {"REDIS_URL": url, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)} | store_env
    os.environ.update(store_env)  # this process reads the store as the boxes do
    store = open_store()
    connection = redis.Redis.from_url(url)
    names = ("box-a", "box-b")
    workers: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        workers[name] = start_worker_process(
            base | {"RUNYARD_HOME": str(folder / name)}, name, folder / f"{name}.log", mode="w"
        )

    def worker_of_job() -> str | None:
        job.refresh()
        return job.worker_name if job.get_status() == "started" else None

    def stored_epoch() -> int:
        return (store.read_manifest(run_name) or {}).get("epoch", 0)

    try:
        # Either both boxes start idle and either takes the job (and either may hold the sweeper's
        # lease), or box A starts alone, takes the job and the lease, and box B starts idle after.
        for name in names[:1] if lease_holder_dies else names:
            start(name)
        wait(lambda: all(connection.exists(heartbeat_key(name)) for name in workers), 120, "the boxes to beat")
        job = publish_experiment(connection, load_spec(spec | {"run_name": f"failover-{index}"}), context={})
        run_name = job.kwargs["spec"]["run_name"]
        victim = wait(worker_of_job, 120, "a box to take the job")
        survivor = next(name for name in names if name != victim)
        if lease_holder_dies:
            wait(lambda: connection.get(JANITOR_LEASE_KEY) == victim.encode(), 60, "box A to hold the lease")
            start(survivor)
            wait(lambda: connection.exists(heartbeat_key(survivor)), 120, "box B to beat")
        # Kill just after an epoch's checkpoint is in the store (epoch 2 at the earliest).
        seen = stored_epoch()
        wait(lambda: stored_epoch() > max(seen, 1), 300, "the next epoch (>= 2) in the store")
        lease_holder = (connection.get(JANITOR_LEASE_KEY) or b"").decode()
        kill_worker(workers[victim].pid)
        killed = time.time()
        workers[victim].wait(10)
        at_kill = stored_epoch()  # what box B can resume from
        marks: dict[str, float] = {}
        train_log = folder / survivor / "runs" / run_name / "train.log"

        def observe() -> bool:
            now = time.time()
            if "heartbeat_gone" not in marks and not connection.exists(heartbeat_key(victim)):
                marks["heartbeat_gone"] = now
            if "lease_free" not in marks and (connection.get(JANITOR_LEASE_KEY) or b"").decode() != victim:
                marks["lease_free"] = now  # box A no longer holds the sweeper's lease (or never did)
            job.refresh()
            requeues = [entry for entry in job.meta.get("requeue_log", []) if entry["worker"] == victim]
            if requeues:
                marks.setdefault("requeued", requeues[0]["at"])
            if job.worker_name == survivor and job.started_at is not None:
                marks.setdefault("horse_started", job.started_at.timestamp())
            for when, message in log_events(train_log, killed):
                if match := RESUMING.match(message):
                    marks.setdefault("training_resumed_epoch", when)
                    marks.setdefault("resumed_from", int(match.group(1)))
                elif ATTEMPT.match(message) and job.meta.get("resumed_from_epoch") == 0:
                    marks.setdefault("training_resumed_epoch", when)  # started over: the failure shows below
                    marks.setdefault("resumed_from", 0)
                elif (match := EPOCH_REPORT.match(message)) and int(match.group(1)) == marks.get(
                    "resumed_from", -2
                ) + 1:
                    marks.setdefault("resumed_epoch_reported", when)
            return "resumed_epoch_reported" in marks

        wait(observe, timeout, "box B to report the resumed epoch", interval=0.05)
    finally:
        for process in workers.values():
            if process.poll() is None:  # box A is already reaped: its pid may be someone else's now
                kill_worker(process.pid)
                process.wait(10)
        server.kill()
        server.wait(10)
    seconds = {key: round(marks[key] - killed, 1) for key, _title in FAILOVER_COLUMNS}
    resumed_from = int(marks["resumed_from"])
    return {
        "killed_box_held_lease": lease_holder == victim,
        "epoch_in_store_at_kill": at_kill,
        "resumed_from_epoch": resumed_from,
        "meta_resumed_from_epoch": job.meta.get("resumed_from_epoch"),
        "resumed_correctly": resumed_from == at_kill >= 2 and job.meta.get("resumed_from_epoch") == resumed_from,
        "seconds_after_kill": seconds,
    }


def run_failover(args: argparse.Namespace) -> dict:
    """`--repeat` failovers on one moto server; the figures of each and the worst."""
    work = Path(tempfile.mkdtemp(prefix="runyard-failover-bench-"))
    make_demo_dataset(work / "data", profiles=args.profiles, eval_profiles=2, image_size=(64, 48), seed=0)
    spec = {
        "model": args.model,
        "pretrained": False,
        "data_dir": str(work / "data" / "train"),
        "resize": args.resize,
        "epochs": args.epochs,
        "batch_size": 32,
        "valid_batch_size": 128,
        "lr": 3e-3,
        "augmentation": "base",
        "pictures": False,
    }
    runs = []
    with moto_server() as endpoint:
        for index in range(args.repeat):
            runs.append(failover_once(index, work, endpoint, spec, args.timeout, args.kill_lease_holder))
            if not args.json:
                print(f"  run {index + 1}: {json.dumps(runs[-1])}", flush=True)
    worst = max(run["seconds_after_kill"]["training_resumed_epoch"] for run in runs)
    return {
        "runs": runs,
        "max_seconds_to_training_resumed_epoch": worst,
        "goal_s": 60,
        "goal_met": worst <= 60 and all(run["resumed_correctly"] for run in runs),
        "work_dir": str(work),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


FAILOVER_COLUMNS = (
    ("heartbeat_gone", "beat gone"),
    ("lease_free", "lease free"),
    ("requeued", "requeued"),
    ("horse_started", "B horse"),
    ("training_resumed_epoch", "B trains"),
    ("resumed_epoch_reported", "B epoch done"),
)


def print_failover(report: dict) -> None:
    """The failovers as a table: seconds after the kill of each step."""
    print("seconds after kill -9 of box A (S3 store on moto):")
    print("run  A held lease  resumed  " + "  ".join(f"{title:>12}" for _key, title in FAILOVER_COLUMNS))
    for index, run in enumerate(report["runs"], 1):
        cells = "  ".join(f"{run['seconds_after_kill'][key]:>12.1f}" for key, _title in FAILOVER_COLUMNS)
        held = "yes" if run["killed_box_held_lease"] else "no"
        resumed = f"{run['epoch_in_store_at_kill']}->{run['resumed_from_epoch']}"
        print(f"{index:>3}  {held:>12}  {resumed:>7}  {cells}")
    verdict = "met" if report["goal_met"] else "MISSED"
    print(
        f"worst kill -9 -> box B training the resumed epoch: {report['max_seconds_to_training_resumed_epoch']:.1f} s"
        f" (goal <= {report['goal_s']} s: {verdict}); load average {report['load_average']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--failover", action="store_true", help="time kill -9 on box A to box B training, S3 store")
    parser.add_argument("--epochs", type=int, help="epochs per run [default: 4; --failover: 40]")
    parser.add_argument("--profiles", type=int, help="generated people in the data [default: 30; --failover: 60]")
    parser.add_argument("--resize", help="training resolution [default: 96x96; --failover: 64x64]")
    parser.add_argument("--model", help="timm model [default: efficientnet_b2; --failover: test_efficientnet]")
    parser.add_argument("--stores", default="none,shared-dir,s3")
    parser.add_argument(
        "--s3-url",
        help="A real bucket (s3://BUCKET/PREFIX, with this shell's AWS_* variables) instead of a local moto server.",
    )
    parser.add_argument("--repeat", type=int, default=3, help="--failover: kills to time [default: 3]")
    parser.add_argument(
        "--kill-lease-holder",
        action="store_true",
        help="--failover: box A also holds the janitors' lease, so box B's janitor waits for it to lapse (worst case)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="--failover: seconds to wait for box B after a kill [default: 300]"
    )
    parser.add_argument("--json", action="store_true", help="--failover: print the figures as JSON")
    args = parser.parse_args()
    if args.failover:
        for key, value in {"epochs": 40, "profiles": 60, "resize": "64x64", "model": "test_efficientnet"}.items():
            setattr(args, key, getattr(args, key) or value)
        report = run_failover(args)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_failover(report)
        raise SystemExit(0 if report["goal_met"] else 1)
    for key, value in {"epochs": 4, "profiles": 30, "resize": "96x96", "model": "efficientnet_b2"}.items():
        setattr(args, key, getattr(args, key) or value)
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="runyard-store-bench-"))
    make_demo_dataset(work / "data", profiles=args.profiles, eval_profiles=2, image_size=(128, 96), seed=0)
    spec = {
        "model": args.model,
        "pretrained": False,
        "optimizer": "adam",
        "data_dir": str(work / "data" / "train"),
        "resize": args.resize,
        "epochs": args.epochs,
        "batch_size": 32,
        "augmentation": "base",
        "pictures": False,
    }
    results = {}
    for kind in args.stores.split(","):
        home = work / f"home-{kind}"
        run = spec | {"run_name": f"bench-{kind}"}
        if kind == "none":
            results[kind] = epoch_seconds(run, home, {})
        elif kind == "shared-dir":
            (work / "shared").mkdir(exist_ok=True)
            results[kind] = epoch_seconds(run, home, {"RUNYARD_STORE": str(work / "shared" / "runyard")})
        elif args.s3_url:
            results[kind] = epoch_seconds(run, home, {"RUNYARD_STORE": args.s3_url})
        else:
            with moto_server() as endpoint:
                env = {"RUNYARD_STORE": "s3://bench/runs", "AWS_ENDPOINT_URL": endpoint} | MOTO_KEYS
                results[kind] = epoch_seconds(run, home, env)
        print(kind, json.dumps(results[kind]), flush=True)
    baseline = results.get("none", {}).get("mean_s")
    for kind, figures in results.items():
        if baseline and kind != "none":
            figures["ratio"] = round(figures["mean_s"] / baseline, 3)
    load = os.getloadavg()
    print(json.dumps({"results": results, "load_average": [round(value, 2) for value in load]}, indent=2))


if __name__ == "__main__":
    main()

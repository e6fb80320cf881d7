"""Boxes die, workers get stopped: jobs come back and resume, with real workers and real training.

Each scenario runs two real worker processes (`python -m worker.process`, what `worker` starts
per GPU) on a real redis-server and one job training timm's tiny test model for several epochs:
- kill -9 of the busy worker and its work horse: another worker's janitor requeues the job,
  that worker resumes it from the last finished epoch;
- SIGTERM of the busy worker: the job is requeued (not failed, not counted as a crash) and
  resumed by the other worker;
- two signals: the worker stops at once and the job is still requeued.

The heartbeat and janitor run at a faster cadence than their defaults to keep the suite quick;
the 60 s requeue goal with the defaults is measured by benchmarks/chaos.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.helpers import child_pids, isolated_env, kill_worker, run_cli, start_worker, tiny_spec, wait_for
from tests.wandb_records import find_run_files, summarize_run, synced_history

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EPOCHS = 5
# One torch thread per worker: two workers on two cores must not fight over them.
FAST_HEARTBEAT = {"RUNYARD_HEARTBEAT_TTL": "4", "RUNYARD_JANITOR_INTERVAL": "1", "OMP_NUM_THREADS": "1"}


def publish_job(env: dict[str, str], demo_data: Path, **overrides) -> Job:
    spec = tiny_spec(demo_data, **({"epochs": EPOCHS} | overrides))
    args = ["--no-pretrained"] + [
        arg for key, value in spec.items() if key != "pretrained" for arg in (f"--{key.replace('_', '-')}", str(value))
    ]
    result = run_cli("publish", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    connection = redis.Redis.from_url(env["REDIS_URL"])
    return Job.fetch(json.loads(result.stdout)["job_id"], connection=connection, serializer=JSONSerializer)


def epoch_of(job: Job) -> int:
    job.refresh()
    return (job.meta.get("progress") or {}).get("epoch") or 0


@pytest.fixture
def cluster(redis_url, tmp_path):
    """Start named workers sharing one Redis and one runs dir; kill whatever is left at the end."""
    env = isolated_env(redis_url, tmp_path / "home") | FAST_HEARTBEAT
    workers: dict[str, object] = {}

    def start(*names: str, **extra_env: str) -> dict:
        for name in names:
            workers[name] = start_worker(env | extra_env, name, tmp_path / f"{name}.log")
        beating = redis.Redis.from_url(redis_url)
        wait_for(lambda: all(beating.exists(f"runyard:heartbeat:{name}") for name in names), 60, "workers to beat")
        return workers

    yield env, start, tmp_path
    for process in workers.values():
        if process.poll() is None:
            kill_worker(process.pid)
            process.wait(10)


def running_on(job: Job) -> str | None:
    job.refresh()
    return job.worker_name if job.get_status() == JobStatus.STARTED else None


def assert_history_complete(job: Job):
    """Every epoch exactly once in the result, job meta, metrics.csv and W&B's history."""
    result = job.return_value()
    assert result["epochs_completed"] == EPOCHS
    assert [row["epoch"] for row in job.meta["history"]] == list(range(1, EPOCHS + 1))
    run_dir = Path(result["run_dir"])
    with open(run_dir / "metrics.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in csv_rows] == list(range(1, EPOCHS + 1))
    synced = synced_history(run_dir)
    assert [row["epoch"] for row in synced] == list(range(1, EPOCHS + 1)), "W&B history has a gap or a repeat"
    assert [row["val_f1"] for row in synced] == pytest.approx([float(row["val_f1"]) for row in csv_rows])
    ids = {summarize_run(path)["run"].get("id") for path in find_run_files(run_dir)} - {None}
    assert ids == {result["wandb"]["id"]}  # the resumed attempt continued the same W&B run
    return result


def test_kill_9_of_a_busy_worker_is_requeued_and_resumed_elsewhere_from_the_last_epoch(cluster, demo_data):
    env, start, tmp_path = cluster
    workers = start("box1-gpu0", "box2-gpu0")
    job = publish_job(env, demo_data)
    doomed = wait_for(lambda: running_on(job), 120, "a worker to take the job")
    [survivor] = set(workers) - {doomed}
    wait_for(lambda: epoch_of(job) >= 2, 120, "two finished epochs")
    killed_at = time.time()
    kill_worker(workers[doomed].pid)
    done_epochs = epoch_of(job)

    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, 180, "the job to finish on the other box")
    job.refresh()
    result = assert_history_complete(job)
    assert result["worker"]["name"] == survivor
    assert result["resumed_from_epoch"] == done_epochs  # from the last finished epoch
    [entry] = job.meta["requeue_log"]
    assert entry["worker"] == doomed and entry["by"] == survivor and entry["counted"]
    assert job.meta["requeues"] == 1
    print(f"requeued {entry['at'] - killed_at:.1f} s after kill -9 (heartbeat TTL 4 s, sweep every 1 s)")
    assert "Traceback" not in (tmp_path / f"{survivor}.log").read_text()


def test_sigterm_requeues_the_running_job_with_its_checkpoint_and_another_worker_resumes_it(cluster, demo_data):
    env, start, tmp_path = cluster
    workers = start("box1-gpu0", "box2-gpu0")
    job = publish_job(env, demo_data)
    stopped = wait_for(lambda: running_on(job), 120, "a worker to take the job")
    [other] = set(workers) - {stopped}
    wait_for(lambda: epoch_of(job) >= 1, 120, "a finished epoch")
    workers[stopped].send_signal(signal.SIGTERM)
    assert workers[stopped].wait(60) == 0
    job.refresh()
    # Back on its queue, not failed: the other box may have taken it, or (on a slow box, while the
    # stopped one was still exiting) finished it already.
    assert job.get_status() in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.FINISHED)
    assert job.meta["shutdowns"] == 1 and job.meta.get("requeues", 0) == 0  # a shutdown is not a crash
    log = (tmp_path / f"{stopped}.log").read_text()
    assert "to stop at the next step boundary" in log and "Traceback" not in log

    wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, 180, "the job to finish on the other box")
    job.refresh()
    result = assert_history_complete(job)
    # The other box may have taken the job (and trained on) before the stopped one finished exiting,
    # so the epoch kept is read from what the shutdown recorded, not from the progress seen later.
    assert job.meta["shutdown_after_epoch"] >= 1
    assert result["worker"]["name"] == other and result["resumed_from_epoch"] == job.meta["shutdown_after_epoch"]


def test_a_second_signal_stops_the_worker_at_once_and_still_requeues_the_job(cluster, demo_data, connection):
    env, start, _tmp_path = cluster
    stopping = start("box1-gpu0", WANDB_MODE="disabled")["box1-gpu0"]
    job = publish_job(env, demo_data)
    wait_for(lambda: epoch_of(job) >= 1, 120, "a finished epoch")
    [horse] = [pid for pid in child_pids(stopping.pid) if os.getpgid(pid) == pid]
    os.kill(horse, signal.SIGSTOP)  # a horse stuck mid-step: the warm stop cannot happen
    stopping.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a repeat within a second (pools send signals twice)
    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(30) == 0
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED
    assert job.meta["requeue_log"][-1]["reason"] == "worker box1-gpu0 was stopped at once"
    assert not job.meta["requeue_log"][-1]["counted"]
    assert connection.exists("runyard:heartbeat:box1-gpu0") == 0
    with pytest.raises(ProcessLookupError):
        os.kill(horse, 0)


def test_a_horse_whose_worker_died_stops_by_itself_and_leaves_the_job_to_the_janitor(cluster, demo_data, connection):
    env, start, _tmp_path = cluster
    worker = start("box1-gpu0", WANDB_MODE="disabled")["box1-gpu0"]
    job = publish_job(env, demo_data, epochs=50)
    wait_for(lambda: epoch_of(job) >= 1, 120, "a finished epoch")
    [horse] = [pid for pid in child_pids(worker.pid) if os.getpgid(pid) == pid]
    os.kill(worker.pid, signal.SIGKILL)  # the worker only: its horse is in its own process group
    worker.wait(10)
    wait_for(lambda: not Path(f"/proc/{horse}").exists(), 60, "the orphaned horse to stop")
    assert job.get_status(refresh=True) == JobStatus.STARTED  # it recorded nothing on its way out
    assert epoch_of(job) < 50

    wait_for(lambda: not connection.exists("runyard:heartbeat:box1-gpu0"), 30, "the heartbeat to lapse")
    janitor = run_cli("runyard", "janitor", "--once", env=env)
    assert janitor.returncode == 0, janitor.stderr
    assert f"requeued {job.meta['run_name']}" in janitor.stdout
    assert job.get_status(refresh=True) == JobStatus.QUEUED

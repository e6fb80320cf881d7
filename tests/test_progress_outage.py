"""Progress reporting never blocks training, and RQ's scheduler comes back when it dies.

A job's epoch report used to be a synchronous meta write on the work horse's patient
connection: with Redis away it retried for ~30 s, and training waited. Here a real worker trains
a long tiny job while its dedicated redis-server is stopped for OUTAGE_S seconds: epochs must
keep coming (a blocked horse would finish at most the epoch it was in), and once Redis is back
the newest report must land.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from rq.job import Job

from contracts.spec import load_spec
from publisher.queue import publish_experiment
from tests.helpers import isolated_env, start_redis_server, start_worker, tiny_spec, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OUTAGE_S = 15  # half of the ~31 s a patient synchronous write would retry for
EPOCH_LINE = re.compile(r"runyard\.trainer INFO epoch (\d+)/")


def _epochs_logged(log_path: Path) -> list[int]:
    return [int(match.group(1)) for match in EPOCH_LINE.finditer(log_path.read_text())]


def _meta(connection: redis.Redis, job_id: str) -> dict:
    raw = connection.hget(Job.key_for(job_id), "meta")
    return json.loads(raw) if raw else {}


def test_a_redis_outage_costs_training_no_time_and_the_latest_progress_lands_after(demo_data, tmp_path):
    directory = tmp_path / "redis"
    directory.mkdir()
    server, url = start_redis_server(directory, "--appendonly", "yes")
    log_path = tmp_path / "worker.log"
    worker = None
    try:
        connection = redis.Redis.from_url(url)
        job = publish_experiment(connection, load_spec(tiny_spec(demo_data, epochs=300)), context={})
        env = isolated_env(url, tmp_path / "home") | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        worker = start_worker(env, "outage-w", log_path, "--burst")
        wait_for(lambda: (_meta(connection, job.id).get("progress") or {}).get("epoch", 0) >= 2, 120, "epoch 2")

        server.send_signal(signal.SIGTERM)  # AOF flushed: the job comes back with the server
        server.wait(30)
        before = max(_epochs_logged(log_path))
        time.sleep(OUTAGE_S)
        during = [epoch for epoch in _epochs_logged(log_path) if epoch > before]
        server, _url = start_redis_server(directory, "--appendonly", "yes")

        # A horse blocked in a meta write finishes at most the epoch it was in while Redis is away.
        assert len(during) >= 3, log_path.read_text()[-3000:]
        reported = wait_for(
            lambda: (_meta(connection, job.id).get("progress") or {}).get("epoch", 0) > max(during),
            60,
            "a report newer than the outage",
        )
        assert reported
        history = _meta(connection, job.id)["history"]
        assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))  # no gap
        log_text = log_path.read_text()
        assert "progress kept until Redis is back" in log_text
        worker.send_signal(signal.SIGTERM)  # warm shutdown: the job is requeued with its checkpoint
        assert worker.wait(120) == 0, log_path.read_text()[-3000:]
        assert "Traceback" not in log_path.read_text()
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(30)
        server.terminate()
        server.wait(30)


def test_rqs_scheduler_process_is_restarted_when_it_dies(redis_url, tmp_path):
    log_path = tmp_path / "worker.log"
    env = isolated_env(redis_url, tmp_path / "home") | {"RUNYARD_HEARTBEAT_TTL": "3"}
    worker = start_worker(env, "sched-w", log_path)
    started = re.compile(r"Scheduler for .* started with PID (\d+)")
    try:
        first = int(wait_for(lambda: started.search(log_path.read_text()), 120, "RQ's scheduler").group(1))
        subprocess.run(["kill", "-9", str(first)], check=True)
        again = wait_for(
            lambda: [int(pid) for pid in started.findall(log_path.read_text()) if int(pid) != first],
            60,
            "a restarted scheduler",
        )
        assert f"RQ's scheduler (pid {first}) died with exit code -9; restarting it" in log_path.read_text()
        assert Path(f"/proc/{again[0]}").exists()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log_path.read_text()[-3000:]
        assert not Path(f"/proc/{again[0]}/status").exists() or "zombie" in Path(f"/proc/{again[0]}/status").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)

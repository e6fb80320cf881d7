"""Redis restarts and passwords: queued work survives, workers reconnect, secrets stay out of logs.

A dedicated password-protected redis-server with AOF on holds 20 queued experiments. It is
restarted before any worker runs (all 20 must still be queued), then `worker --cpu --workers 2
--burst` runs them while Redis is restarted once more under it: the workers must reconnect
with backoff and finish all 20, without a traceback and without printing the password.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.spec import load_spec
from publisher.queue import publish_experiment
from tests.helpers import BIN, isolated_env, start_redis_server, tiny_spec, wait_for
from worker.logs import MaskingFormatter
from worker.outage import wait_for_redis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PASSWORD = "hunter2-s3cret"
JOBS = 20


def restart(process: subprocess.Popen, directory: Path, pause: float = 0.0) -> subprocess.Popen:
    process.send_signal(signal.SIGTERM)  # redis-server flushes its AOF and exits
    process.wait(30)
    time.sleep(pause)
    return start_redis_server(directory, "--appendonly", "yes", password=PASSWORD)[0]


@dataclass
class Outage:
    connection: redis.Redis
    job_ids: list[str]
    queued_after_restart: list[str]
    output: str
    returncode: int


@pytest.fixture(scope="module")
def outage(demo_data, tmp_path_factory) -> Outage:
    directory = tmp_path_factory.mktemp("aof-redis")
    server, url = start_redis_server(directory, "--appendonly", "yes", password=PASSWORD)
    try:
        connection = redis.Redis.from_url(url)
        spec = load_spec(tiny_spec(demo_data))
        job_ids = [publish_experiment(connection, spec, context={}).id for _ in range(JOBS)]

        server = restart(server, directory)
        queued = Queue("default", connection=connection, serializer=JSONSerializer).get_job_ids()

        env = isolated_env(url, tmp_path_factory.mktemp("home")) | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        worker = subprocess.Popen(
            [str(BIN / "worker"), "--cpu", "--workers", "2", "--burst"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(lambda: connection.zcard("rq:finished:default") >= 3, 240, "three finished jobs")
        server = restart(server, directory, pause=2.0)  # the workers lose Redis for a few seconds
        output, _ = worker.communicate(timeout=400)
        yield Outage(connection, job_ids, queued, output, worker.returncode)
    finally:
        server.terminate()
        server.wait(30)


def test_queued_jobs_survive_a_redis_restart_with_aof(outage):
    assert outage.queued_after_restart == outage.job_ids


def test_workers_reconnect_after_a_restart_under_them_and_run_all_twenty(outage):
    assert outage.returncode == 0, outage.output[-3000:]
    jobs = [Job.fetch(job_id, connection=outage.connection, serializer=JSONSerializer) for job_id in outage.job_ids]
    assert [job.get_status() for job in jobs] == [JobStatus.FINISHED] * JOBS


def test_worker_logs_never_show_the_password_or_a_traceback(outage):
    assert PASSWORD not in outage.output
    assert "Traceback" not in outage.output


def test_a_wrong_password_is_one_clear_line_and_enqueues_nothing(outage, tmp_path):
    socket_path = outage.connection.connection_pool.connection_kwargs["path"]
    env = os.environ | {"REDIS_URL": f"unix://:wrong-{PASSWORD}@{socket_path}", "RUNYARD_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "publisher", "--model", "resnet50"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "refused the password" in line and "unix://:***@" in line
    assert PASSWORD not in result.stderr + result.stdout


def test_a_worker_that_lost_redis_retries_with_backoff_one_masked_line_per_try(tmp_path, caplog):
    url = f"unix://:{PASSWORD}@{tmp_path / 'redis.sock'}"
    servers = []
    starter = threading.Timer(2.5, lambda: servers.append(start_redis_server(tmp_path, password=PASSWORD)[0]))
    starter.start()
    try:
        with caplog.at_level(logging.INFO, logger="runyard.worker"):
            connection = wait_for_redis(url, redis.ConnectionError("Connection refused"))
        assert connection.ping()
    finally:
        starter.join()
        for server in servers:
            server.terminate()
            server.wait(30)
    tries = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(tries) >= 2 and all("reconnecting in" in record.getMessage() for record in tries)
    assert [record.getMessage() for record in tries][:2] == [
        f"lost Redis at unix://:***@{tmp_path / 'redis.sock'} (Connection refused); reconnecting in 1 s",
        tries[1].getMessage(),
    ]
    assert "reconnecting in 2 s" in tries[1].getMessage()  # backing off
    assert all(record.exc_info is None for record in caplog.records)  # no traceback
    assert not any(PASSWORD in record.getMessage() for record in caplog.records)


def test_worker_log_lines_mask_passwords_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://:{PASSWORD}@db.example:6379/0")
    formatter = MaskingFormatter()
    try:
        raise redis.AuthenticationError(f"AUTH {PASSWORD} rejected by redis://:{PASSWORD}@db.example:6379/0")
    except redis.AuthenticationError:
        record = logging.LogRecord(
            "rq.worker", logging.ERROR, __file__, 1, "connect to %s", ("rediss://u:pw@h/0",), sys.exc_info()
        )
    line = formatter.format(record)
    assert PASSWORD not in line and "u:pw@" not in line
    assert "rediss://u:***@h/0" in line and "redis://:***@db.example:6379/0" in line and "Traceback" in line

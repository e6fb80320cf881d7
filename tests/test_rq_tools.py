"""The stock RQ tools work on runyard's jobs: `runyard dashboard` (rq-dashboard) and the `rq` CLI.

One module-wide setup serves every test: a password-protected Redis with AOF (as docker-compose
runs it), a runyard job whose spec failed validation in the worker, a real `worker --cpu` busy training a long job,
and a dashboard bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.spec import load_spec
from publisher.queue import publish_experiment
from runyard.dashboard import HEADLESS_CHROMIUM_FLAGS
from tests.helpers import BIN, isolated_env, start_redis_server, tiny_spec
from worker.jobs import RUN_EXPERIMENT

PASSWORD = "s3cret-redis"
LONG_EPOCHS = 200  # far more than the tests need: the worker must stay busy until teardown


@dataclass
class Busy:
    url: str
    env: dict[str, str]
    connection: redis.Redis
    training: Job
    failed: Job
    worker_name: str
    dashboard: str  # http://127.0.0.1:PORT


def start_dashboard(env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    """`runyard dashboard --port 0 ...` and the URL it prints once it listens."""
    process = subprocess.Popen(
        [str(BIN / "runyard"), "dashboard", "--port", "0", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if "runyard dashboard: http://" not in line:
        process.kill()
        raise AssertionError(f"dashboard did not start: {line}{process.stderr.read()}")
    return process, line.split()[2].rstrip("/")


def stop(process: subprocess.Popen, *signals: int) -> None:
    """Send each signal in turn (RQ ignores a second Ctrl-C within a second of the first)."""
    for signum in signals:
        if process.poll() is None:
            process.send_signal(signum)
            time.sleep(1.5)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def busy(demo_data, tmp_path_factory) -> Busy:
    directory = tmp_path_factory.mktemp("redis-auth")
    server, url = start_redis_server(directory, "--appendonly", "yes", password=PASSWORD)
    env = isolated_env(url, tmp_path_factory.mktemp("home"))
    connection = redis.Redis.from_url(url)
    worker = dashboard = None
    try:
        # A payload that fails validation in the worker fails before torch is imported: fast.
        invalid = tiny_spec(demo_data, lr=-1.0)
        bad_spec = Queue("default", connection=connection, serializer=JSONSerializer).enqueue_call(
            RUN_EXPERIMENT, kwargs={"spec": invalid}, description="bad-spec", meta={"run_name": "bad-spec"}
        )
        training = publish_experiment(
            connection, load_spec(tiny_spec(demo_data, epochs=LONG_EPOCHS, run_name="busy-run"))
        )
        worker = subprocess.Popen(
            [str(BIN / "worker"), "--cpu", "--name", "rqtools"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            training.refresh()
            if (training.meta.get("progress") or {}).get("epoch"):
                break
            assert worker.poll() is None, "the worker exited before training"
            time.sleep(0.2)
        else:
            raise AssertionError("the worker never reported an epoch")
        dashboard, dashboard_url = start_dashboard(env)
        yield Busy(
            url,
            env,
            connection,
            training,
            Job.fetch(bad_spec.id, connection=connection, serializer=JSONSerializer),
            "rqtools-cpu0",
            dashboard_url,
        )
    finally:
        if dashboard is not None:
            stop(dashboard, signal.SIGINT)
        if worker is not None:
            stop(worker, signal.SIGINT, signal.SIGINT)  # the second Ctrl-C stops the running job
        server.terminate()
        server.wait(10)


def test_dashboard_queues_endpoint_counts_our_running_and_failed_jobs(busy):
    status, body = get(f"{busy.dashboard}/0/data/queues.json")
    assert status == 200, body
    [default] = [queue for queue in json.loads(body)["queues"] if queue["name"] == "default"]
    assert default["started_job_registry_count"] == 1
    assert default["failed_job_registry_count"] == 1


def test_dashboard_jobs_endpoint_shows_run_name_epoch_and_f1(busy):
    status, body = get(f"{busy.dashboard}/0/data/jobs/default/started/8/asc/1.json")
    assert status == 200, body
    [job] = json.loads(body)["jobs"]
    assert job["id"] == busy.training.id
    assert job["description"].startswith("busy-run · epoch ")
    assert f"/{LONG_EPOCHS} · val F1 0." in job["description"] and "best 0." in job["description"]
    status, body = get(f"{busy.dashboard}/0/data/jobs/default/failed/8/asc/1.json")
    assert status == 200
    assert json.loads(body)["jobs"][0]["description"] == "bad-spec · failed: spec_error"


def test_dashboard_workers_endpoint_answers_while_a_json_worker_is_busy(busy):
    status, body = get(f"{busy.dashboard}/0/data/workers.json")
    assert status == 200, body  # stock rq-dashboard 0.9 answers 500 here
    [worker] = json.loads(body)["workers"]
    assert worker["name"] == busy.worker_name and worker["state"] == "busy"
    assert worker["current_job"]["job_id"] == busy.training.id
    assert worker["current_job"]["call_string"].startswith("busy-run · epoch ")


def test_dashboard_job_page_and_job_data_show_our_meta(busy):
    status, _page = get(f"{busy.dashboard}/0/view/job/{busy.training.id}")
    assert status == 200
    status, body = get(f"{busy.dashboard}/0/data/job/{busy.training.id}.json")
    assert status == 200, body
    job = json.loads(body)
    assert job["status"] == "started" and job["origin"] == "default"
    meta = json.loads(job["metadata"])
    assert meta["run_name"] == "busy-run" and meta["progress"]["epoch"] >= 1


def test_dashboard_html_pages_render(busy):
    for path in ("/", "/0/view/workers", "/0/view/jobs"):
        status, page = get(busy.dashboard + path)
        assert status == 200, (path, page[:500])
        assert "RQ dashboard" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_dashboard_renders_our_running_job_in_headless_chromium(busy, tmp_path):
    result = subprocess.run(
        [
            "chromium",
            *HEADLESS_CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"{busy.dashboard}/0/view/workers",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert busy.worker_name in result.stdout
    assert "busy-run · epoch " in result.stdout  # filled in by the page's script from workers.json


def test_dashboard_with_basic_auth_refuses_requests_without_the_password(busy):
    process, url = start_dashboard(busy.env | {"RQ_DASHBOARD_USERNAME": "team", "RQ_DASHBOARD_PASSWORD": "pw"})
    try:
        assert get(f"{url}/0/data/queues.json")[0] == 401
        assert get(f"{url}/0/data/queues.json", auth=("team", "wrong"))[0] == 401
        assert get(f"{url}/0/data/queues.json", auth=("team", "pw"))[0] == 200
    finally:
        stop(process, signal.SIGINT)


def test_dashboard_refuses_a_username_without_password(busy):
    result = subprocess.run(
        [str(BIN / "runyard"), "dashboard", "--username", "team"],
        env=busy.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--username and --password go together" in result.stderr


def test_rq_info_lists_our_queues_and_the_busy_worker(busy):
    result = subprocess.run(
        [str(BIN / "rq"), "info", "--serializer", "json", "-u", busy.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^default +\| 0, 1 executing, 0 finished, 1 failed$", result.stdout, re.M), result.stdout
    assert re.search(rf"^{busy.worker_name} \(.*\): busy high, default, low\.", result.stdout, re.M), result.stdout


def test_stock_rq_dashboard_fails_on_busy_json_workers_which_runyard_dashboard_fixes(busy):
    """Why `runyard dashboard` exists: the same request to the stock app answers 500."""
    port = free_port()
    stock = subprocess.Popen(
        [str(BIN / "rq-dashboard"), "--json", "-b", "127.0.0.1", "-p", str(port), "-u", busy.url],
        env=busy.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status = get(f"http://127.0.0.1:{port}/0/data/workers.json")[0]
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "stock rq-dashboard did not start"
                time.sleep(0.2)
        assert status == 500
        assert get(f"{busy.dashboard}/0/data/workers.json")[0] == 200
    finally:
        stop(stock, signal.SIGINT)


def test_rq_requeue_puts_our_failed_job_back_on_its_queue(busy):
    assert busy.failed.get_status(refresh=True) == JobStatus.FAILED
    requeued_at = time.time()
    result = subprocess.run(
        [str(BIN / "rq"), "requeue", "--serializer", "json", "-u", busy.url, "--queue", "default", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Requeueing 1 jobs from failed queue" in result.stdout
    job = busy.failed
    job.refresh()
    if job.get_status() == JobStatus.QUEUED:
        assert busy.connection.lrange("rq:queue:default", 0, -1) == [job.id.encode()]
    else:  # a free worker took it off its queue at once (on a slow box the busy job may have ended)
        assert job.started_at is not None and job.started_at.timestamp() >= requeued_at - 1

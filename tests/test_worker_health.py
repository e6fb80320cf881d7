"""Whether a worker is alive, and why one cannot start: said plainly by doctor, worker and demo.

`runyard doctor` judged workers by RQ's registration, which outlives a kill -9 by minutes: a
worker killed 45 s ago was "alive". A box without the `train` extra died with `No module named
'timm'` and `runyard demo` said only "did not finish".
"""

from __future__ import annotations

import os

import pytest

from runyard.doctor import check_workers
from tests.helpers import isolated_env, kill_worker, run_cli, start_worker, wait_for
from worker.heartbeat import heartbeat_key

TRAIN_EXTRA = "pip install 'runyard[train]'"


@pytest.fixture
def without_timm(tmp_path) -> str:
    """A PYTHONPATH on which `import timm` fails as it does where timm is not installed."""
    shadow = tmp_path / "no-timm" / "timm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'timm'\", name='timm')\n")
    return os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])


def test_doctor_calls_a_killed_worker_dead_while_rq_still_lists_it(redis_url, connection, tmp_path):
    env = isolated_env(redis_url, tmp_path) | {"RUNYARD_HEARTBEAT_TTL": "3"}
    worker = start_worker(env, "doomed-w", tmp_path / "worker.log")
    try:
        wait_for(lambda: connection.exists(heartbeat_key("doomed-w")), 120, "the worker's heartbeat")
        alive = check_workers(connection)
        assert alive.status == "ok" and alive.detail.startswith("1 alive"), alive
        kill_worker(worker.pid)
        worker.wait(30)
        wait_for(lambda: not connection.exists(heartbeat_key("doomed-w")), 30, "the heartbeat to lapse")
        assert connection.exists("rq:worker:doomed-w")  # RQ still lists it for minutes
        dead = check_workers(connection)
    finally:
        kill_worker(worker.pid)
    assert dead.status == "warn", dead
    assert dead.detail.startswith("no live workers")
    assert "1 dead" in dead.detail and "doomed-w (last heartbeat" in dead.detail
    assert "runyard janitor" in dead.detail


def test_a_worker_without_the_train_extra_says_what_to_install(redis_url, tmp_path, without_timm):
    result = run_cli("worker", "--cpu", "--burst", env=isolated_env(redis_url, tmp_path) | {"PYTHONPATH": without_timm})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "No module named 'timm'" in output and TRAIN_EXTRA in output
    assert "Traceback" not in output


def test_runyard_demo_says_what_to_install_when_its_worker_cannot_train(redis_url, demo_data, tmp_path, without_timm):
    env = isolated_env(redis_url, tmp_path) | {"PYTHONPATH": without_timm, "COLUMNS": "300"}
    result = run_cli("runyard", "demo", "--epochs", "1", "--data-dir", str(demo_data), env=env, timeout=180)
    assert result.returncode == 1
    assert "did not finish" in result.stdout
    assert TRAIN_EXTRA in result.stdout

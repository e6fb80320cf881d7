"""A search whose data dir is bad stops after a few identical data errors, with one reason.

A real burst worker runs a 10-point grid whose data dir does not exist: three points fail with
the same data error, the search is stopped, the other seven are cancelled without running (no
run dir), `runyard status --search` says why, and publishing the search again clears the stop.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from tests.helpers import isolated_env, run_cli, write_search
from worker.search_stop import STOP_AFTER_DATA_ERRORS, search_stopped

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_search_with_a_bad_data_dir_stops_after_a_few_identical_data_errors(redis_url, demo_data, tmp_path):
    connection = redis.Redis.from_url(redis_url)
    env = isolated_env(redis_url, tmp_path / "home") | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    missing = tmp_path / "nope"
    (missing / "train").mkdir(parents=True)  # a data dir with no images/ in it
    path = write_search(tmp_path / "bad.yaml", missing, {"seed": {"values": list(range(10))}}, name="bad")
    published = subprocess.run(
        [sys.executable, "-m", "schedule_search", str(path), "--json"], capture_output=True, text=True, env=env
    )
    assert published.returncode == 0, published.stderr

    command = [sys.executable, "-m", "worker.process", "--name", "stop-test", "--burst"]
    worker = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]

    status = json.loads(run_cli("runyard", "status", "--search", "bad", "--json", env=env).stdout)
    assert status["counts"]["failed"] == 10 and status["counts"]["queued"] == 0
    reasons = sorted(row["detail"] for row in status["rows"])
    assert reasons.count("data_error") == STOP_AFTER_DATA_ERRORS
    assert reasons.count("search_stopped") == 10 - STOP_AFTER_DATA_ERRORS
    assert "same data error" in status["stopped"]["reason"] and "nope" in status["stopped"]["reason"]
    runs = tmp_path / "home" / "runs"
    assert len(list(runs.iterdir()) if runs.exists() else []) <= STOP_AFTER_DATA_ERRORS  # the rest never started
    table = run_cli("runyard", "status", "--search", "bad", env=env)
    assert "STOPPED" in table.stdout and "same data error" in table.stdout

    again = subprocess.run(
        [sys.executable, "-m", "schedule_search", str(path), "--json"], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["enqueued"] == 10  # every point runs again
    assert search_stopped(connection, "bad") is None

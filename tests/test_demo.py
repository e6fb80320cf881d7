"""The README's main command: `runyard demo`, shortened to one epoch per experiment."""

from __future__ import annotations

import json

import redis

from tests.helpers import isolated_env, run_cli


def test_demo_publishes_two_experiments_runs_them_and_prints_the_leaderboard(redis_server, tmp_path):
    redis.Redis.from_url(redis_server).flushall()
    env = isolated_env(redis_server, tmp_path / "home")
    result = run_cli("runyard", "demo", "--epochs", "1", "--json", env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["failed"] == []
    assert {run["loss"] for run in summary["runs"]} == {"cross_entropy", "focal"}
    assert all(run["epochs_completed"] == 1 for run in summary["runs"])
    assert "demo leaderboard" in result.stderr
    assert (tmp_path / "home" / "demo-data" / "train" / "train.csv").exists()
    board = json.loads(run_cli("runyard", "leaderboard", "--json", env=env).stdout)
    assert {row["run_name"] for row in board} == {run["run_name"] for run in summary["runs"]}

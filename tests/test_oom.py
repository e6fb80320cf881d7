"""CUDA out of memory: the job shrinks its batch and carries on; past the floor it fails as `oom`.

There is no GPU here, so the worker runs with the test-only fault injection
RUNYARD_FAULT_OOM_ABOVE_BATCH=10: any training batch of more than 10 images raises
torch.OutOfMemoryError exactly where a CUDA allocation would. One real worker run serves both
jobs: one that fits after two halvings and one whose min_batch_size forbids it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq.job import Job, JobStatus

from contracts.spec import load_spec
from publisher.queue import publish_experiment
from tests.helpers import BIN, isolated_env, tiny_spec
from tests.wandb_records import find_run_file, summarize_run


@dataclass
class OomRun:
    fits: Job
    floor: Job
    returncode: int
    output: str


@pytest.fixture(scope="module")
def oom_run(redis_server, demo_data, tmp_path_factory) -> OomRun:
    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    fits = publish_experiment(
        connection, load_spec(tiny_spec(demo_data, epochs=1, batch_size=32, min_batch_size=4)), context={}
    )
    floor = publish_experiment(
        connection, load_spec(tiny_spec(demo_data, epochs=1, batch_size=32, min_batch_size=16)), context={}
    )
    env = isolated_env(redis_server, tmp_path_factory.mktemp("oom")) | {"RUNYARD_FAULT_OOM_ABOVE_BATCH": "10"}
    worker = subprocess.run(
        [str(BIN / "worker"), "--cpu", "--burst"], env=env, capture_output=True, text=True, timeout=240
    )
    fits.refresh()
    floor.refresh()
    return OomRun(fits, floor, worker.returncode, worker.stdout + worker.stderr)


def test_out_of_memory_halves_the_batch_doubles_accumulation_and_finishes(oom_run):
    job = oom_run.fits
    assert job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert (result["batch_size"], result["grad_accum_steps"]) == (8, 4)  # effective batch still 32
    assert [adjustment["to"] for adjustment in result["oom_adjustments"]] == [
        {"batch_size": 16, "grad_accum_steps": 2},
        {"batch_size": 8, "grad_accum_steps": 4},
    ]
    assert result["epochs_completed"] == 1
    assert job.meta["batch_adjustment"] == {"batch_size": 8, "grad_accum_steps": 4}  # kept if requeued


def test_the_batch_adjustment_is_in_the_wandb_config(oom_run):
    result = oom_run.fits.return_value()
    config = summarize_run(find_run_file(Path(result["run_dir"])))["config"]
    assert config["batch_size"] == 8 and config["grad_accum_steps"] == 4
    assert len(config["oom_adjustments"]) == 2


def test_out_of_memory_at_the_floor_fails_as_oom_without_retries_and_the_worker_lives(oom_run):
    job = oom_run.floor
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["failure_reason"] == "oom"
    assert "min_batch_size 16" in job.meta["failure_message"]
    assert not job.retries_left
    assert oom_run.returncode == 0, oom_run.output

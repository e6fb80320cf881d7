"""A run dir or checkpoint that cannot be written fails as `storage_error` naming the errno and the path.

Before, a full disk was `code_error` with torch's `inline_container.cc:672 unexpected pos` and
was retried three times for nothing. /dev/full stands in for a full disk; /sys for a place the
worker may not write (EPERM as root here; EACCES or EROFS elsewhere).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import redis
import torch
from rq.job import JobStatus

from contracts.spec import load_spec
from publisher.queue import publish_experiment
from tests.helpers import isolated_env, tiny_spec
from trainer.train import save_atomic
from worker.jobs import storage_problem


def test_a_checkpoint_on_a_full_disk_is_enospc_naming_the_file_not_torchs_unexpected_pos(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    temporary = path.with_name(f".last.pt.{os.getpid()}.tmp")
    temporary.symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(OSError) as caught:
        save_atomic({"weights": torch.zeros(100_000)}, path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(temporary)
    assert "unexpected pos" not in str(caught.value)
    assert not temporary.exists() and not path.exists()  # no partial checkpoint left
    problem = storage_problem(caught.value, str(tmp_path))
    assert problem.startswith(f"ENOSPC (No space left on device) writing {temporary}: free some space")


@pytest.fixture
def storage_failures(redis_url, connection: redis.Redis, demo_data, tmp_path):
    unwritable = publish_experiment(
        connection, load_spec(tiny_spec(demo_data, output_dir="/sys/runyard-test/runs")), context={}
    )
    full = publish_experiment(
        connection, load_spec(tiny_spec(demo_data, output_dir=str(tmp_path / "runs"))), context={}
    )
    run_dir = tmp_path / "runs" / full.meta["run_name"]
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").symlink_to("/dev/full")  # the first file the run writes: disk full
    good = publish_experiment(connection, load_spec(tiny_spec(demo_data)), context={})
    worker = subprocess.run(
        [sys.executable, "-m", "worker.process", "--name", "disk-w", "--burst"],
        env=isolated_env(redis_url, tmp_path / "home") | {"WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    for job in (unwritable, full, good):
        job.refresh()
    return unwritable, full, good, run_dir, worker


def test_storage_failures_are_their_own_reason_with_the_path_and_are_not_retried(storage_failures):
    unwritable, full, good, run_dir, worker = storage_failures
    output = worker.stdout + worker.stderr
    assert worker.returncode == 0, output[-3000:]
    for job in (unwritable, full):
        assert job.get_status() == JobStatus.FAILED
        assert job.meta["failure_reason"] == "storage_error"
        assert not job.retries_left  # retrying on the same box fails the same way
    assert unwritable.meta["failure_message"].split(" ")[0] in {"EPERM", "EACCES", "EROFS"}
    assert "/sys/runyard-test" in unwritable.meta["failure_message"]
    assert full.meta["failure_message"].startswith("ENOSPC (No space left on device) writing")
    assert str(run_dir.parent) in full.meta["failure_message"]
    assert "Traceback" not in output  # one line each, like the other expected failures
    assert good.get_status() == JobStatus.FINISHED

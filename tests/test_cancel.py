"""`runyard cancel`: queued jobs removed, running ones stopped at a step boundary, a search at once.

The running cases share one real worker process: a job cancelled cooperatively, one killed with
--force, then a quick job that must still run on the same worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import torch
from rq import Queue
from rq.job import Job, JobStatus

from contracts.spec import load_spec
from publisher.cancel import find_jobs
from publisher.queue import publish_experiment
from tests.helpers import isolated_env, kill_worker, run_cli, start_worker, tiny_spec, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def publish(connection: redis.Redis, demo_data: Path, search: str | None = None, **changes) -> Job:
    job = publish_experiment(connection, load_spec(tiny_spec(demo_data, **changes)), context={})
    if search:
        job.meta["search"] = search  # what schedule-search puts on each of its jobs
        job.save_meta()
    return job


def cancel(*args: str, env=None):
    result = run_cli("runyard", "cancel", *args, "--json", env=env)
    return result, (json.loads(result.stdout) if result.returncode == 0 else None)


def test_cancelling_a_queued_job_by_run_name_removes_it_from_its_queue(connection, demo_data):
    job = publish(connection, demo_data)
    result, report = cancel(job.meta["run_name"])
    assert result.returncode == 0, result.stderr
    [item] = report["cancelled"]
    assert (item["job_id"], item["was"], item["action"]) == (job.id, "queued", "cancelled")
    job.refresh()
    assert job.get_status() == JobStatus.CANCELED and job.meta["failure_reason"] == "cancelled"
    assert Queue("default", connection=connection).count == 0


def test_cancel_search_cancels_every_job_of_that_search_and_nothing_else(connection, demo_data):
    ours = [publish(connection, demo_data, search="lr-sweep") for _ in range(3)]
    other = publish(connection, demo_data, search="another")
    result, report = cancel("--search", "lr-sweep")
    assert result.returncode == 0, result.stderr
    assert sorted(item["job_id"] for item in report["cancelled"]) == sorted(job.id for job in ours)
    assert other.get_status(refresh=True) == JobStatus.QUEUED


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "name a job (its id or run name) or a search"),
        (["no-such-run"], "no queued or running job matches 'no-such-run'"),
        (["--search", "no-such-search"], "no queued or running job matches search 'no-such-search'"),
    ],
)
def test_cancel_with_nothing_to_cancel_exits_2_with_a_clear_message(connection, demo_data, args, message):
    publish(connection, demo_data)
    result = run_cli("runyard", "cancel", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert Queue("default", connection=connection).count == 1


@pytest.fixture(scope="module")
def running_cancels(redis_server, demo_data, tmp_path_factory):
    """One worker; a long job cancelled at a step, a long job killed with --force, then a quick job."""
    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    home = tmp_path_factory.mktemp("cancel")
    env = isolated_env(redis_server, home) | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    worker = start_worker(env, "box1-gpu0", home / "worker.log")
    try:
        outcomes = {}
        for mode in ("cooperative", "force"):
            job = publish(connection, demo_data, epochs=50)
            wait_for(lambda job=job: (job.refresh() or job.meta.get("progress", {})).get("epoch"), 180, "an epoch")
            result, report = cancel(job.id, *(["--force"] if mode == "force" else []), env=env)
            assert result.returncode == 0, result.stderr
            wait_for(lambda job=job: job.get_status(refresh=True) == JobStatus.CANCELED, 120, f"{mode} cancel")
            job.refresh()
            outcomes[mode] = (job, report["cancelled"][0])
        quick = publish(connection, demo_data)
        wait_for(lambda: quick.get_status(refresh=True) == JobStatus.FINISHED, 180, "the next job")
        status = json.loads(run_cli("runyard", "status", "--json", env=env).stdout)
        yield outcomes, quick, status, worker, home
    finally:
        kill_worker(worker.pid)
        worker.wait(10)


def test_a_running_job_stops_at_its_next_step_and_keeps_its_checkpoint(running_cancels):
    outcomes, _quick, _status, _worker, home = running_cancels
    job, item = outcomes["cooperative"]
    assert (item["was"], item["action"]) == ("started", "stopping")
    assert job.meta["failure_reason"] == "cancelled"
    stopped_after = job.meta["progress"]["epoch"]
    assert stopped_after < 50
    checkpoint = torch.load(home / "runs" / job.meta["run_name"] / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == stopped_after  # kept: publishing the run again resumes from it


def test_force_kills_the_work_horse_and_the_job_ends_cancelled(running_cancels):
    outcomes, _quick, _status, _worker, _home = running_cancels
    job, item = outcomes["force"]
    assert (item["was"], item["action"]) == ("started", "killed")
    assert job.meta["failure_reason"] == "cancelled" and "--force" in job.meta["failure_message"]


def test_the_worker_serves_the_next_job_after_both_cancels(running_cancels):
    _outcomes, quick, _status, worker, _home = running_cancels
    assert quick.get_status() == JobStatus.FINISHED
    assert worker.poll() is None


def test_status_lists_cancelled_jobs_with_their_reason(running_cancels):
    outcomes, _quick, status, _worker, _home = running_cancels
    reasons = {row["job_id"]: row["failure_reason"] for row in status["failed"]}
    assert {reasons[job.id] for job, _item in outcomes.values()} == {"cancelled"}


def test_cancelling_by_run_name_reads_the_run_index_not_every_queued_job(connection, demo_data):
    spec = load_spec(tiny_spec(demo_data))
    jobs = [publish_experiment(connection, spec, context={}) for _ in range(200)]
    before = connection.info("stats")["total_commands_processed"]
    [found] = find_jobs(connection, [jobs[100].meta["run_name"]])
    commands = connection.info("stats")["total_commands_processed"] - before - 1
    assert found.id == jobs[100].id
    assert commands < 10, commands  # a scan reads each of the 200 queued jobs

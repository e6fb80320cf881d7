"""Sharing the workers: fair share between owners, quotas and preemption, with real workers.

Each scenario runs two real worker processes (`python -m worker.process`) on a real redis-server
training timm's tiny test model; the rules themselves are unit-checked in tests/test_fair_share.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import redis
from rq.job import Job, JobStatus

from contracts.keys import RUNNING_KEY
from contracts.spec import load_spec
from publisher.queue import publish_context, publish_experiment
from tests.helpers import isolated_env, kill_worker, start_worker, tiny_spec, wait_for
from worker.quotas import set_quota

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# One torch thread per worker: two workers on two cores must not fight over them.
WORKER_ENV = {"RUNYARD_HEARTBEAT_TTL": "4", "RUNYARD_JANITOR_INTERVAL": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def cluster(redis_url, tmp_path):
    """Start named workers on one Redis; kill whatever is left at the end."""
    env = isolated_env(redis_url, tmp_path / "home") | WORKER_ENV
    workers: dict[str, object] = {}

    def start(*names: str) -> dict:
        for name in names:
            workers[name] = start_worker(env, name, tmp_path / f"{name}.log")
        beating = redis.Redis.from_url(redis_url)
        wait_for(lambda: all(beating.exists(f"runyard:heartbeat:{name}") for name in names), 60, "workers to beat")
        return workers

    yield start
    for process in workers.values():
        if process.poll() is None:
            kill_worker(process.pid)
            process.wait(10)
    for name in workers:
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text(), f"{name} logged a traceback"


def publish(connection: redis.Redis, demo_data: Path, owner: str, preemptible: bool = True, **spec) -> Job:
    experiment = load_spec(tiny_spec(demo_data, **spec))
    return publish_experiment(connection, experiment, context=publish_context(owner), preemptible=preemptible)


def wait_finished(jobs: list[Job], timeout: float) -> None:
    def all_done():
        statuses = [job.get_status(refresh=True) for job in jobs]
        assert JobStatus.FAILED not in statuses, [job.meta.get("failure_message") for job in jobs]
        return all(status == JobStatus.FINISHED for status in statuses)

    wait_for(all_done, timeout, "every job to finish", interval=0.5)
    for job in jobs:
        job.refresh()


def owner(job: Job) -> str:
    return job.meta["owner"]


def test_later_owners_start_before_the_flooding_owners_remaining_jobs(cluster, connection, demo_data):
    flood = [publish(connection, demo_data, "alice") for _ in range(12)]
    later = [publish(connection, demo_data, name) for name in ("bob", "carol") for _ in range(3)]
    cluster("box1-gpu0", "box2-gpu0")
    jobs = flood + later
    wait_finished(jobs, 400)

    by_start = [owner(job) for job in sorted(jobs, key=lambda job: job.started_at)]
    print("start order:", " ".join(name[0] for name in by_start))
    last_later = max(index for index, name in enumerate(by_start) if name != "alice")
    sixth_alice = [index for index, name in enumerate(by_start) if name == "alice"][5]
    assert last_later < sixth_alice, by_start  # bob's and carol's jobs did not wait for alice's flood
    assert all(job.meta["attempts"] == 1 for job in jobs)  # every job ran exactly once
    # Every GPU given back: the worker charges a job's last GPU time just after RQ marks it finished.
    wait_for(lambda: not connection.hlen(RUNNING_KEY), 15, "every job's GPU time charged and its entry dropped")
    usage = {key.decode(): float(value) for key, value in connection.hgetall("runyard:fairshare:usage").items()}
    assert set(usage) == {"alice", "bob", "carol"} and min(usage.values()) > 0


def test_an_owner_at_quota_1_never_runs_two_jobs_and_others_use_the_other_worker(cluster, connection, demo_data):
    set_quota(connection, "alice", 1)
    alice = [publish(connection, demo_data, "alice") for _ in range(3)]
    bob = [publish(connection, demo_data, "bob") for _ in range(2)]
    cluster("box1-gpu0", "box2-gpu0")
    wait_finished(alice + bob, 300)

    spans = sorted((job.started_at, job.ended_at) for job in alice)
    for (_, first_end), (second_start, _) in itertools.pairwise(spans):
        assert second_start >= first_end, "two of alice's jobs ran at once"
    assert any(b.started_at < a.ended_at and a.started_at < b.ended_at for a in alice for b in bob)


def test_a_high_job_preempts_a_running_job_but_never_a_no_preempt_one(cluster, connection, demo_data):
    # `low` would be stopped first (lowest priority), but it was published with --no-preempt.
    protected = publish(connection, demo_data, "alice", preemptible=False, priority="low", epochs=5)
    # Long enough that it cannot finish before the high job's preemption reaches it, even on a slow box.
    victim = publish(connection, demo_data, "bob", epochs=10)
    cluster("box1-gpu0", "box2-gpu0")
    wait_for(lambda: victim.refresh() or len(victim.meta.get("history") or []) >= 1, 120, "the victim's first epoch")
    assert protected.get_status(refresh=True) == JobStatus.STARTED
    urgent = publish(connection, demo_data, "carol", priority="high")

    wait_finished([protected, victim, urgent], 300)
    assert victim.meta["preempted_by"] == urgent.id
    [preemption] = victim.meta["preemptions"]
    assert preemption["by"] == urgent.id and preemption["after_epoch"] >= 1
    assert victim.meta["resumed_from_epoch"] >= 1  # it resumed from its checkpoint
    assert [row["epoch"] for row in victim.meta["history"]] == list(range(1, 11))  # an uninterrupted run's history
    assert victim.return_value()["epochs_completed"] == 10
    assert urgent.started_at < protected.ended_at  # the high job did not wait for a free worker
    assert "preemptions" not in protected.meta and protected.meta["attempts"] == 1

"""Which running job a waiting `high` job stops, on a real redis-server with real RQ worker records.

Each "busy worker" is an rq.Worker registered in Redis with an execution of a real job record
(what a worker writes when it starts a job), so worker.preemption reads the cluster a real
Preemptor would; tests/test_scheduling.py runs preemption end to end with training workers.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from worker.preemption import (
    may_preempt,
    preempt_for,
    preemption_request,
    queue_priority,
    set_queue_preemption,
)

QUEUES = ("high", "default", "low")


def running_job(connection: redis.Redis, name: str, queue_name: str, **meta) -> Job:
    """A job started on its own registered, busy worker (that serves high, default and low)."""
    queues = [Queue(queue, connection=connection, serializer=JSONSerializer) for queue in QUEUES]
    worker = Worker(queues, name=name, connection=connection, serializer=JSONSerializer)
    worker.register_birth()
    job = Queue(queue_name, connection=connection, serializer=JSONSerializer).enqueue_call(
        "worker.jobs.run_experiment", kwargs={"spec": {}}, meta={"owner": name} | meta
    )
    connection.lrem(f"rq:queue:{queue_name}", 1, job.id)  # taken
    worker.prepare_execution(job)  # what rq.Worker does as it starts the job
    worker.set_state("busy")
    started = datetime.now(timezone.utc) - timedelta(minutes=20)  # it has trained a while
    connection.hset(job.key, "started_at", utcformat(started))
    return job


def queue_high(connection: redis.Redis) -> Job:
    return Queue("high", connection=connection, serializer=JSONSerializer).enqueue_call(
        "worker.jobs.run_experiment", kwargs={"spec": {}}, meta={"owner": "dave"}
    )


def test_high_preempts_lower_priorities_of_its_own_pool_only():
    assert queue_priority("a100-high") == ("a100", "high") and queue_priority("default") == ("default", "normal")
    assert may_preempt("high", "low") and may_preempt("high", "default") and not may_preempt("high", "high")
    assert may_preempt("a100-high", "a100") and not may_preempt("a100-high", "default")
    assert not may_preempt("default", "low")


def test_the_lowest_priority_then_the_latest_checkpoint_is_stopped_once_per_high_job(connection):
    now = time.time()
    old_checkpoint = running_job(connection, "w1", "low", checkpoint_at=now - 600)
    fresh_checkpoint = running_job(connection, "w2", "low", checkpoint_at=now + 5)
    running_job(connection, "w3", "default", checkpoint_at=now + 5)
    high = queue_high(connection)

    assert preempt_for(connection, "high") == fresh_checkpoint.id
    assert preemption_request(connection, fresh_checkpoint.id)["by"] == high.id
    connection.delete(f"runyard:preempt:{fresh_checkpoint.id}")  # the victim stopped and requeued
    assert preempt_for(connection, "high") is None  # its worker takes the high job next: no second victim
    assert not connection.exists(f"runyard:preempt:{old_checkpoint.id}")


def test_no_preempt_jobs_preempted_jobs_without_a_new_epoch_and_protected_queues_are_spared(connection):
    running_job(connection, "w1", "low", preemptible=False)
    running_job(connection, "w2", "low", preempted_after_epoch=2, history=[{"epoch": 1}, {"epoch": 2}])
    spared_queue = running_job(connection, "w3", "default")
    set_queue_preemption(connection, "default", False)
    queue_high(connection)
    assert preempt_for(connection, "high") is None
    set_queue_preemption(connection, "default", True)
    assert preempt_for(connection, "high") == spared_queue.id


def test_nothing_is_preempted_while_a_worker_serving_the_queue_is_idle(connection):
    running_job(connection, "w1", "low")
    idle = Worker([Queue("high", connection=connection)], name="idle-one", connection=connection)
    idle.register_birth()
    idle.set_state("idle")
    queue_high(connection)
    assert preempt_for(connection, "high") is None

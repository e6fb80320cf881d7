"""The abandoned-job sweep against real Redis state: exactly one requeue, a crash limit, no false alarms.

`abandon()` leaves in Redis exactly what a runyard worker leaves when it is killed mid-job: RQ's
started registry entry, execution record and `started` status, the worker listed in
runyard:workers, and no heartbeat (it has expired).
"""

from __future__ import annotations

import json
import threading

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.keys import WORKERS_KEY, heartbeat_key, requeue_counter_key
from publisher.queue import publish_experiment
from tests.helpers import run_cli, tiny_spec
from trainer.spec import load_spec
from worker.janitor import requeue_abandoned, requeue_job
from worker.job import AllowListedJob
from worker.process import RunyardWorker


def abandon(connection: redis.Redis, worker_name: str, runyard_worker: bool = True) -> tuple[Job, str]:
    """Dequeue the next job as `worker_name` and leave it started, as a worker killed mid-job does."""
    queue = Queue("default", connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
    worker = RunyardWorker(["default"], name=worker_name, connection=connection)
    job, _queue = Queue.dequeue_any(
        [queue], None, connection=connection, job_class=AllowListedJob, serializer=JSONSerializer
    )
    execution = worker.prepare_execution(job)
    with connection.pipeline() as pipeline:
        job.prepare_for_execution(worker_name, pipeline)
        pipeline.execute()
    if runyard_worker:
        connection.hset(WORKERS_KEY, worker_name, json.dumps({"host": "box1", "pid": 1}))
    return job, execution.id


def publish(connection: redis.Redis, demo_data, **meta) -> Job:
    job = publish_experiment(connection, load_spec(tiny_spec(demo_data)), context={}, **meta)
    return job


def test_many_janitors_racing_for_one_abandoned_job_requeue_it_exactly_once(redis_url, connection, demo_data):
    job = publish(connection, demo_data)
    abandon(connection, "box1-gpu0")
    start = threading.Barrier(8)
    outcomes = []

    def janitor(index: int):
        own = redis.Redis.from_url(redis_url)
        start.wait()
        outcomes.extend(requeue_abandoned(own, by=f"janitor-{index}"))

    threads = [threading.Thread(target=janitor, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    [outcome] = outcomes
    assert (outcome.job_id, outcome.action, outcome.requeues, outcome.worker) == (job.id, "requeued", 1, "box1-gpu0")
    assert connection.lrange("rq:queue:default", 0, -1) == [job.id.encode()]  # once, not eight times
    assert connection.zcard("rq:wip:default") == 0
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED and job.meta["requeues"] == 1
    assert int(connection.get(requeue_counter_key(job.id))) == 1


def test_a_worker_that_still_beats_keeps_its_job(connection, demo_data):
    publish(connection, demo_data)
    job, _execution = abandon(connection, "box1-gpu0")
    connection.set(heartbeat_key("box1-gpu0"), "{}", ex=15)
    assert requeue_abandoned(connection, by="janitor") == []
    assert job.get_status(refresh=True) == JobStatus.STARTED


def test_jobs_of_workers_that_are_not_runyards_are_left_to_rq(connection, demo_data):
    publish(connection, demo_data)
    job, _execution = abandon(connection, "plain-rq-worker", runyard_worker=False)
    assert requeue_abandoned(connection, by="janitor") == []
    assert job.get_status(refresh=True) == JobStatus.STARTED


def test_a_job_whose_worker_died_more_than_max_requeues_times_fails_as_crashed(redis_url, connection, demo_data):
    job = publish(connection, demo_data, max_requeues=1)
    abandon(connection, "box1-gpu0")
    [first] = requeue_abandoned(connection, by="janitor")
    abandon(connection, "box2-gpu0")
    [second] = requeue_abandoned(connection, by="janitor")

    assert (first.action, second.action) == ("requeued", "failed")
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["failure_reason"] == "crashed"
    assert "2 crashes, more than its max_requeues of 1" in job.meta["failure_message"]
    assert [entry["worker"] for entry in job.meta["requeue_log"]] == ["box1-gpu0", "box2-gpu0"]
    status = json.loads(run_cli("runyard", "status", "--json").stdout)
    [row] = status["failed"]
    assert row["job_id"] == job.id and row["failure_reason"] == "crashed"


def test_a_shutdown_requeue_is_not_counted_as_a_crash(connection, demo_data):
    job = publish(connection, demo_data)
    _job, execution_id = abandon(connection, "box1-gpu0")
    outcome = requeue_job(
        connection, job.id, "default", execution_id, reason="worker stopped", by="box1-gpu0", count=False
    )
    assert outcome.action == "requeued" and outcome.requeues == 0
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED and job.meta["requeues"] == 0
    assert connection.get(requeue_counter_key(job.id)) is None


def test_a_worker_restarted_under_the_same_name_takes_back_its_predecessors_job_at_once(connection, demo_data):
    job = publish(connection, demo_data)
    abandon(connection, "box1-gpu0")
    connection.set(heartbeat_key("box1-gpu0"), "{}", ex=15)  # the new process already beats
    [outcome] = requeue_abandoned(connection, by="box1-gpu0", dead_names=frozenset({"box1-gpu0"}))
    assert outcome.job_id == job.id and job.get_status(refresh=True) == JobStatus.QUEUED


def test_a_finished_jobs_leftover_registry_entry_is_cleared_without_requeueing(connection, demo_data):
    job = publish(connection, demo_data)
    abandon(connection, "box1-gpu0")
    job.set_status(JobStatus.FINISHED)
    assert requeue_abandoned(connection, by="janitor") == []
    assert connection.zcard("rq:wip:default") == 0 and connection.llen("rq:queue:default") == 0


def test_runyard_janitor_once_reports_what_it_requeued(redis_url, connection, demo_data):
    job = publish(connection, demo_data)
    abandon(connection, "box1-gpu0")
    result = run_cli("runyard", "janitor", "--once", "--json")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert json.loads(line) | {"reason": None} == {
        "job_id": job.id,
        "run_name": job.meta["run_name"],
        "queue": "default",
        "worker": "box1-gpu0",
        "action": "requeued",
        "requeues": 1,
        "reason": None,
    }

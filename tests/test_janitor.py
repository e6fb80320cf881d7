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
from contracts.spec import load_spec
from publisher.queue import publish_experiment
from tests.helpers import run_cli, tiny_spec, wait_for
from worker.allow_listed_job import AllowListedJob
from worker.janitor import LEASE_KEY, Janitor, lease_ttl_ms, requeue_abandoned, requeue_job
from worker.rq_worker import RunyardWorker


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


def test_one_janitor_of_a_fleet_holds_the_sweepers_lease_until_it_stops(connection):
    janitors = [Janitor(connection, f"box{index}-gpu0") for index in range(4)]
    assert [janitor.take_lease() for janitor in janitors] == [True, False, False, False]
    assert janitors[0].take_lease() and not janitors[1].take_lease()  # the holder renews; the others wait
    assert 0 < connection.pttl(LEASE_KEY) <= lease_ttl_ms(janitors[0].interval)
    janitors[1].release_lease()  # not its lease: nothing happens
    assert not janitors[2].take_lease()
    janitors[0].release_lease()
    assert janitors[2].take_lease() and not janitors[0].take_lease()


def test_a_sweepers_lease_lapses_when_it_dies_and_another_janitor_takes_over(connection):
    first, second = Janitor(connection, "box1-gpu0"), Janitor(connection, "box2-gpu0")
    first.interval = second.interval = 0.2  # a 0.5 s lease
    assert first.take_lease() and not second.take_lease()
    wait_for(second.take_lease, 5, "the lease to pass on")  # first never renews: it was killed
    assert not first.take_lease()


def test_a_sweep_reads_the_fleet_in_a_few_round_trips(connection, demo_data):
    for index in range(6):
        publish(connection, demo_data)
        abandon(connection, f"box{index}-gpu0")
    for index in range(6, 40):  # idle workers that beat
        connection.hset(WORKERS_KEY, f"box{index}-gpu0", json.dumps({"host": "box", "pid": 1}))
        connection.set(heartbeat_key(f"box{index}-gpu0"), "{}", ex=60)
    before = connection.info("stats")["total_commands_processed"]
    assert len(requeue_abandoned(connection, by="janitor")) == 6
    commands = connection.info("stats")["total_commands_processed"] - before
    # The reads are pipelined (a round trip carries many commands), but the count is what the
    # server does: O(started jobs + workers), here < 30 per requeued job plus one per worker.
    assert commands < 6 * 30 + 40 + 20, commands

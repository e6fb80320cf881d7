"""Job records no worker can read are quarantined, never fatal: at dequeue, at start-up, in the janitor.

Anyone with Redis access can leave a record RQ cannot read: a teammate saving meta through plain
RQ (pickle), garbage bytes, a key of the wrong Redis type, a hash missing fields. One module
fixture sets all of them up at once, then runs `runyard janitor --once` and `worker --cpu
--workers 2 --burst`: two real worker processes racing for the bad records, the first under the
name of the dead worker that left some of them started. Each bad
record must be moved aside under runyard:refused:<job> with its reason and listed by `runyard
status`; the good jobs, including those abandoned next to the bad ones, must still finish.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.spec import load_spec
from publisher.queue import publish_experiment
from tests.helpers import isolated_env, run_cli, tiny_spec
from worker.allow_listed_job import REFUSED_KEY, refused_records
from worker.heartbeat import WORKERS_KEY
from worker.jobs import RUN_EXPERIMENT
from worker.rq_worker import RunyardWorker

RESTARTED = "box1-cpu0"  # died with jobs started; restarted under the same name (with box1-cpu1 beside it)
OTHER_BOX = "box2-gpu0"  # died too; `runyard janitor` sweeps its jobs


@dataclass
class Swept:
    connection: redis.Redis
    queued: dict[str, str]  # label -> job id, bad records waiting in the queue
    restarted: dict[str, str]  # bad records left started by RESTARTED
    janitored: dict[str, str]  # bad records left started by OTHER_BOX
    good: list[Job]
    janitor: subprocess.CompletedProcess
    worker: subprocess.CompletedProcess
    status: dict
    status_text: str


def leave_started(connection: redis.Redis, job: Job, worker_name: str) -> None:
    """Leave `job` started by `worker_name`, as a worker killed mid-job does (see tests/test_janitor.py)."""
    connection.lrem(Queue(job.origin, connection=connection).key, 0, job.id)
    RunyardWorker([job.origin], name=worker_name, connection=connection).prepare_execution(job)
    with connection.pipeline() as pipeline:
        job.prepare_for_execution(worker_name, pipeline)
        pipeline.execute()


def meta_saved_by_plain_rq(connection: redis.Redis, job: Job) -> None:
    """What a teammate's `Job.fetch(id, connection)` (RQ's default pickle serializer) + save_meta() leaves."""
    plain = Job.fetch(job.id, connection=connection)
    plain.meta = {"note": "looked at it"}
    plain.save_meta()
    assert connection.hget(job.key, "meta").startswith(b"\x80")  # pickle, not JSON


def as_string(connection: redis.Redis, job: Job) -> None:
    connection.delete(job.key)
    connection.set(job.key, "done, see slack")


def as_list(connection: redis.Redis, job: Job) -> None:
    connection.delete(job.key)
    connection.rpush(job.key, "a", "b")


QUEUED = {
    "meta pickled by plain RQ": (meta_saved_by_plain_rq, "it is pickled, as plain RQ"),
    "meta of garbage bytes": (lambda c, j: c.hset(j.key, "meta", b"\x00\xfe{not json"), "its meta is not JSON"),
    "meta that is a JSON list": (lambda c, j: c.hset(j.key, "meta", b"[1, 2]"), "its meta is JSON list, not an object"),
    "record stored as a string": (as_string, "a string, not a hash"),
    "record stored as a list": (as_list, "a list, not a hash"),
    "hash without data": (lambda c, j: c.hdel(j.key, "data"), "no `data` field"),
    "unparseable created_at": (lambda c, j: c.hset(j.key, "created_at", "yesterday"), "does not match format"),
}
STARTED = {
    "started job with meta pickled by plain RQ": (meta_saved_by_plain_rq, "it is pickled, as plain RQ"),
    "started job stored as a string": (as_string, "a string, not a hash"),
}


@pytest.fixture(scope="module")
def swept(redis_server, demo_data, tmp_path_factory) -> Swept:
    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    queue = Queue("default", connection=connection, serializer=JSONSerializer)
    spec = load_spec(tiny_spec(demo_data))

    def poison(label: str, damage) -> str:
        job = queue.enqueue_call(RUN_EXPERIMENT, kwargs={"spec": tiny_spec(demo_data)}, description=label)
        damage(connection, job)
        return job.id

    def started_poison(label: str, damage, worker_name: str) -> str:
        job = queue.enqueue_call(RUN_EXPERIMENT, kwargs={"spec": tiny_spec(demo_data)}, description=label)
        leave_started(connection, job, worker_name)
        damage(connection, job)
        return job.id

    good = []
    # RESTARTED is not in runyard:workers (it never beat), so only its own restart sweeps its jobs.
    restarted = {label: started_poison(label, damage, RESTARTED) for label, (damage, _) in STARTED.items()}
    good.append(publish_experiment(connection, spec, context={}))
    leave_started(connection, good[-1], RESTARTED)
    connection.hset(WORKERS_KEY, OTHER_BOX, json.dumps({"host": "box2", "pid": 1}))
    janitored = {label: started_poison(label, damage, OTHER_BOX) for label, (damage, _) in STARTED.items()}
    good.append(publish_experiment(connection, spec, context={}))
    leave_started(connection, good[-1], OTHER_BOX)
    connection.zadd("rq:wip:default", {b"\xff\xfe not utf-8": 1})
    # RQ's own key for RESTARTED has expired (its box took minutes to come back): the name is free.
    connection.delete(f"rq:worker:{RESTARTED}")

    home = tmp_path_factory.mktemp("poison")
    env = isolated_env(redis_server, home) | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    janitor = run_cli("runyard", "janitor", "--once", "--json", env=env, timeout=60)

    queued = {label: poison(label, damage) for label, (damage, _) in QUEUED.items()}
    good.append(publish_experiment(connection, spec, context={}))
    worker = run_cli("worker", "--cpu", "--workers", "2", "--name", "box1", "--burst", env=env, timeout=300)
    status = run_cli("runyard", "status", "--json", env=env)
    status_text = run_cli("runyard", "status", env=env | {"COLUMNS": "200"})
    for job in good:
        job.refresh()
    return Swept(
        connection,
        queued,
        restarted,
        janitored,
        good,
        janitor,
        worker,
        json.loads(status.stdout),
        status_text.stdout,
    )


def _assert_quarantined(swept: Swept, job_id: str, expected: str) -> None:
    assert not swept.connection.exists(Job.key_for(job_id))
    assert swept.connection.exists(f"{REFUSED_KEY}:{job_id}")  # kept for a post-mortem
    [record] = [record for record in refused_records(swept.connection, 100) if record["job_id"] == job_id]
    assert expected in record["reason"], record
    assert record["queue"] == "default"
    for key in ("rq:queue:default", "rq:queue:default:intermediate"):
        assert job_id.encode() not in swept.connection.lrange(key, 0, -1)
    assert not any(entry.startswith(job_id.encode()) for entry in swept.connection.zrange("rq:wip:default", 0, -1))


@pytest.mark.parametrize("label", list(QUEUED))
def test_a_queued_record_no_worker_can_read_is_quarantined_with_its_reason(swept, label):
    _assert_quarantined(swept, swept.queued[label], QUEUED[label][1])


@pytest.mark.parametrize("label", list(STARTED))
def test_a_worker_restarted_under_a_dead_workers_name_quarantines_its_unreadable_jobs(swept, label):
    _assert_quarantined(swept, swept.restarted[label], STARTED[label][1])


@pytest.mark.parametrize("label", list(STARTED))
def test_runyard_janitor_quarantines_an_unreadable_abandoned_job(swept, label):
    job_id = swept.janitored[label]
    _assert_quarantined(swept, job_id, STARTED[label][1])
    outcomes = [json.loads(line) for line in swept.janitor.stdout.splitlines()]
    [outcome] = [outcome for outcome in outcomes if outcome["job_id"] == job_id]
    assert outcome["action"] == "quarantined" and STARTED[label][1] in outcome["reason"]


def test_runyard_janitor_never_tracebacks_and_still_requeues_the_good_job(swept):
    assert swept.janitor.returncode == 0, swept.janitor.stderr
    assert "Traceback" not in swept.janitor.stderr + swept.janitor.stdout
    outcomes = [json.loads(line) for line in swept.janitor.stdout.splitlines()]
    assert {"job_id": swept.good[1].id, "action": "requeued"}.items() <= next(
        outcome for outcome in outcomes if outcome["job_id"] == swept.good[1].id
    ).items()
    assert "not a job:execution entry" in swept.janitor.stderr  # a garbage registry entry: one warning line


def test_the_worker_survives_every_bad_record_and_finishes_every_good_job(swept):
    output = swept.worker.stdout + swept.worker.stderr
    assert swept.worker.returncode == 0, output[-3000:]  # the worst of both processes' exit codes
    assert "box1-cpu0 listening" in output and "box1-cpu1 listening" in output
    assert "Traceback" not in output and "unhandled exception" not in output
    assert [job.get_status() for job in swept.good] == [JobStatus.FINISHED] * 3, output[-3000:]


def test_runyard_status_lists_every_quarantined_record_with_its_reason(swept):
    listed = {row["job_id"]: row["reason"] for row in swept.status["quarantined"]}
    every = {**swept.queued, **swept.restarted, **swept.janitored}
    assert set(every.values()) <= set(listed)
    assert "quarantined" in swept.status_text
    assert swept.queued["record stored as a string"] in swept.status_text


def test_a_worker_that_stops_unexpectedly_exits_non_zero(redis_url, connection, tmp_path):
    # A queue key that is not a list: every dequeue fails, and RQ's loop quits (returning normally).
    connection.set("rq:queue:broken", "a queue key that is not a list")
    worker = run_cli(
        "worker", "--cpu", "--queues", "broken", "--burst", "--name", "w", env=isolated_env(redis_url, tmp_path)
    )
    output = worker.stdout + worker.stderr
    assert worker.returncode == 1, output[-2000:]  # so that Restart=on-failure restarts it
    assert "stopped unexpectedly" in output

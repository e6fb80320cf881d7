"""A job JobBatch writes is the job RQ's own enqueue_many writes: same hash, same queue, same run.

publisher.job_batch builds job hashes from a template instead of RQ's per-job path and relies on
two RQ internals (the `data` layout, what enqueueing adds); these tests hold it to RQ itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import zlib

from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from publisher.job_batch import JobBatch
from tests.helpers import BIN

# Timestamps differ between any two enqueues; everything else must not.
TIMES = ("created_at", "enqueued_at")


def options(job_id: str, number: int) -> dict:
    return {
        "job_id": job_id,
        "description": f"run-{number}",
        "meta": {"run_name": f"run-{number}", "params": {"lr": number / 10}},
        "timeout": 600,
        "result_ttl": 3600,
        "failure_ttl": 7200,
        "retry": Retry(max=2),
    }


def comparable(job_hash: dict) -> dict:
    """The hash without its timestamps, its payload and meta as the JSON values they load to
    (compressed at another level, and written without spaces when orjson is installed)."""
    job_hash = {key: value for key, value in job_hash.items() if key.decode() not in TIMES}
    return job_hash | {b"data": json.loads(zlib.decompress(job_hash[b"data"])), b"meta": json.loads(job_hash[b"meta"])}


def write_both(connection, count: int = 3) -> tuple[list[str], list[str]]:
    """`count` jobs through JobBatch on queue `batch`, the same through RQ on queue `rq`."""
    batch, prepared = JobBatch(connection), []
    for number in range(count):
        batch.add("batch", "builtins.dict", {"number": number, "name": "x"}, options(f"b{number}", number))
        prepared.append(
            Queue.prepare_data("builtins.dict", kwargs={"number": number, "name": "x"}, **options(f"r{number}", number))
        )
    with connection.pipeline() as pipeline:
        batch.write(pipeline)
        Queue("rq", connection=connection, serializer=JSONSerializer).enqueue_many(prepared, pipeline=pipeline)
        pipeline.execute()
    return [f"b{number}" for number in range(count)], [f"r{number}" for number in range(count)]


def test_a_batch_job_hash_equals_the_one_rq_enqueue_many_writes(connection):
    ours, theirs = write_both(connection)
    for mine, rqs in zip(ours, theirs, strict=True):
        written, expected = connection.hgetall(Job.key_for(mine)), connection.hgetall(Job.key_for(rqs))
        expected[b"origin"] = b"batch"  # the one field the queue's name sets
        assert comparable(written) == comparable(expected)
        assert set(written) == set(expected)
    assert connection.lrange("rq:queue:batch", 0, -1) == [job_id.encode() for job_id in ours]
    assert {b"rq:queue:batch", b"rq:queue:rq"} <= connection.smembers("rq:queues")


def test_a_batch_job_loads_with_job_fetch_as_rq_made_it(connection):
    ours, _ = write_both(connection, count=2)
    job = Job.fetch(ours[1], connection=connection, serializer=JSONSerializer)
    assert (job.func_name, list(job.args), job.kwargs) == ("builtins.dict", [], {"number": 1, "name": "x"})
    assert (job.description, job.meta) == ("run-1", {"run_name": "run-1", "params": {"lr": 0.1}})
    assert (job.get_status(), job.origin, job.retries_left, job.timeout) == (JobStatus.QUEUED, "batch", 2, 600)
    assert (job.result_ttl, job.failure_ttl) == (3600, 7200)
    assert Queue("batch", connection=connection, serializer=JSONSerializer).job_ids == ours


def test_rq_info_lists_batch_jobs_and_a_stock_rq_worker_runs_them_as_it_runs_its_own(connection, redis_url):
    ours, theirs = write_both(connection, count=2)
    info = subprocess.run(
        [str(BIN / "rq"), "info", "--serializer", "json", "-u", redis_url, "batch", "rq"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    assert re.search(r"^batch +\|\S* 2, 0 executing", info.stdout, re.M), info.stdout
    worker = subprocess.run(
        [str(BIN / "rq"), "worker", "--burst", "--serializer", "json", "-u", redis_url, "batch", "rq"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 0, worker.stderr
    for mine, rqs in zip(ours, theirs, strict=True):
        job = Job.fetch(mine, connection=connection, serializer=JSONSerializer)
        reference = Job.fetch(rqs, connection=connection, serializer=JSONSerializer)
        assert job.get_status() == reference.get_status() == JobStatus.FINISHED
        assert job.return_value() == reference.return_value() == {"number": int(mine[1:]), "name": "x"}

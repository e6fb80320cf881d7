"""Writing many RQ jobs of one shape at once: the hash RQ builds for the first, varied for the rest.

RQ's per-job path (Queue.enqueue_many: create a Job, check its serializer against a runtime
Protocol twice, `to_dict`, then HSET status, HSET the hash and RPUSH its id) costs ~0.15 ms of
CPU a job, more than everything else a search publish does. The jobs of a search chunk differ
only in their id, payload (`data`), `description` and `meta`: `JobBatch` asks RQ once per queue
for a job's hash (Queue.create_job + Job.to_dict, public API), then writes each job as that hash
with those four fields replaced, one HSET a job and one RPUSH per queue for the chunk.

Two things it relies on are RQ internals (listed in the README's "RQ internals runyard relies
on"; tests/test_job_batch.py checks both against rq's own enqueue): the layout of `data`, the
JSON serializer's dump of `(func_name, instance, args, kwargs)` compressed with zlib, as
`Job.data` and `Job.to_dict` write it (written here by orjson when installed: the same JSON
values); and what enqueueing adds besides the hash (the queue's
list, the `rq:queues` set, `enqueued_at`), as `Queue._enqueue_async_job` does it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from worker.queue_index import index_jobs

# The fields each job sets itself; everything else is the template's (origin, status, TTLs, retries).
OWN_FIELDS = ("data", "description", "meta")


def _json_bytes() -> Callable[[Any], bytes]:
    """JSON as bytes: orjson when installed (`runyard[search]`; ~10x faster than json for a job's
    payload), else json. Both load with RQ's JSONSerializer (json.loads): orjson writes no spaces,
    and would write NaN as null, which a payload never holds (every float of a spec is bounded)."""
    try:
        import orjson
    except ImportError:
        return lambda value: json.dumps(value).encode()
    return orjson.dumps


json_bytes = _json_bytes()


class JobBatch:
    """The jobs of one chunk, written by `write(pipeline)` as RQ's own job hashes; `add` adds one."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection
        self._templates: dict[str, dict[str, Any]] = {}  # queue name -> a job hash RQ built
        self._jobs: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # queue name -> (job id, hash)
        self._now = datetime.now(timezone.utc)
        self._owners: dict[str, str] = {}  # job id -> its owner, for the queue's owner index

    def add(self, queue_name: str, func_name: str, kwargs: dict[str, Any], options: dict[str, Any]) -> None:
        """Add a job to `queue_name`: `options` as for Queue.prepare_data (job_id, description, meta, ...).

        Options other than job_id, description and meta must be the same for every job of a queue
        in the batch (they come from its first job).
        """
        template = self._templates.get(queue_name)
        if template is None:
            template = self._templates[queue_name] = self._template(queue_name, func_name, kwargs, options)
        payload = json_bytes((func_name, None, (), kwargs))  # what JSONSerializer.dumps of the tuple loads to
        job_hash = template | {
            # Level 1: a third less CPU than zlib's default for ~5% more bytes; RQ decompresses any level.
            "data": zlib.compress(payload, 1),
            "description": options["description"],
            "meta": json_bytes(options["meta"]),
        }
        self._jobs.setdefault(queue_name, []).append((options["job_id"], job_hash))
        self._owners[options["job_id"]] = str(options["meta"].get("owner") or "")

    def write(self, pipeline: redis.client.Pipeline) -> None:
        """Queue the batch's commands on `pipeline` (its caller executes it, with whatever else belongs there)."""
        for queue_name, jobs in self._jobs.items():
            for job_id, job_hash in jobs:
                pipeline.hset(Job.key_for(job_id), mapping=job_hash)
            queue_key = Queue.redis_queue_namespace_prefix + queue_name
            pipeline.sadd(Queue.redis_queues_keys, queue_key)
            pipeline.rpush(queue_key, *[job_id for job_id, _ in jobs])
            index_jobs(pipeline, queue_name, [(job_id, self._owners[job_id]) for job_id, _ in jobs])  # fair share

    def _template(
        self, queue_name: str, func_name: str, kwargs: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        """The hash RQ writes for a job of `queue_name` with these options, as Queue.enqueue_many would."""
        queue = Queue(queue_name, connection=self.connection, serializer=JSONSerializer)
        job = queue.create_job(func_name, kwargs=kwargs, status=JobStatus.QUEUED, **options)
        job.created_at = job.enqueued_at = self._now  # what Queue._prepare_for_queue sets before saving
        template = job.to_dict()
        template["enqueued_at"] = utcformat(self._now)
        return {key: value for key, value in template.items() if key not in OWN_FIELDS}

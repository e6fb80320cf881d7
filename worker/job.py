"""An RQ Job that only ever imports runyard's own entry points.

Plain RQ imports and calls whatever `func_name` a payload in Redis names (`os.system` included),
and imports callbacks the same way. Workers use this class instead: a job naming anything outside
worker.jobs.ENTRY_POINTS / CALLBACKS, with arguments its entry point does not take, or with a
payload that is not runyard's JSON fails with a clear reason (`spec_error`) and the worker goes
on serving. A job whose Redis record cannot even be read is refused at dequeue time and moved
aside (`quarantine`), where plain RQ would stop the worker.

Nothing a worker reads from Redis is unpickled: `forbid_pickle` makes RQ's default (pickle)
serializer refuse, so a code path that forgot the JSON serializer fails instead of running code.
"""

from __future__ import annotations

import inspect
import json
import logging
import time

import redis
import rq.serializers
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.utils import import_attribute

from contracts.job_meta import set_failure
from contracts.keys import REFUSED_KEY, refused_job_key
from worker.jobs import CALLBACKS, ENTRY_POINTS

REFUSED_KEPT = 200
QUARANTINE_TTL_S = 30 * 24 * 3600

log = logging.getLogger("runyard.worker")


class RefusedJob(RuntimeError):
    """The job names a function runyard does not run."""


class RefusedPayload(RefusedJob, DeserializationError):
    """The job's data or record is not something runyard wrote (garbage, pickle, a broken hash).

    It is also a DeserializationError so that RQ's failure handling, which guards against
    unreadable payloads, stays on its tracks.
    """


class AllowListedJob(Job):
    @property
    def func(self):
        name = self.func_name
        if self.instance is not None or name not in ENTRY_POINTS:
            self._refuse(
                f"refused to run {name!r}: runyard workers only run {', '.join(sorted(ENTRY_POINTS))} "
                "(publish experiments with `publish` or `schedule-search`)"
            )
        for callback in (self._success_callback_name, self._failure_callback_name, self._stopped_callback_name):
            if callback and callback not in CALLBACKS:
                self._refuse(f"refused callback {callback!r}: runyard workers only call {sorted(CALLBACKS) or 'none'}")
        function = import_attribute(name)
        try:
            inspect.signature(function).bind(*self.args, **self.kwargs)
        except TypeError as error:
            self._refuse(
                f"refused payload for {name}: its arguments do not fit {name}{inspect.signature(function)} ({error})"
            )
        if not isinstance(self.kwargs.get("spec", {}), dict):
            self._refuse(f"refused payload for {name}: `spec` must be a JSON object of spec fields")
        return function

    @property
    def success_callback(self):
        _check_callback(self._success_callback_name)
        return super().success_callback

    @property
    def failure_callback(self):
        _check_callback(self._failure_callback_name)
        return super().failure_callback

    @property
    def stopped_callback(self):
        _check_callback(self._stopped_callback_name)
        return super().stopped_callback

    def _deserialize_data(self):
        try:
            super()._deserialize_data()
            if not (isinstance(self._args, list | tuple) and isinstance(self._kwargs, dict)):
                raise ValueError("arguments are not [list, object]")
        except (DeserializationError, ValueError) as error:
            cause = error.__cause__ or error
            self._refuse(
                f"refused payload of job {self.id}: it is not runyard's JSON "
                f"({type(cause).__name__}: {str(cause)[:120]}); publish with `publish` or `schedule-search`",
                RefusedPayload,
            )

    def restore(self, raw_data):
        try:
            return super().restore(raw_data)
        except NoSuchJobError:
            raise
        except Exception as error:
            raise RefusedPayload(
                f"refused job {self.id}: its Redis record is malformed ({type(error).__name__}: {error})"
            ) from error

    def _refuse(self, reason: str, kind: type[RefusedJob] = RefusedJob):
        """Fail this job for good with `reason` as a spec_error (no retry can fix a bad payload)."""
        self.retries_left = 0
        if "unserialized" in self.meta:  # unreadable meta: start a fresh one
            self.meta = {}
        set_failure(self.meta, "spec_error", reason)
        try:
            self.save_meta()
            self.connection.hset(self.key, "retries_left", 0)
        except redis.RedisError:
            pass  # the refusal still stands; only its record is missing
        raise kind(reason)


def _check_callback(name: str | None) -> None:
    if name and name not in CALLBACKS:
        raise RefusedJob(f"refused callback {name!r}: runyard workers only call {sorted(CALLBACKS) or 'none'}")


def _refuse_pickle(data: bytes, /, *args, **kwargs):
    raise DeserializationError("runyard never unpickles data read from Redis (pickle serializer refused)")


def forbid_pickle() -> None:
    """Make RQ's default pickle serializer refuse to load, in this process and its forks."""
    rq.serializers.DefaultSerializer.loads = staticmethod(_refuse_pickle)


def quarantine(connection: redis.Redis, error: RefusedJob) -> None:
    """Move a job record that cannot be read out of RQ's way, keeping it for a post-mortem.

    RQ attaches `job_id` and `queue` to an error raised while fetching a dequeued job.
    """
    job_id = getattr(error, "job_id", None)
    queue = getattr(error, "queue", None)
    if job_id is None:
        raise error
    record = {"job_id": job_id, "queue": getattr(queue, "name", None), "reason": str(error), "at": time.time()}
    with connection.pipeline() as pipeline:
        if connection.exists(Job.key_for(job_id)):
            pipeline.rename(Job.key_for(job_id), refused_job_key(job_id))
            pipeline.expire(refused_job_key(job_id), QUARANTINE_TTL_S)
        if queue is not None:
            pipeline.lrem(IntermediateQueue.get_intermediate_queue_key(queue.key), 0, job_id)
        pipeline.lpush(REFUSED_KEY, json.dumps(record))
        pipeline.ltrim(REFUSED_KEY, 0, REFUSED_KEPT - 1)
        pipeline.execute()
    log.error("%s; moved to %s", error, refused_job_key(job_id))


def refused_records(connection: redis.Redis, limit: int = 20) -> list[dict]:
    """The latest job records workers refused to read, newest first."""
    return [json.loads(raw) for raw in connection.lrange(REFUSED_KEY, 0, limit - 1)]

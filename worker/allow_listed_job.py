"""An RQ Job that only ever imports runyard's own entry points.

Plain RQ imports and calls whatever `func_name` a payload in Redis names (`os.system` included),
and imports callbacks the same way. Workers use this class instead: a job naming anything outside
worker.jobs.ENTRY_POINTS / CALLBACKS, with arguments its entry point does not take, or with a
payload that is not runyard's JSON fails with a clear reason (`spec_error`) and the worker goes
on serving. A job whose Redis record cannot even be read (not a hash, no `data`, a meta that is
not a JSON object, fields RQ cannot parse) is refused wherever a worker or janitor fetches it and
moved aside with the reason (`quarantine`, listed by `runyard status`), where plain RQ would stop
the worker.

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
from rq.queue import Queue
from rq.registry import StartedJobRegistry
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


def malformed(job_id: str, reason: str) -> RefusedPayload:
    """The error for a record that cannot be read, carrying its job id (as RQ's dequeue does)."""
    error = RefusedPayload(f"refused job {job_id}: its Redis record is malformed ({reason})")
    error.job_id = job_id
    return error


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

    def refresh(self):
        try:
            return super().refresh()
        except redis.ResponseError as error:  # WRONGTYPE: the key holds a string, a list...
            kind = self.connection.type(self.key).decode()
            raise malformed(self.id, f"a {kind}, not a hash ({error})") from error

    def restore(self, raw_data):
        if b"data" not in raw_data:  # RQ would drop the job silently, leaving it "queued"
            raise malformed(self.id, "no `data` field: nothing says what to run")
        try:
            restored = super().restore(raw_data)
        except NoSuchJobError:
            raise
        except Exception as error:
            raise malformed(self.id, f"{type(error).__name__}: {error}") from error
        raw_meta = raw_data.get(b"meta")
        if raw_meta:  # RQ keeps an unreadable meta as {"unserialized": ...}; every update would then fail
            try:
                meta = json.loads(raw_meta)
            except ValueError as error:
                if raw_meta.startswith(b"\x80"):  # pickle's protocol marker
                    raise malformed(
                        self.id,
                        "its meta is not JSON: it is pickled, as plain RQ's default serializer writes it "
                        "(read and write runyard's jobs with serializer=JSONSerializer)",
                    ) from None
                raise malformed(self.id, f"its meta is not JSON ({type(error).__name__}: {str(error)[:80]})") from None
            if not isinstance(meta, dict):
                raise malformed(self.id, f"its meta is JSON {type(meta).__name__}, not an object")
        return restored

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


def quarantine(connection: redis.Redis, job_id: str, reason: str, queue_name: str | None = None) -> None:
    """Move a job record that cannot be read out of RQ's way, keeping it and `reason` for a post-mortem.

    The record goes to runyard:refused:<job id> (whatever its Redis type), the job id leaves
    `queue_name`'s list, its intermediate list and its started registry, and a line with the
    reason joins runyard:refused (what `runyard status` lists).
    """
    record = {"job_id": job_id, "queue": queue_name, "reason": reason, "at": time.time()}
    with connection.pipeline() as pipeline:
        if connection.exists(Job.key_for(job_id)):
            pipeline.rename(Job.key_for(job_id), refused_job_key(job_id))
            pipeline.expire(refused_job_key(job_id), QUARANTINE_TTL_S)
        if queue_name is not None:
            queue_key = f"{Queue.redis_queue_namespace_prefix}{queue_name}"
            pipeline.lrem(queue_key, 0, job_id)
            pipeline.lrem(IntermediateQueue.get_intermediate_queue_key(queue_key), 0, job_id)
            started = StartedJobRegistry(queue_name, connection=connection).key
            entries = [entry for entry in connection.zrange(started, 0, -1) if entry.startswith(f"{job_id}:".encode())]
            if entries:
                pipeline.zrem(started, *entries)
        pipeline.lpush(REFUSED_KEY, json.dumps(record))
        pipeline.ltrim(REFUSED_KEY, 0, REFUSED_KEPT - 1)
        pipeline.execute()
    log.error("%s; moved to %s", reason, refused_job_key(job_id))


def quarantine_unreadable(connection: redis.Redis, error: Exception) -> None:
    """Quarantine the job a fetch failed on; RQ attaches `job_id` and `queue` to a dequeue's error."""
    job_id = getattr(error, "job_id", None)
    if job_id is None:
        raise error
    reason = str(error) if isinstance(error, RefusedJob) else f"refused job {job_id}: RQ cannot read its record"
    if not isinstance(error, RefusedJob):
        reason += f" ({type(error).__name__}: {str(error)[:200]})"
    quarantine(connection, job_id, reason, getattr(getattr(error, "queue", None), "name", None))


def refused_records(connection: redis.Redis, limit: int = 20) -> list[dict]:
    """The latest job records workers refused to read, newest first."""
    return [json.loads(raw) for raw in connection.lrange(REFUSED_KEY, 0, limit - 1)]

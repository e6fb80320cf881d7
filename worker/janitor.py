"""The abandoned-job sweep: jobs whose worker died go back on their queue, exactly once.

A job is abandoned when RQ lists it as started by a runyard worker whose heartbeat
(worker.heartbeat) has lapsed. Every worker runs a `Janitor` thread, also while it trains, and
`runyard janitor` does the same on a box without workers. Every JANITOR_INTERVAL seconds
(default 10, jittered by 20%) each asks for the sweeper's lease (one Redis key, SET NX PX, renewed
by its holder); only the holder sweeps, with pipelined reads (O(started jobs + workers) commands
in a few round trips). So the fleet's cost grows with the number of workers W, not W². With the
default 15 s heartbeat a kill -9 is undone within ~25 s; if the dead worker held the lease, the
next janitor takes it within 2.5 intervals (~40 s in all).

Requeueing is one Redis transaction (WATCH the job, its requeue counter and the dead worker's
heartbeat; MULTI; EXEC): when several janitors find the same job, exactly one EXEC succeeds and
the others see their watch broken. A crash counts against the job's `max_requeues` (meta,
default 3); past it the job fails with reason `crashed`. A warm shutdown's requeue is not a crash
and is not counted. The job goes back to the front of its queue and resumes from its checkpoint.
A job whose record cannot be read is quarantined (worker.allow_listed_job), never requeued and never fatal
to the sweep: the other jobs are still requeued.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now, parse_composite_key

from contracts.job_meta import DEFAULT_MAX_REQUEUES, read_job_meta, set_failure, update_job_meta
from contracts.keys import JANITOR_LEASE_KEY, WORKERS_KEY, heartbeat_key, requeue_counter_key
from worker.allow_listed_job import AllowListedJob, RefusedPayload, quarantine
from worker.fair_share import FairShareQueue
from worker.heartbeat import REDIS_ERRORS, Heartbeat, heartbeat_ttl, known_workers

REQUEUE_LOG_LENGTH = 20
COUNTER_TTL_S = 60 * 24 * 3600
LEASE_KEY = JANITOR_LEASE_KEY
LEASE_INTERVALS = 2.5  # the lease outlives 2 of its holder's longest waits (1 + JITTER intervals)
JITTER = 0.2

# Take the sweeper's lease (SET NX PX) or, when this janitor holds it, renew it (PEXPIRE).
# KEYS: lease; ARGV: janitor name, TTL in ms. Returns 1 when this janitor is the sweeper.
LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
RELEASE_LEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

log = logging.getLogger("runyard.janitor")


def janitor_interval() -> float:
    """Seconds between sweeps (RUNYARD_JANITOR_INTERVAL, default 10)."""
    value = os.environ.get("RUNYARD_JANITOR_INTERVAL", "")
    try:
        return max(0.2, float(value)) if value else 10.0
    except ValueError:
        return 10.0


@dataclass
class Abandoned:
    """A started job whose worker no longer beats."""

    job_id: str
    queue: str
    execution_id: str
    worker: str


@dataclass
class Requeued:
    """What a janitor did with one job: `requeued`, `failed` (reason crashed) past the limit, or
    `quarantined` (its record cannot be read)."""

    job_id: str
    run_name: str | None
    queue: str
    worker: str
    action: str
    requeues: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def started_entries(connection: redis.Redis) -> list[tuple[str, str, str, str | None]]:
    """(queue, job id, execution id, worker name) of every started job, in a few pipelined round trips."""
    queue_names = [queue.name for queue in Queue.all(connection=connection, serializer=JSONSerializer)]
    with connection.pipeline(transaction=False) as pipeline:
        for name in queue_names:
            pipeline.zrange(StartedJobRegistry(name, connection=connection).key, 0, -1)
        registries = pipeline.execute()
    entries = []
    for name, members in zip(queue_names, registries, strict=True):
        for entry in members:
            try:
                entries.append((name, *parse_composite_key(entry.decode())))
            except ValueError:  # not RQ's job:execution text: no job to requeue, and RQ's registry reads fail on it
                registry_key = StartedJobRegistry(name, connection=connection).key
                connection.zrem(registry_key, entry)
                log.warning("removed %r from %s: not a job:execution entry", entry, registry_key)
    if not entries:
        return []
    with connection.pipeline(transaction=False) as pipeline:
        for _queue, job_id, execution_id in entries:
            # The worker running one execution: the execution's record, else the job's last worker.
            pipeline.hget(Execution(execution_id, job_id, connection).key, "worker_name")
            pipeline.hget(Job.key_for(job_id), "worker_name")
        # A record that is not a hash reads as no worker here; its requeue quarantines it.
        names = [name if isinstance(name, bytes) else None for name in pipeline.execute(raise_on_error=False)]
    found = []
    for index, (queue_name, job_id, execution_id) in enumerate(entries):
        name = names[2 * index] or names[2 * index + 1]
        found.append((queue_name, job_id, execution_id, name.decode(errors="replace") if name else None))
    return found


def beating(connection: redis.Redis, names: set[str]) -> set[str]:
    """Which of `names` have a heartbeat now (one pipelined round trip)."""
    ordered = sorted(names)
    with connection.pipeline(transaction=False) as pipeline:
        for name in ordered:
            pipeline.exists(heartbeat_key(name))
        return {name for name, alive in zip(ordered, pipeline.execute(), strict=True) if alive}


def find_abandoned(
    connection: redis.Redis,
    dead_names: frozenset[str] = frozenset(),
    entries: list[tuple[str, str, str, str | None]] | None = None,
) -> list[Abandoned]:
    """Started jobs of runyard workers without a heartbeat (and of `dead_names`, whatever they say)."""
    workers = known_workers(connection)
    entries = started_entries(connection) if entries is None else entries
    # Not a runyard worker's job (or no way to tell): RQ's own expiry handles it.
    ours = [entry for entry in entries if entry[3] is not None and (entry[3] in workers or entry[3] in dead_names)]
    alive = beating(connection, {entry[3] for entry in ours if entry[3] not in dead_names})
    return [
        Abandoned(job_id, queue_name, execution_id, worker)
        for queue_name, job_id, execution_id, worker in ours
        if worker in dead_names or worker not in alive
    ]


def requeue_job(
    connection: redis.Redis,
    job_id: str,
    queue_name: str,
    execution_id: str,
    *,
    reason: str,
    by: str,
    count: bool,
    dead_worker: str | None = None,
) -> Requeued | None:
    """Put one started job back at the front of its queue in a single transaction.

    `count` charges it as a crash against the job's max_requeues (over the limit it fails with
    reason `crashed` instead). With `dead_worker`, nothing happens if that worker beats again
    before EXEC. Returns None when another janitor (or the job's own worker) got there first.
    """
    watched = [Job.key_for(job_id), requeue_counter_key(job_id)]
    if dead_worker:
        watched.append(heartbeat_key(dead_worker))
    with connection.pipeline() as pipeline:
        try:
            pipeline.watch(*watched)
            found = _still_abandoned(connection, pipeline, job_id, queue_name, execution_id, dead_worker)
            if not isinstance(found, tuple):
                return found  # None (nothing to do) or a quarantine
            job, execution = found
            outcome, limit = _requeue_or_fail(pipeline, job, execution, queue_name, reason, by, count, dead_worker)
        except redis.WatchError:
            return None
    _log_outcome(outcome, count, limit)
    return outcome


def _still_abandoned(
    connection: redis.Redis,
    pipeline: redis.client.Pipeline,
    job_id: str,
    queue_name: str,
    execution_id: str,
    dead_worker: str | None,
) -> tuple[Job, Execution] | Requeued | None:
    """The job and its execution, read under WATCH, if the job still waits for a requeue.

    None when it does not (handled already, its worker beats again, or it ended: then its stale
    registry entry is removed); a `quarantined` outcome when its record cannot be read.
    """
    composite = f"{job_id}:{execution_id}"
    wip_key = StartedJobRegistry(queue_name, connection=connection).key
    if pipeline.zscore(wip_key, composite) is None:
        return None  # already handled
    if dead_worker and pipeline.exists(heartbeat_key(dead_worker)):
        return None  # it is alive after all
    try:
        job = AllowListedJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except RefusedPayload as error:
        pipeline.reset()
        quarantine(connection, job_id, str(error), queue_name)
        return Requeued(job_id, None, queue_name, dead_worker or "", "quarantined", 0, str(error))
    except Exception:
        job = None
    execution = Execution(execution_id, job_id, connection)
    worker = pipeline.hget(execution.key, "worker_name")
    execution.worker_name = worker.decode() if worker else ""
    status = job.get_status(refresh=False) if job is not None else None
    queued_already = status == JobStatus.QUEUED and pipeline.lpos(_queue_of(job).key, job_id) is not None
    if status not in (JobStatus.STARTED, JobStatus.QUEUED) or queued_already:
        # The job ended, vanished or is queued again: only its registry entry was left behind.
        pipeline.multi()
        pipeline.zrem(wip_key, composite)
        pipeline.execute()
        return None
    return job, execution


def _queue_of(job: Job) -> Queue:
    """The queue `job` came from (and goes back to), on the connection it was fetched with."""
    # A FairShareQueue: the requeue also puts the job in its owner index (worker.queue_index).
    return FairShareQueue(job.origin, connection=job.connection, serializer=JSONSerializer)


def _requeue_or_fail(
    pipeline: redis.client.Pipeline,
    job: Job,
    execution: Execution,
    queue_name: str,
    reason: str,
    by: str,
    count: bool,
    dead_worker: str | None,
) -> tuple[Requeued, int]:
    """Requeue `job` at the front of its queue, or fail it as `crashed` past its max_requeues (MULTI, EXEC).

    Returns what was done and the job's max_requeues.
    """
    requeues = int(pipeline.get(requeue_counter_key(job.id)) or 0) + (1 if count else 0)
    meta = read_job_meta(job.meta, job.id)
    limit = DEFAULT_MAX_REQUEUES if meta.max_requeues is None else meta.max_requeues
    give_up = count and requeues > limit
    queue = _queue_of(job)
    queue.get_redis_server_version()  # a read: done before MULTI buffers everything
    entry = {"at": time.time(), "by": by, "worker": dead_worker or execution.worker_name, "reason": reason}
    log_entries = [*(meta.requeue_log or []), entry | {"counted": count}][-REQUEUE_LOG_LENGTH:]
    update_job_meta(job.meta, requeues=requeues, requeue_log=log_entries)

    pipeline.multi()
    execution.delete(job=job, pipeline=pipeline)
    if give_up:
        _fail_as_crashed(pipeline, job, f"{reason}; {requeues} crashes, more than its max_requeues of {limit}")
    else:
        job.started_at = None
        job.ended_at = None
        # RQ's own requeue paths (Job.retry, registry cleanup) enqueue through this method too;
        # it only buffers writes, so it joins this transaction.
        queue._enqueue_job(job, pipeline=pipeline, at_front=True)
    if count:
        pipeline.set(requeue_counter_key(job.id), requeues, ex=COUNTER_TTL_S)
    pipeline.execute()
    action = "failed" if give_up else "requeued"
    return Requeued(job.id, meta.run_name, queue_name, entry["worker"], action, requeues, reason), limit


def _fail_as_crashed(pipeline: redis.client.Pipeline, job: Job, message: str) -> None:
    """Buffer (after MULTI) the writes that end `job` as failed with reason `crashed`."""
    set_failure(job.meta, "crashed", f"{message} (publish --max-requeues)")
    job.ended_at = now()
    pipeline.hset(job.key, "meta", job.serializer.dumps(job.meta))
    record_job_failure(job, f"crashed: {job.meta['failure_message']}", pipeline)


def _log_outcome(outcome: Requeued, count: bool, limit: int) -> None:
    log.warning(
        "%s job %s (%s) of worker %s: %s%s",
        outcome.action,
        outcome.job_id,
        outcome.run_name or "-",
        outcome.worker or "?",
        outcome.reason,
        f" [crash {outcome.requeues}/{limit}]" if count else "",
    )


def requeue_abandoned(connection: redis.Redis, by: str, dead_names: frozenset[str] = frozenset()) -> list[Requeued]:
    """One sweep: requeue (or fail as `crashed`) every abandoned job; returns what was done."""
    entries = started_entries(connection)
    done = []
    for abandoned in find_abandoned(connection, dead_names, entries):
        try:
            outcome = requeue_job(
                connection,
                abandoned.job_id,
                abandoned.queue,
                abandoned.execution_id,
                reason=f"worker {abandoned.worker} stopped beating",
                by=by,
                count=True,
                dead_worker=None if abandoned.worker in dead_names else abandoned.worker,
            )
        except REDIS_ERRORS:
            raise
        except Exception as error:  # one job's record must not keep the others from being requeued
            log.warning("job %s: not requeued: %s: %s", abandoned.job_id, type(error).__name__, error)
            continue
        if outcome is not None:
            done.append(outcome)
    forget_dead_workers(connection, busy={entry[3] for entry in entries})
    return done


def forget_dead_workers(connection: redis.Redis, busy: set[str | None] | None = None) -> None:
    """Drop workers without a heartbeat and without started jobs (`busy`) from runyard:workers."""
    if busy is None:
        busy = {entry[3] for entry in started_entries(connection)}
    idle = set(known_workers(connection)) - busy
    gone = idle - beating(connection, idle) if idle else set()
    if gone:
        connection.hdel(WORKERS_KEY, *gone)


def lease_ttl_ms(interval: float) -> int:
    """How long a sweeper's lease lasts: a few of its (jittered) intervals, so renewals never lapse."""
    return int(LEASE_INTERVALS * interval * 1000)


class Janitor(threading.Thread):
    """Sweeps for abandoned jobs every `interval` seconds from a daemon thread.

    It skips a sweep while its own `heartbeat` saw Redis fail within a TTL: after an outage
    every worker's beat may have lapsed, and they need one beat to come back.
    """

    def __init__(self, connection: redis.Redis, name: str, heartbeat: Heartbeat | None = None):
        super().__init__(name=f"janitor-{name}", daemon=True)
        self.connection = connection
        self.janitor_name = name
        self.heartbeat = heartbeat
        self.interval = janitor_interval()
        self.grace = heartbeat_ttl() + 1
        self.last_error: float | None = None
        self._stopping = threading.Event()
        self._failing = False

    def recently_failed(self) -> bool:
        if self.heartbeat is not None and self.heartbeat.recently_failed():
            return True
        return self.last_error is not None and time.monotonic() - self.last_error < self.grace

    def take_lease(self) -> bool:
        """Whether this janitor is the fleet's sweeper now: it held the lease and renewed it, or took it."""
        try:
            script = self.connection.register_script(LEASE_SCRIPT)
            return bool(script(keys=[LEASE_KEY], args=[self.janitor_name, lease_ttl_ms(self.interval)]))
        except REDIS_ERRORS:
            return False  # the sweep would fail too; the lease expires if this one held it

    def release_lease(self) -> None:
        """Give the lease up (if held), so another janitor takes over at its next interval."""
        with contextlib.suppress(*REDIS_ERRORS):  # else it expires by itself
            self.connection.register_script(RELEASE_LEASE_SCRIPT)(keys=[LEASE_KEY], args=[self.janitor_name])

    def sweep(self) -> list[Requeued]:
        """One sweep now, lease or not (an empty list while Redis has just been failing)."""
        if self.recently_failed():
            return []
        try:
            done = requeue_abandoned(self.connection, by=self.janitor_name)
            self._failing = False
            return done
        except REDIS_ERRORS as error:
            self.last_error = time.monotonic()
            if not self._failing:
                log.warning("janitor %s: Redis unreachable (%s)", self.janitor_name, str(error).splitlines()[0])
            self._failing = True
        except Exception:  # a bad record must not stop future sweeps
            log.exception("janitor %s: sweep failed", self.janitor_name)
        return []

    def next_wait(self) -> float:
        """One interval, jittered by +-JITTER so that a fleet started together spreads its lease calls."""
        return self.interval * random.uniform(1 - JITTER, 1 + JITTER)

    def run(self) -> None:
        # Start after one interval: at birth the worker sweeps its own predecessor's jobs itself.
        while not self._stopping.wait(self.next_wait()):
            if self.take_lease():
                self.sweep()
        self.release_lease()

    def stop(self) -> None:
        self._stopping.set()

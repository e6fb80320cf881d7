"""Riding out a Redis outage: RQ's loop ends quietly, the process reconnects, the worker gives back what it held.

While a job trains, an outage only costs log lines (the horse keeps training, the heartbeat thread
speaks for the worker). While idle, the worker's loop ends through `OutageWatch.end_loop`; the
process (runyard.cli.worker) waits for Redis with `wait_for_redis`, then `recover_after_outage` puts back
the job the worker had popped or was running, and a new worker starts under the same name.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NoReturn

import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from worker.connection import RedisUnavailable, connect, mask_url, patient_connection
from worker.fair_share import FairShareQueue
from worker.heartbeat import REDIS_ERRORS

if TYPE_CHECKING:
    from worker.rq_worker import RunyardWorker

RECONNECT_BACKOFF_S = (1, 2, 4, 8, 15, 30, 60)

log = logging.getLogger("runyard.worker")


class OutageWatch:
    """One worker's view of Redis going away: why its loop ended, and what it held at that moment."""

    def __init__(self, worker_name: str):
        self.worker_name = worker_name
        self.lost: BaseException | None = None  # why the work loop ended, when Redis was the reason
        self.unregistered_job: tuple[Job, Queue] | None = None  # popped, not yet started, when Redis went
        self.interrupted_job: tuple[Job, Queue, str] | None = None  # (job, queue, execution id) ditto, started
        self._warned = False

    def end_loop(self, error: BaseException) -> NoReturn:
        """End RQ's loop the way a stop does; the process then reconnects (runyard.cli.worker)."""
        self.lost = error
        raise StopRequested() from None

    @contextlib.contextmanager
    def ending_loop(self, unless_busy: bool = False) -> Iterator[None]:
        """Turn a Redis error inside the block into the end of the loop (`unless_busy`: swallow it)."""
        try:
            yield
        except REDIS_ERRORS as error:
            if not unless_busy:
                self.end_loop(error)
            # While a horse trains the loop must not end; the heartbeat thread speaks for the worker.

    def job_interrupted(self, job: Job, queue: Queue, execution_id: str | None, error: BaseException) -> NoReturn:
        """Redis went away around a job's execution: remember the job for recover_after_outage."""
        if execution_id is not None:
            self.interrupted_job = (job, queue, execution_id)
        else:
            self.unregistered_job = (job, queue)
        self.end_loop(error)

    def while_job_runs(self, job_id: str, *upkeep: Callable[[], None]) -> None:
        """Run each `upkeep` step (the worker's, while its horse trains); an outage is logged once, not raised."""
        try:
            for step in upkeep:
                step()
            if self._warned:
                log.info("%s: Redis is back", self.worker_name)
            self._warned = False
        except REDIS_ERRORS as error:
            if not self._warned:
                log.warning(
                    "%s: Redis unreachable while job %s runs (%s); still training", self.worker_name, job_id, error
                )
            self._warned = True


def wait_for_redis(url: str, reason: BaseException) -> redis.Redis:
    """Reconnect with backoff, one log line per try (URL masked, no traceback)."""
    shown = mask_url(url)
    for attempt in range(10**9):
        delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
        log.warning("lost Redis at %s (%s); reconnecting in %d s", shown, str(reason).splitlines()[0], delay)
        time.sleep(delay)
        try:
            connect(url, start_embedded=False)
        except RedisUnavailable as error:
            reason = error
            continue
        log.info("reconnected to Redis at %s", shown)
        return patient_connection(url)
    raise AssertionError("unreachable")


def recover_after_outage(connection: redis.Redis, worker: RunyardWorker) -> None:
    """Once Redis is back: give back what the worker held when it went away.

    A job it had popped but not started goes back on its queue; one whose execution it had
    started (its horse finished or died while Redis was down, the outcome unrecorded) is requeued
    to resume from its checkpoint, not charged as a crash. Its old registration is closed, so
    the next worker in this process reuses its name.
    """
    worker.connection = connection
    if worker.outage.unregistered_job is not None:
        restore_popped_job(connection, *worker.outage.unregistered_job)
    if worker.outage.interrupted_job is not None:
        job, queue, execution_id = worker.outage.interrupted_job
        worker.requeue(job.id, queue.name, execution_id, f"Redis went away while it ran on {worker.name}", count=False)
    with contextlib.suppress(*REDIS_ERRORS):
        worker.register_death()


def restore_popped_job(connection: redis.Redis, job: Job, queue: Queue) -> None:
    """Put back a job this worker popped but could not register before Redis went away."""
    try:
        status = connection.hget(job.key, "status")
        if status and status.decode() == JobStatus.QUEUED and connection.lpos(queue.key, job.id) is None:
            registry = StartedJobRegistry(queue.name, connection=connection)
            if not any(entry.decode().startswith(f"{job.id}:") for entry in connection.zrange(registry.key, 0, -1)):
                FairShareQueue(queue.name, connection=connection).push_job_id(job.id, at_front=True)  # indexed too
                log.info("put job %s back on %s: it was dequeued when Redis went away", job.id, queue.name)
    except REDIS_ERRORS:
        pass

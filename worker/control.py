"""Whether a running job should stop, asked by the trainer at every step boundary.

Three things stop a job early, each a reason from trainer.interrupt:
- shutdown: the worker got SIGTERM/SIGINT and sent its work horse SHUTDOWN_SIGNAL; the job
  keeps its checkpoint and goes back on the queue (worker.jobs returns RQ's Retry).
- cancelled: someone ran `runyard cancel`, which sets `runyard:cancel:<job id>` in Redis.
- lost: the job is no longer this horse's (a janitor requeued it, e.g. after a long Redis
  outage, or the worker process died): it stops without touching the job's state in Redis.

The signal costs nothing to check; Redis is asked at most once per CHECK_INTERVAL_S.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import redis
from rq.job import Job, JobStatus

from contracts.keys import cancel_key
from trainer.interrupt import CANCELLED, LOST, SHUTDOWN
from worker.embedded import NO_RETRY
from worker.heartbeat import REDIS_ERRORS, separate_client

SHUTDOWN_SIGNAL = signal.SIGUSR1
CHECK_INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 2.0
CANCEL_TTL_S = 30 * 24 * 3600

log = logging.getLogger("runyard.control")

# Set in the work horse as soon as it is forked: its worker's pid, and whether SHUTDOWN_SIGNAL came.
_worker_pid: int | None = None
_shutdown_requested = False


def request_cancel(connection: redis.Redis, job_id: str) -> None:
    """Ask a job to stop at its next step boundary (it is marked cancelled, its checkpoint kept)."""
    connection.set(cancel_key(job_id), time.time(), ex=CANCEL_TTL_S)


def install_shutdown_handler() -> None:
    """In a fresh work horse: turn SHUTDOWN_SIGNAL into a flag (its default action would kill)."""
    global _shutdown_requested, _worker_pid
    _shutdown_requested = False
    _worker_pid = os.getppid()

    def on_shutdown(_signum, _frame):
        global _shutdown_requested
        _shutdown_requested = True

    signal.signal(SHUTDOWN_SIGNAL, on_shutdown)


class JobControl:
    """The `should_stop` a job hands the trainer."""

    def __init__(self, job: Job | None):
        self.job = job
        self.worker_name = job.worker_name if job is not None else None
        self.parent_pid = _worker_pid or os.getppid()
        self._next_check = 0.0
        # A check must not hold training up while Redis is away: one quick try, no retries.
        self.redis = separate_client(job.connection, CHECK_TIMEOUT_S, NO_RETRY) if job is not None else None

    def should_stop(self, force: bool = False) -> str | None:
        """A reason to stop now, or None; `force` asks Redis even within CHECK_INTERVAL_S."""
        if _shutdown_requested:
            return SHUTDOWN
        if self.job is None:
            return None
        if os.getppid() != self.parent_pid:
            log.warning("job %s: its worker process died; stopping without a result", self.job.id)
            return LOST
        now = time.monotonic()
        if now < self._next_check and not force:
            return None
        self._next_check = now + CHECK_INTERVAL_S
        try:
            with self.redis.pipeline(transaction=False) as pipeline:
                pipeline.exists(cancel_key(self.job.id))
                pipeline.hmget(self.job.key, "status", "worker_name")
                cancelled, (status, worker) = pipeline.execute()
        except REDIS_ERRORS:
            return None  # Redis trouble is not a reason to stop training
        if cancelled:
            return CANCELLED
        if status is None or status.decode() != JobStatus.STARTED or (worker or b"").decode() != self.worker_name:
            log.warning("job %s was requeued while this worker ran it; stopping without a result", self.job.id)
            return LOST
        return None

"""Whether a running job should stop, asked by the trainer at every step and epoch boundary.

Three things stop a job early, each a reason from trainer.interrupt:
- shutdown: the worker got SIGTERM/SIGINT and sent its work horse SHUTDOWN_SIGNAL; the job
  keeps its checkpoint and goes back on the queue (worker.jobs returns RQ's Retry).
- cancelled: someone ran `runyard cancel`, which sets `runyard:cancel:<job id>` in Redis.
- preempted: a `high` job needs the GPU (worker.preemption sets `runyard:preempt:<job id>`); the
  job goes back on the queue like a shutdown. The request says where to stop: at the next step,
  or at the next epoch boundary (then the step checks let it train on).
- lost: the job is no longer this horse's (a janitor requeued it, e.g. after a long Redis
  outage, or the worker process died): it stops without touching the job's state in Redis.

The signal costs nothing to check; Redis is asked at most once per CHECK_INTERVAL_S, and always
at an epoch boundary (an epoch-boundary preemption must not miss it) and at the set-up boundary
(before the attempt trains anything: there a step or an epoch request stops it, nothing is lost).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import redis
from rq.job import Job, JobStatus

from contracts.job_meta import update_job_meta
from contracts.keys import cancel_key
from trainer.interrupt import CANCELLED, EPOCH_BOUNDARY, LOST, PREEMPTED, SHUTDOWN, STEP_BOUNDARY
from worker.embedded import NO_RETRY
from worker.heartbeat import REDIS_ERRORS, separate_client
from worker.preemption import preempt_key

SHUTDOWN_SIGNAL = signal.SIGUSR1
# A step stop waits up to this long for the request to be read (the `high` job's latency); one
# pipelined read of three keys per interval per running job is nothing for Redis.
CHECK_INTERVAL_S = 0.5
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
        # When the epoch now training began (its before-epoch call), and the attempt's set-up time
        # (start to the first epoch boundary): what a preemption throws away, and what it costs again.
        self.epoch_started_at: float | None = None
        self.setup_s: float | None = None
        # A check must not hold training up while Redis is away: one quick try, no retries.
        self.redis = separate_client(job.connection, CHECK_TIMEOUT_S, NO_RETRY) if job is not None else None

    def should_stop(self, force: bool = False, boundary: str = STEP_BOUNDARY) -> str | None:
        """A reason to stop now, or None; `force` asks Redis even within CHECK_INTERVAL_S."""
        reason = self._reason(force or boundary != STEP_BOUNDARY, boundary)
        if reason is None and boundary == EPOCH_BOUNDARY:
            self.epoch_started_at = time.time()
            if self.setup_s is None and self.job is not None and self.job.started_at is not None:
                self.setup_s = max(0.0, self.epoch_started_at - self.job.started_at.timestamp())
        if reason == PREEMPTED:
            now = time.time()
            redone = 0.0 if boundary != STEP_BOUNDARY or self.epoch_started_at is None else now - self.epoch_started_at
            setup_s = self.setup_s
            if boundary != STEP_BOUNDARY and setup_s is None and self.job.started_at is not None:
                # At the set-up's end or the attempt's first epoch boundary: all of it was set-up, paid again.
                setup_s = max(0.0, now - self.job.started_at.timestamp())
            # Read by worker.preemption.record_preemption in this process (the same Job object);
            # seen_at splits the victim's stop time into reading the request and winding down.
            update_job_meta(
                self.job.meta,
                preempt_stop={"boundary": boundary, "redone_s": redone, "setup_s": setup_s, "seen_at": now},
            )
        if reason is not None and self.job is not None:
            log.info("job %s: stopping at the %s boundary (%s)", self.job.id, boundary, reason)
        return reason

    def _reason(self, force: bool, boundary: str) -> str | None:
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
                pipeline.get(preempt_key(self.job.id))
                cancelled, (status, worker), preempted = pipeline.execute()
        except REDIS_ERRORS:
            return None  # Redis trouble is not a reason to stop training
        if cancelled:
            return CANCELLED
        if status is None or status.decode() != JobStatus.STARTED or (worker or b"").decode() != self.worker_name:
            log.warning("job %s was requeued while this worker ran it; stopping without a result", self.job.id)
            return LOST
        if preempted:
            try:
                stop_at = json.loads(preempted).get("stop_at", STEP_BOUNDARY)
            except (ValueError, AttributeError):
                stop_at = STEP_BOUNDARY  # a request nobody can read: stop as soon as possible
            if stop_at == EPOCH_BOUNDARY and boundary == STEP_BOUNDARY:
                return None  # asked to finish the epoch first (in set-up there is nothing to finish)
            return PREEMPTED
        return None

"""What a worker decides around each dequeue: wait for its GPU, move unreadable records aside, follow git.

rq.Worker takes its next job in `dequeue_job_and_maintain_ttl`; RunyardWorker asks each policy, in
order, before that call (a policy may block, or stop the worker), when the call raises (a policy
that dealt with the error lets the worker dequeue again) and after it returned a job (a policy may
put the job back and stop the worker). Which queued job comes next is not decided here but by the
queue class (worker.fair_share); the stop policy is in worker.shutdown.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job

from worker.allow_listed_job import quarantine_unreadable
from worker.code_version import CODE_DIR, fast_forward, loaded_code_state
from worker.gpu import GpuCheck
from worker.heartbeat import REDIS_ERRORS

Taken = tuple[Job, Queue]  # what rq's dequeue returns: the job and the queue it came from

log = logging.getLogger("runyard.worker")


class DequeuePolicy(Protocol):
    """One decision around rq.Worker's dequeue."""

    def before_dequeue(self) -> None:
        """Called before each dequeue; may block, or raise StopRequested to end the work loop."""

    def dequeue_failed(self, error: Exception) -> bool:
        """Whether this policy dealt with `error`, raised by the dequeue (then the worker dequeues again)."""

    def after_dequeue(self, taken: Taken) -> Taken:
        """Called with the job just taken; may put it back and raise StopRequested."""


def dequeue(policies: list[DequeuePolicy], take: Callable[[], Taken | None]) -> Taken | None:
    """`take()` (rq's dequeue) with each policy asked before it, when it raises, and after it returned a job."""
    while True:
        for policy in policies:
            policy.before_dequeue()
        try:
            taken = take()
        except REDIS_ERRORS:  # an outage: the worker's loop ends (worker.outage), no policy decides
            raise
        except Exception as error:
            if any(policy.dequeue_failed(error) for policy in policies):
                continue
            raise
        if taken is None:
            return None
        for policy in policies:
            taken = policy.after_dequeue(taken)
        return taken


class GpuPoliteness:
    """Take no job while other processes hold much of the pinned GPU's memory (worker.gpu)."""

    def __init__(self, gpu: GpuCheck | None, while_waiting: Callable[[], None]):
        self.gpu = gpu  # None on CPU workers and without NVML: never waits
        self.while_waiting = while_waiting

    @property
    def waiting(self) -> str | None:
        """Why the worker waits for its GPU now, for its heartbeat record; None when it does not."""
        return self.gpu.waiting if self.gpu is not None else None

    def before_dequeue(self) -> None:
        if self.gpu is not None:
            self.gpu.wait_until_free(self.while_waiting)

    def dequeue_failed(self, error: Exception) -> bool:
        return False

    def after_dequeue(self, taken: Taken) -> Taken:
        return taken


class Quarantine:
    """A job record nobody can read (worker.allow_listed_job) is moved aside; it must not stop the worker."""

    def __init__(self, connection: Callable[[], redis.Redis], worker_name: str):
        self.connection = connection  # the worker's current connection (it changes after an outage)
        self.worker_name = worker_name

    def before_dequeue(self) -> None:
        pass

    def dequeue_failed(self, error: Exception) -> bool:
        if getattr(error, "job_id", None) is None:  # not about one job's record: a real failure
            return False
        quarantine_unreadable(self.connection(), error)
        return True

    def after_dequeue(self, taken: Taken) -> Taken:
        return taken

    def maintenance_failed(self, error: Exception) -> None:
        """RQ's registry maintenance met `error`: quarantine the record it names, skip this round."""
        if getattr(error, "job_id", None) is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                quarantine_unreadable(self.connection(), error)
        log.warning("%s: registry maintenance skipped: %s: %s", self.worker_name, type(error).__name__, error)


class FollowGit:
    """With --follow-git, a job is only taken on the checkout's latest commit.

    The check runs after a job arrives, not before waiting: a worker idle for a day must not start
    that day's job on the code it started with. When the checkout moved, the job goes back to the
    front of its queue and the worker stops, `restart_requested`, so that runyard.cli.worker re-executes it.
    """

    def __init__(
        self,
        enabled: bool,
        connection: Callable[[], redis.Redis],
        worker_log: logging.Logger,
        checkout: Path = CODE_DIR,
        loaded_sha: Callable[[], str | None] = lambda: loaded_code_state()["git_sha"],
    ):
        self.enabled = enabled
        self.connection = connection
        self.log = worker_log  # RQ's worker logger: these lines read as the worker's own
        self.checkout = checkout
        self.loaded_sha = loaded_sha  # the commit whose code this process imported
        self.restart_requested = False

    def before_dequeue(self) -> None:
        pass

    def dequeue_failed(self, error: Exception) -> bool:
        return False

    def after_dequeue(self, taken: Taken) -> Taken:
        if not self.enabled:
            return taken
        job, queue = taken
        step = fast_forward(self.checkout)
        if step.error:
            self.log.warning(
                "follow-git: cannot fast-forward %s (%s); running the current code", self.checkout, step.error
            )
        loaded = self.loaded_sha()
        if not step.after or step.after == loaded:
            return taken
        self.log.info(
            "follow-git: code moved %s -> %s; putting job %s back and restarting",
            (loaded or "?")[:10],
            step.after[:10],
            job.id,
        )
        with self.connection().pipeline() as pipeline:
            pipeline.lrem(queue.intermediate_queue_key, 1, job.id)  # where a single-queue worker parks it
            queue.push_job_id(job.id, pipeline=pipeline, at_front=True)
            pipeline.execute()
        self.restart_requested = True
        raise StopRequested()

"""How a worker stops: asked while starting, while idle, or while its horse trains (warm, then at once).

- While starting (before RQ installs its signal handlers): the request is remembered and honoured
  before the first dequeue.
- While idle: RQ raises StopRequested from its signal handler, wherever the loop is; code that
  catches broadly (logging's handleError, for one) can swallow it, so the request is remembered
  too and checked before every dequeue.
- While a job trains, first signal: the horse is asked to stop at the next step boundary
  (worker.control); the job keeps its checkpoint and is requeued, not failed.
- Second signal: RQ kills the horse; the job is requeued to resume, not charged as a crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING

from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.utils import now

from worker.control import SHUTDOWN_SIGNAL
from worker.dequeue_policy import Taken

if TYPE_CHECKING:
    from worker.rq_worker import RunyardWorker

log = logging.getLogger("runyard.worker")


class StopPolicy:
    """A worker's stop requests; also a dequeue policy (no job is taken once a stop was asked for)."""

    def __init__(self, worker: RunyardWorker):
        self.worker = worker

    # rq.Worker keeps a stop request in `_stop_requested` (its loop checks it between jobs) and the
    # signal's time in `_shutdown_requested_date` (its cold-stop handler compares it). RQ has no
    # public way to ask for a stop outside its own signal handler, so runyard reads and sets them,
    # here only.
    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.worker._stop_requested

    def remember(self) -> None:
        """Record a stop request, so the loop and the dequeue honour it even if its raise went astray."""
        self.worker._stop_requested = True

    def install_early_handlers(self) -> None:
        """Catch SIGINT/SIGTERM until RQ installs its own handlers (after bootstrap)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop_before_work)

    def _stop_before_work(self, signum, frame) -> None:
        worker = self.worker
        if os.getpid() != worker.pid and worker.scheduler is not None:
            # RQ's scheduler process, forked from this worker, got the worker's stop (SIGTERM) before
            # it installed its own handlers: stop the scheduler, or the worker waits on it forever.
            worker.scheduler.request_stop()
            return
        log.info("%s: warm shut down requested while starting; stopping before taking a job", worker.name)
        worker._shutdown_requested_date = now()
        self.remember()

    def before_dequeue(self) -> None:
        if self.requested:  # asked while the raise from the signal handler went astray
            raise StopRequested()

    def dequeue_failed(self, error: Exception) -> bool:
        return False

    def after_dequeue(self, taken: Taken) -> Taken:
        return taken

    def ask_horse_to_stop(self) -> None:
        """First signal while a job trains: the horse stops at its next step boundary, keeping its checkpoint."""
        worker = self.worker
        if worker.horse_pid and worker.running:
            log.info(
                "%s: asking job %s to stop at the next step boundary; it will be requeued with its checkpoint "
                "(signal again to stop at once)",
                worker.name,
                worker.running[0].id,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.horse_pid, SHUTDOWN_SIGNAL)

    def requeue_after_cold_stop(self, running: Taken | None, execution: Execution | None) -> None:
        """Second signal: RQ killed the horse; its job goes back to resume, not charged as a crash."""
        if running is not None and execution is not None:
            job, queue = running
            self.worker.requeue(job.id, queue.name, execution.id, f"worker {self.worker.name} was stopped at once")

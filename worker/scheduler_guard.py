"""RQ's scheduler process, which RQ starts and joins but neither restarts when it dies nor times out.

RQ notices a dead scheduler only at its registry maintenance, every 10 minutes and never while a
job runs; a Redis outage ends the scheduler's loop with an error. `SchedulerGuard.keep_alive`
runs on the heartbeat thread's cadence instead. And RQ joins its scheduler without a time limit:
one that missed its stop would keep the worker from exiting, so `stop` kills it after a grace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from worker.heartbeat import REDIS_ERRORS

if TYPE_CHECKING:
    from worker.rq_worker import RunyardWorker

# How long a stopping worker waits for its RQ scheduler process before killing it.
SCHEDULER_STOP_GRACE_S = 10

log = logging.getLogger("runyard.worker")


class SchedulerGuard:
    """Restarts the worker's RQ scheduler process when it died; kills it when it misses a stop."""

    # RQScheduler._process (rq 3, see the pin in pyproject.toml) is the only handle RQ gives on the
    # scheduler's process: runyard reads and resets it here only.

    def __init__(self, worker: RunyardWorker):
        self.worker = worker
        self._stopping = False
        self._lock = threading.Lock()

    def keep_alive(self) -> None:
        """Restart RQ's scheduler process when it died (called after each heartbeat)."""
        worker = self.worker
        scheduler = worker.scheduler
        if scheduler is None or worker.burst or self._stopping or worker.stop_policy.requested:
            return
        process = scheduler._process
        if process is None or process.is_alive():
            return  # another worker's scheduler holds the locks, or ours is running
        log.warning(
            "%s: RQ's scheduler (pid %s) died with exit code %s; restarting it",
            worker.name,
            process.pid,
            process.exitcode,
        )
        with self._lock:
            if self._stopping:
                return
            scheduler._process = None
            try:
                scheduler.acquire_locks(auto_start=True)
            except REDIS_ERRORS as error:
                scheduler._process = process  # try again at the next beat
                log.warning("%s: scheduler not restarted yet: Redis unreachable (%s)", worker.name, error)

    def stop(self) -> None:
        """Stop RQ's scheduler process: SIGTERM, then a kill after SCHEDULER_STOP_GRACE_S.

        It holds nothing worth waiting for (its locks expire).
        """
        with self._lock:
            self._stopping = True
        scheduler = self.worker.scheduler
        process = scheduler._process if scheduler is not None else None
        if process is None or process.pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(SCHEDULER_STOP_GRACE_S)
        if process.is_alive():
            log.warning(
                "%s: RQ's scheduler (pid %d) did not stop in %d s; killing it",
                self.worker.name,
                process.pid,
                SCHEDULER_STOP_GRACE_S,
            )
            process.kill()
            process.join()

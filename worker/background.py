"""A worker's background threads, which keep going while its horse trains: heartbeat, janitor, preemptor.

They share one client of their own (never the forked horse's), whose socket timeout is short and
which does not retry: RQ stretches its connection's socket timeout past its blocking dequeue, and
a failed beat must be noticed at once (the janitor then holds off for a TTL, see worker.janitor;
the next beat is only seconds away anyway).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from worker.connection import separate_client
from worker.embedded import NO_RETRY
from worker.heartbeat import REDIS_ERRORS, Heartbeat
from worker.janitor import Janitor, requeue_abandoned
from worker.preemption import Preemptor

if TYPE_CHECKING:
    from worker.rq_worker import RunyardWorker

THREAD_SOCKET_TIMEOUT_S = 5

log = logging.getLogger("runyard.worker")


class BackgroundThreads:
    """Starts (at the worker's bootstrap) and stops (at its teardown) the threads beside its loop."""

    def __init__(self, worker: RunyardWorker):
        self.worker = worker
        self.heartbeat: Heartbeat | None = None
        self.janitor: Janitor | None = None
        self.preemptor: Preemptor | None = None

    def start(self) -> None:
        worker = self.worker
        connection = separate_client(worker.connection, THREAD_SOCKET_TIMEOUT_S, NO_RETRY)
        self.heartbeat = Heartbeat(connection, worker.name, self.details, after_beat=worker.scheduler_guard.keep_alive)
        self.heartbeat.beat()
        self.heartbeat.start()
        self._sweep_predecessor()
        self.janitor = Janitor(connection, worker.name, self.heartbeat)
        self.janitor.start()
        self.preemptor = Preemptor(connection, worker.name, worker.queue_names())
        self.preemptor.start()

    def _sweep_predecessor(self) -> None:
        """Requeue now, not after a heartbeat TTL, jobs still registered under this worker's name:
        they belong to a predecessor that died (names are unique among live workers)."""
        name = self.worker.name
        try:
            requeue_abandoned(self.worker.connection, by=name, dead_names=frozenset({name}))
        except REDIS_ERRORS:
            pass  # the janitor thread sweeps soon
        except Exception as error:  # a record nobody can read must not stop a worker at start-up
            log.warning("%s: start-up sweep skipped: %s: %s", name, type(error).__name__, error)

    def stop(self) -> None:
        if self.janitor is not None:
            self.janitor.stop()
        if self.preemptor is not None:
            self.preemptor.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop(forget=True)

    def details(self) -> dict:
        """What the heartbeat record tells about this worker: its horse, its job, why it waits."""
        worker = self.worker
        running = worker.running
        details = {"horse_pid": worker.horse_pid or None, "job_id": running[0].id if running else None}
        if worker.gpu_politeness.waiting:
            details["gpu_wait"] = worker.gpu_politeness.waiting  # why this idle worker takes no job
        return details

"""Job meta written from a background thread: a Redis outage never holds training up.

The work horse reports each epoch into its RQ job's meta (what `runyard status` shows). A
synchronous write retries for half a minute when Redis is away (the horse's connection is
patient, see worker.connection), and training waits for it. `MetaWriter` takes the latest meta
instead and writes it from a daemon thread on its own quick-failing client: while Redis is
down it keeps only the newest snapshot and retries every few seconds; once Redis is back that
snapshot lands. `flush()` before any synchronous meta write keeps an older snapshot from
landing after a newer one.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

from rq.job import Job

from worker.connection import separate_client
from worker.embedded import NO_RETRY
from worker.heartbeat import REDIS_ERRORS

# One quick try per write: a failed write is retried by the thread, not by redis-py.
WRITE_TIMEOUT_S = 3.0
RETRY_EVERY_S = 2.0
# How long the end of a job waits for the last snapshot before writing synchronously anyway.
FLUSH_TIMEOUT_S = 10.0

log = logging.getLogger("runyard.jobs")


class MetaWriter(threading.Thread):
    """Writes the newest meta snapshot of `job` to Redis, off the training thread."""

    def __init__(self, job: Job):
        super().__init__(name=f"meta-{job.id}", daemon=True)
        self.job = job
        self.redis = separate_client(job.connection, WRITE_TIMEOUT_S, NO_RETRY)
        self._pending: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._failing = False
        self.start()

    def submit(self, meta: dict[str, Any]) -> None:
        """Queue `meta` for writing (replacing any snapshot not written yet); never blocks."""
        with self._lock:
            self._pending = copy.deepcopy(meta)
            self._idle.clear()
        self._wake.set()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until the newest snapshot is written (True) or `timeout` passes (False, dropped)."""
        self._wake.set()
        written = self._idle.wait(timeout)
        if not written:
            with self._lock:
                self._pending = None  # the caller's synchronous write supersedes it
        return written

    def stop(self) -> None:
        """Flush, then end the thread."""
        self.flush()
        self._stopping = True
        self._wake.set()

    def run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                meta = self._pending
            if meta is None:
                self._idle.set()
                continue
            try:
                self.redis.hset(self.job.key, "meta", self.job.serializer.dumps(meta))
            except REDIS_ERRORS as error:
                if not self._failing:  # one line per outage
                    log.warning(
                        "job %s: progress kept until Redis is back (%s); training goes on",
                        self.job.id,
                        str(error).splitlines()[0] if str(error) else type(error).__name__,
                    )
                self._failing = True
                self._wake.wait(RETRY_EVERY_S)
                self._wake.set()
                continue
            if self._failing:
                log.info("job %s: Redis is back; progress written", self.job.id)
            self._failing = False
            with self._lock:
                if self._pending is meta:  # nothing newer arrived meanwhile
                    self._pending = None
                    self._idle.set()

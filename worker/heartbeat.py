"""Worker liveness under runyard's own keys: a short-lived key each worker keeps refreshing.

RQ's own worker key lives for minutes (and its started-job entries for 90 s past the last beat),
so a kill -9'd worker is noticed late. Each runyard worker process runs a `Heartbeat` thread
that rewrites `runyard:heartbeat:<worker name>` every HEARTBEAT_TTL/3 seconds with a TTL of
HEARTBEAT_TTL (default 15 s): once the key is gone, the worker is gone. The thread lives in the
worker's parent process, which only waits while its work horse trains, so a busy worker keeps
beating. `runyard:workers` lists the workers that beat, so a janitor never judges workers that
are not runyard's (a plain `rq worker` on the same Redis has no heartbeat to miss).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from contracts.keys import WORKERS_KEY, heartbeat_key
from worker.connection import separate_client  # noqa: F401  (worker.control imports it from here)

# A field runyard workers add to RQ's own worker hash: judge this one by its runyard heartbeat.
RUNYARD_MARK = "runyard_heartbeat"

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)

log = logging.getLogger("runyard.heartbeat")


def heartbeat_ttl() -> int:
    """Seconds a heartbeat lives (RUNYARD_HEARTBEAT_TTL, default 15)."""
    value = os.environ.get("RUNYARD_HEARTBEAT_TTL", "")
    return max(3, int(value)) if value.isdigit() else 15


def is_alive(connection: redis.Redis, worker_name: str) -> bool:
    """Whether `worker_name` has beaten within the heartbeat TTL."""
    return bool(connection.exists(heartbeat_key(worker_name)))


def known_workers(connection: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every runyard worker that has beaten and not stopped cleanly: name -> {host, pid, started}."""
    return {name.decode(): json.loads(raw) for name, raw in connection.hgetall(WORKERS_KEY).items()}


class Heartbeat(threading.Thread):
    """Keeps `runyard:heartbeat:<name>` alive from a daemon thread until `stop()`.

    `details()` adds what the worker is doing (its horse's pid, its job) to each beat, for
    `runyard status` and for whoever has to kill it. `last_error` is when Redis last failed:
    a janitor in this process waits a full TTL after that before judging others, because
    their beats failed too.
    """

    def __init__(
        self,
        connection: redis.Redis,
        worker_name: str,
        details: Callable[[], dict[str, Any]] | None = None,
        after_beat: Callable[[], None] | None = None,
    ):
        super().__init__(name=f"heartbeat-{worker_name}", daemon=True)
        self.connection = connection
        self.worker_name = worker_name
        self.details = details or dict
        self.after_beat = after_beat  # a duty of the worker on the same cadence, while idle or busy
        self.ttl = heartbeat_ttl()
        self.started_at = time.time()
        self.last_error: float | None = None
        self._stopping = threading.Event()
        self._failing = False

    def beat(self) -> None:
        """Write one heartbeat now."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started_at}
        value = json.dumps(info | {"at": time.time()} | self.details())
        with self.connection.pipeline(transaction=False) as pipeline:
            pipeline.set(heartbeat_key(self.worker_name), value, ex=self.ttl)
            pipeline.hset(WORKERS_KEY, self.worker_name, json.dumps(info))
            pipeline.execute()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.beat()
                if self._failing:
                    log.info("heartbeat of %s: Redis is back", self.worker_name)
                self._failing = False
            except REDIS_ERRORS as error:
                self.last_error = time.monotonic()
                if not self._failing:  # one line per outage, not one per beat
                    log.warning("heartbeat of %s: Redis unreachable (%s)", self.worker_name, _first_line(error))
                self._failing = True
            except Exception:  # a heartbeat must never take the worker down
                self.last_error = time.monotonic()
                log.exception("heartbeat of %s failed", self.worker_name)
            if self.after_beat is not None and not self._stopping.is_set():
                try:
                    self.after_beat()
                except Exception:
                    log.exception("heartbeat of %s: worker check failed", self.worker_name)
            self._stopping.wait(self.ttl / 3)

    def stop(self, forget: bool = True) -> None:
        """Stop beating; with `forget`, delete the key now (a clean exit is not a death)."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)
        if forget:
            try:
                with self.connection.pipeline(transaction=False) as pipeline:
                    pipeline.delete(heartbeat_key(self.worker_name))
                    pipeline.hdel(WORKERS_KEY, self.worker_name)
                    pipeline.execute()
            except REDIS_ERRORS:
                pass  # the key expires by itself

    def recently_failed(self) -> bool:
        """Whether Redis failed within the last TTL (others' beats may have lapsed meanwhile)."""
        return self.last_error is not None and time.monotonic() - self.last_error < self.ttl + 1


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]

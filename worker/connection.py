"""One way to reach Redis: REDIS_URL when set, else the embedded server under $RUNYARD_HOME.

Every client runyard makes comes from here: `connect` (checked, for commands), `patient_connection`
(a worker's, riding out a restart) and `separate_client` (a thread's own pool and timeout).
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from trainer.paths import runyard_home
from worker.embedded import NO_RETRY, EmbeddedRedis, EmbeddedRedisError

URL_SCHEMES = ("redis://", "rediss://", "unix://")
URL_FORMS = "redis://[:PASSWORD@]HOST:PORT/DB, rediss://... for TLS, or unix://[:PASSWORD@]/path/to/redis.sock?db=DB"
# Every Redis command of a worker (and of its work horse, which inherits the connection) retries
# for about half a minute, so a Redis restart passes unnoticed by a job that is finishing.
PATIENT_RETRY = Retry(ExponentialBackoff(cap=8, base=0.5), retries=7)


class RedisUnavailable(RuntimeError):
    """Redis cannot be used; str() is one line naming the (masked) URL and the fix."""


def mask_url(url: str) -> str:
    """Hide the password in a Redis URL: redis://:***@host:6379/0 (or ...?password=***).

    The user part ends at the URL's last `@`: an unencoded password may itself contain `@`.
    """
    url = re.sub(r"([?&]password=)[^&\s]*", r"\1***", url)
    scheme_end = url.find("://")
    at = url.partition("?")[0].rfind("@")
    if scheme_end < 0 or at < scheme_end:
        return url
    user = url[scheme_end + 3 : at]
    shown = f"{user.split(':', 1)[0]}:***" if ":" in user else "***"
    return f"{url[: scheme_end + 3]}{shown}{url[at:]}"


def check_url(url: str) -> None:
    """Refuse a REDIS_URL that redis-py would misread or choke on, with one line naming the fix."""
    shown = mask_url(url)

    def refuse(problem: str) -> RedisUnavailable:
        return RedisUnavailable(f"REDIS_URL {shown!r}: {problem}; use {URL_FORMS}")

    if not url.startswith(URL_SCHEMES):
        raise RedisUnavailable(f"REDIS_URL {shown!r} is not a Redis URL; use {URL_FORMS}")
    scheme, rest = url.split("://", 1)
    location, _, query = rest.partition("?")
    parts = urlsplit(f"{scheme}://{location.rsplit('@', 1)[-1]}?{query}")  # without the user part
    db_values = parse_qs(parts.query).get("db", [])
    if url.startswith("unix://"):
        if not parts.path:
            raise refuse("no socket path")
    else:
        try:
            port = parts.port
        except ValueError:
            port_text = parts.netloc.rsplit(":", 1)[-1]
            raise refuse(f"port {port_text!r} is not a number from 1 to 65535") from None
        if port == 0:
            raise refuse("port 0 is not a port a server listens on")
        path = parts.path.strip("/")
        if path:
            db_values = [path, *db_values]
    for value in db_values:
        if not value.isdigit():
            raise refuse(f"database {value!r} is not a number (databases are 0, 1, 2...)")


def embedded_server() -> EmbeddedRedis:
    return EmbeddedRedis(runyard_home() / "redis")


def redis_url(url: str | None = None, start_embedded: bool = True) -> str:
    """The URL to use: the argument, REDIS_URL, or the embedded server's (started if needed)."""
    url = url or os.environ.get("REDIS_URL")
    if url:
        check_url(url)
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


def patient_connection(url: str) -> redis.Redis:
    """A client for `url` whose commands ride out a Redis restart (see PATIENT_RETRY)."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, retry=PATIENT_RETRY)


def separate_client(connection: redis.Redis, socket_timeout: float, retry: Retry | None = None) -> redis.Redis:
    """A client to the same server with its own connection pool and socket timeout (and `retry`)."""
    pool = connection.connection_pool
    kwargs = dict(pool.connection_kwargs) | {"socket_timeout": socket_timeout}
    if retry is not None:
        kwargs["retry"] = retry
    return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))


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
        if "DB index is out of range" in str(error):
            db = connection.connection_pool.connection_kwargs.get("db")
            raise RedisUnavailable(
                f"REDIS_URL {shown!r}: database {db} does not exist on that server ({_databases(connection)}); "
                "use a database number below that in REDIS_URL"
            ) from None
        raise RedisUnavailable(f"Redis at {shown} refused the connection: {str(error).splitlines()[0]}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
        reason = str(error).split("\n")[0] or type(error).__name__
        reason = reason.replace(url, shown)
        raise RedisUnavailable(
            f"cannot reach Redis at {shown} ({reason}): start that server, fix REDIS_URL, "
            "or unset REDIS_URL to use the embedded Redis"
        ) from None


def _databases(connection: redis.Redis) -> str:
    """How many databases the server has, in words (CONFIG may be disabled on managed servers)."""
    pool = connection.connection_pool
    kwargs = dict(pool.connection_kwargs) | {"db": 0}
    try:
        db0 = redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))
        count = db0.config_get("databases").get("databases")
    except redis.RedisError:
        count = None
    if count is None:
        return "its `databases` setting could not be read; the default is 16, numbered 0 to 15"
    return f"it has {count}, numbered 0 to {int(count) - 1}"

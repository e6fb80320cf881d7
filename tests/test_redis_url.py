"""A REDIS_URL redis-py would misread or choke on is one clear line at every boundary, never a traceback.

Without these checks `.../abc` silently meant database 0, `:notaport` and `:65536` were
tracebacks from urllib, `/99` a ResponseError traceback, and masking showed the end of a
password that contains `@`.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import run_cli
from worker.connection import mask_url

BAD_URLS = {
    "database that is not a number": ("redis://127.0.0.1:6379/abc", "database 'abc' is not a number"),
    "database query that is not a number": ("unix:///tmp/redis.sock?db=two", "database 'two' is not a number"),
    "port that is not a number": ("redis://127.0.0.1:notaport/0", "port 'notaport' is not a number from 1 to 65535"),
    "port above 65535": ("redis://127.0.0.1:65536/0", "port '65536' is not a number from 1 to 65535"),
    "port 0": ("redis://127.0.0.1:0/0", "port 0 is not a port a server listens on"),
}


def _env(tmp_path, url: str) -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "REDIS_URL"} | {
        "REDIS_URL": url,
        "RUNYARD_HOME": str(tmp_path),
    }


def _one_error_line(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    [line] = [line for line in result.stderr.splitlines() if "REDIS_URL" in line]
    return line


@pytest.mark.parametrize("label", list(BAD_URLS))
def test_publish_refuses_a_bad_redis_url_in_one_line_naming_the_variable_and_the_fix(tmp_path, label):
    url, problem = BAD_URLS[label]
    line = _one_error_line(run_cli("publish", "--model", "resnet50", env=_env(tmp_path, url)))
    assert "REDIS_URL" in line and problem in line and "redis://[:PASSWORD@]HOST:PORT/DB" in line


@pytest.mark.parametrize("command", [("worker", "--cpu", "--burst"), ("runyard", "status"), ("runyard", "janitor")])
def test_every_command_refuses_a_bad_redis_url_the_same_way(tmp_path, command):
    line = _one_error_line(run_cli(*command, env=_env(tmp_path, "redis://127.0.0.1:6379/abc")))
    assert "REDIS_URL 'redis://127.0.0.1:6379/abc': database 'abc' is not a number" in line


def test_a_database_the_server_does_not_have_is_refused_with_the_servers_count(redis_server, tmp_path):
    url = f"{redis_server}?db=99"
    line = _one_error_line(run_cli("runyard", "status", env=_env(tmp_path, url)))
    assert "database 99 does not exist on that server (it has 16, numbered 0 to 15)" in line


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:p@ss@db.example:6379/0", "redis://:***@db.example:6379/0"),
        ("redis://:a@b@c@db.example/0", "redis://:***@db.example/0"),
        ("unix://:p@ss@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://user:p@ss@db.example/0?password=x@y", "redis://user:***@db.example/0?password=***"),
    ],
)
def test_masking_hides_all_of_a_password_that_contains_an_at_sign(url, shown):
    assert mask_url(url) == shown


def test_a_bad_url_with_a_password_is_refused_without_showing_any_of_it(tmp_path):
    result = run_cli("publish", "--model", "resnet50", env=_env(tmp_path, "redis://:hunter@2@127.0.0.1:65536/0"))
    line = _one_error_line(result)
    assert "redis://:***@127.0.0.1:65536/0" in line
    assert "hunter" not in result.stdout + result.stderr and "@2@" not in line

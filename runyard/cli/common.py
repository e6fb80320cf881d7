"""What every command shares: click's context settings, the console, `fail`, connecting to Redis."""

from __future__ import annotations

import re
import sys

import click
from rich.console import Console

from worker.connection import RedisUnavailable, connect

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
USAGE_ERROR = 2


def console(stderr: bool = False) -> Console:
    """A rich console; when output goes to a pipe or file, wide enough that tables are not cut."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def fail(message: str, code: int = USAGE_ERROR) -> None:
    """Print `error: message` (each line) on stderr and exit; 2 is bad input, 1 is everything else."""
    for line in message.splitlines():
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


def connect_or_fail():
    try:
        return connect()
    except RedisUnavailable as error:
        fail(str(error), code=1)


def parse_duration(text: str) -> int:
    """'90m', '48h', '2d' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if not match or int(match.group(1)) == 0:
        raise click.BadParameter(f"{text!r} is not a duration like 3600, 90m, 48h or 2d", param_hint="--timeout")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]

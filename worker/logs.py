"""Worker log lines with secrets masked, whoever wrote them (runyard, RQ, redis-py, a traceback)."""

from __future__ import annotations

import logging
import os
import re
import sys
from urllib.parse import unquote

from redis.connection import parse_url

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
URL_PASSWORD = re.compile(r"(\w+://[^\s:/@]*:)[^\s@]+@")
QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s]+")
SECRET_VARIABLES = ("REDIS_URL", "WANDB_API_KEY")


def secrets_from_environment() -> list[str]:
    """Secret strings this process knows: the Redis password and the W&B key."""
    secrets = []
    url = os.environ.get("REDIS_URL", "")
    try:
        password = parse_url(url).get("password") if url else None
    except ValueError:
        password = None
    if password:
        secrets += [password, unquote(password)]
    if os.environ.get("WANDB_API_KEY"):
        secrets.append(os.environ["WANDB_API_KEY"])
    return sorted({secret for secret in secrets if len(secret) >= 4}, key=len, reverse=True)


def mask_secrets(text: str, secrets: list[str] | None = None) -> str:
    """`text` with URL passwords and known secret values replaced by ***."""
    text = QUERY_PASSWORD.sub(r"\1***", URL_PASSWORD.sub(r"\1***@", text))
    for secret in secrets if secrets is not None else secrets_from_environment():
        text = text.replace(secret, "***")
    return text


class MaskingFormatter(logging.Formatter):
    """A Formatter whose output (message, exception and stack text included) never shows a secret."""

    def __init__(self, fmt: str = LOG_FORMAT, datefmt: str | None = None):
        super().__init__(fmt, datefmt)
        self.secrets = secrets_from_environment()

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.secrets)


def setup_worker_logging(level: int = logging.INFO) -> None:
    """Log to stdout through a masking formatter; RQ's loggers propagate here instead of their own."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(MaskingFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

"""Per-owner caps on concurrent GPUs (`runyard quota set OWNER N`), enforced by the fair-share take.

A quota is how many jobs of an owner may hold a GPU at once; owners without one are uncapped. The
take (worker.fair_share) skips an owner at the cap, so a job waits with the reason
"alice is at her quota 2/2" while other owners' jobs use the free workers.
"""

from __future__ import annotations

import re

import redis
from rq.utils import as_text

from contracts.keys import QUOTA_KEY

# Redis keys of this module (to move into the contracts module's key table).

OWNER_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,64}")


class QuotaError(ValueError):
    """A quota command with an owner name or a cap that cannot be used."""


def check_owner(owner: str) -> str:
    """`owner` if it is a usable owner name (letters, digits, . _ @ + -, at most 64), else QuotaError."""
    if not OWNER_PATTERN.fullmatch(owner or ""):
        raise QuotaError(f"owner {owner!r} is not a user name: use letters, digits and . _ @ + - (at most 64)")
    return owner


def set_quota(connection: redis.Redis, owner: str, gpus: int) -> None:
    """Cap `owner` at `gpus` concurrent jobs (0 holds every job of theirs queued)."""
    if gpus < 0:
        raise QuotaError(f"quota {gpus} for {owner} is negative: give 0 or more GPUs")
    connection.hset(QUOTA_KEY, check_owner(owner), gpus)


def unset_quota(connection: redis.Redis, owner: str) -> bool:
    """Remove `owner`'s cap; False when they had none."""
    return bool(connection.hdel(QUOTA_KEY, owner))


def quotas(connection: redis.Redis) -> dict[str, int]:
    """Every owner's cap."""
    return {as_text(owner): int(gpus) for owner, gpus in connection.hgetall(QUOTA_KEY).items()}

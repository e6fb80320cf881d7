"""Run records and leaderboards under runyard's own Redis keys, kept after RQ forgets the job.

RQ deletes a finished job and its result after `result_ttl`; an experiment's record must outlive
that, so every finished run also writes a JSON summary and a leaderboard entry here.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from contracts.keys import (
    LEADERBOARD_KEY,
    RUN_NAMES_KEY,
    run_key,
    search_key,
    search_leaderboard_key,
    search_points_key,  # noqa: F401  (kept importable from here)
)


def get_search(connection: redis.Redis, search: str) -> dict[str, Any] | None:
    raw = connection.get(search_key(search))
    return json.loads(raw) if raw else None


# The one definition of reserving a run name, in Lua so that a search's claim script
# (schedule_search.publish) reserves its points' names inside its own atomic call with it:
# `run_name` if free, else `run_name-2`, `run_name-3`, ... whichever is free first.
RESERVE_RUN_NAME_LUA = """
local function reserve_run_name(names, run_name)
  local name, suffix = run_name, 1
  while redis.call('SADD', names, name) == 0 do
    suffix = suffix + 1
    name = run_name .. '-' .. suffix
  end
  return name
end
"""
RESERVE_SCRIPT = RESERVE_RUN_NAME_LUA + "return reserve_run_name(KEYS[1], ARGV[1])"


def reserve_run_name(connection: redis.Redis, name: str) -> str:
    """Claim `name`, or `name-2`, `name-3`, ... if taken: every run gets its own run dir."""
    return connection.register_script(RESERVE_SCRIPT)(keys=[RUN_NAMES_KEY], args=[name]).decode()


def record_run(connection: redis.Redis, summary: dict[str, Any], global_board: bool = True) -> None:
    """Store a finished run's summary and rank it by best validation F1 (global and per search).

    A search ranks its points by `search_score` when the summary has one (its metric, negated when
    lower is better); a score of None keeps the run off the search's board (a k-fold fold: its
    set's aggregate stands for it). `global_board=False` is for records that are not one run.
    """
    name = summary["run_name"]
    score = float(summary["best"]["val_f1"])
    search_score = summary.get("search_score", score)
    with connection.pipeline() as pipeline:
        pipeline.set(run_key(name), json.dumps(summary))
        if global_board:
            pipeline.zadd(LEADERBOARD_KEY, {name: score})
        if summary.get("search") and search_score is not None:
            pipeline.zadd(search_leaderboard_key(summary["search"]), {name: float(search_score)})
        pipeline.execute()


def get_run(connection: redis.Redis, run_name: str) -> dict[str, Any] | None:
    raw = connection.get(run_key(run_name))
    return json.loads(raw) if raw else None


def leaderboard(connection: redis.Redis, limit: int = 20, search: str | None = None) -> list[dict[str, Any]]:
    """Finished runs, best validation F1 first."""
    key = search_leaderboard_key(search) if search else LEADERBOARD_KEY
    names = [name.decode() for name in connection.zrevrange(key, 0, max(limit, 1) - 1)]
    if not names:
        return []
    summaries = connection.mget([run_key(name) for name in names])
    return [json.loads(raw) for raw in summaries if raw]

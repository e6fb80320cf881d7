"""One search at a glance: each point's state and progress, and the search's leaderboard.

Reads what schedule-search wrote (the search's definition and its points hash, keys in
worker.results), RQ's jobs, and runyard's run records for points whose RQ job has expired.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import redis
from rich.table import Table
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from worker.results import get_search, leaderboard, run_key, search_points_key
from worker.search_stop import search_stopped

POINT_STATES = ("queued", "running", "finished", "pruned", "failed", "missing")
FAILED_STATUSES = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
ALL_ROWS = 100_000
DEFAULT_LIMIT = 50
URGENT_STATES = ("running", "failed", "missing")  # shown first when not every point fits
STATES_CHUNK = 5000  # points per state script call: a few milliseconds of Redis each

# ARGV: job key prefix, run record prefix, then (job id, run name) per point. Returns each
# point's state as _point_state names it (a finished job is pruned when its meta says so; a job
# RQ forgot is its run record's status, or missing).
STATES_SCRIPT = """
local job_prefix, run_prefix = ARGV[1], ARGV[2]
local states = {}
for i = 3, #ARGV, 2 do
  local key = job_prefix .. ARGV[i]
  local status = redis.call('HGET', key, 'status')
  local state = 'queued'
  if not status then
    local record = redis.call('GET', run_prefix .. ARGV[i + 1])
    state = 'missing'
    if record then
      state = cjson.decode(record).status or 'finished'
    end
  elseif status == 'finished' then
    state = 'finished'
    local meta = redis.call('HGET', key, 'meta')
    if meta and string.find(meta, '"status": *"pruned"') then
      state = 'pruned'
    end
  elseif status == 'started' then
    state = 'running'
  elseif status == 'failed' or status == 'stopped' or status == 'canceled' then
    state = 'failed'
  end
  states[#states + 1] = state
end
return states
"""


def _point_state(job: Job | None, record: dict[str, Any] | None) -> tuple[str, str | None]:
    """(state, detail) of a point from its RQ job, or from its run record once RQ forgot the job."""
    if job is None:
        if record is not None:
            return record.get("status", "finished"), None
        return "missing", "no job: re-run the search to enqueue it"
    status = job.get_status(refresh=False)
    meta = job.meta or {}
    if status == JobStatus.FINISHED:
        return ("pruned" if meta.get("status") == "pruned" else "finished"), None
    if status == JobStatus.STARTED:
        return "running", job.worker_name
    if status in FAILED_STATUSES:
        return "failed", meta.get("failure_reason") or str(status.value)
    if status == JobStatus.DEFERRED:
        return "queued", "waiting for its folds"
    return "queued", None


def _position(info: dict[str, Any]) -> tuple[int, int]:
    """A point's place in tables: by index; a k-fold set's folds in order, then its aggregate."""
    fold = info.get("fold")
    return info["index"], (fold if fold is not None else (10**6 if info["kind"] == "aggregate" else -1))


def point_states(connection: redis.Redis, claims: list[dict[str, Any]]) -> list[str]:
    """The state of each claimed point (POINT_STATES), computed in Redis a chunk at a time."""
    script = connection.register_script(STATES_SCRIPT)
    states: list[str] = []
    for start in range(0, len(claims), STATES_CHUNK):
        arguments = [Job.redis_job_namespace_prefix, run_key("")]
        for claim in claims[start : start + STATES_CHUNK]:
            arguments += [claim["job_id"], claim["run_name"]]
        states += [state.decode() for state in script(args=arguments)]
    return states


def collect_search_status(connection: redis.Redis, name: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any] | None:
    """Search `name`'s counts per state, and up to `limit` points in detail; None if no such search.

    Every point's state is counted; the detailed rows (state, epoch, metric, params) are all
    points when there are at most `limit`, else the running, failed and missing ones first, then
    the others in order, up to `limit` (0: every point).
    """
    definition = get_search(connection, name)
    claims = {key.decode(): json.loads(value) for key, value in connection.hgetall(search_points_key(name)).items()}
    if definition is None and not claims:
        return None
    metric = (definition or {}).get("metric") or {"name": "val_f1", "goal": "maximize"}
    ordered = sorted(claims.items(), key=lambda item: _position(item[1]["info"]))
    states = point_states(connection, [claim for _id, claim in ordered])
    counts = Counter(states)
    if limit and len(ordered) > limit:
        urgent = [i for i, state in enumerate(states) if state in URGENT_STATES]
        rest = [i for i, state in enumerate(states) if state not in URGENT_STATES]
        ordered = [ordered[i] for i in sorted((urgent + rest)[:limit])]
    jobs = Job.fetch_many([claim["job_id"] for _id, claim in ordered], connection, serializer=JSONSerializer)
    raw_records = connection.mget([run_key(claim["run_name"]) for _id, claim in ordered]) if ordered else []
    rows = []
    for (point_id, claim), job, raw in zip(ordered, jobs, raw_records, strict=True):
        record = json.loads(raw) if raw else None
        state, detail = _point_state(job, record)
        meta = (job.meta if job is not None else {}) or {}
        progress = meta.get("progress") or {}
        value = None
        if record is not None:
            value = (record.get("metric") or {}).get("best")
        elif progress:
            value = progress.get(f"best_{metric['name']}", progress.get(metric["name"]))
        rows.append(
            {
                "index": claim["info"]["index"],
                "point": point_id,
                "kind": claim["info"]["kind"],
                "run_name": claim["run_name"],
                "job_id": claim["job_id"],
                "state": state,
                "detail": detail,
                "epoch": (record or {}).get("epochs_completed") or progress.get("epoch"),
                "epochs": progress.get("epochs") or meta.get("epochs"),
                "metric": value,
                "params": (record or {}).get("params") or meta.get("params") or claim["info"]["params"],
            }
        )
    return {
        "search": name,
        "definition": definition,
        "metric": metric,
        "points": len(states),
        "counts": {state: counts.get(state, 0) for state in POINT_STATES},
        "done": counts.get("finished", 0) + counts.get("pruned", 0),
        "shown": len(rows),
        "stopped": search_stopped(connection, name),
        "rows": rows,
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _parameter_names(definition: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[str]:
    names = list((definition or {}).get("parameters") or {})
    return names or sorted({name for row in rows for name in row.get("params") or {}})


def search_status_table(status: dict[str, Any]) -> Table:
    """The points of a search with state, epoch and metric: what `runyard status --search` prints."""
    counts = ", ".join(f"{count} {state}" for state, count in status["counts"].items() if count)
    method = (status["definition"] or {}).get("method", "?")
    title = f"search {status['search']} ({method}): {status['done']}/{status['points']} done; {counts}"
    stopped = status.get("stopped")
    table = Table(title=title, caption=f"STOPPED: {stopped['reason']}" if stopped else None)
    parameters = _parameter_names(status["definition"], status["rows"])
    for column in ("#", "run", "state", "epoch", status["metric"]["name"], *parameters, "note"):
        table.add_column(column, justify="right" if column in ("#", "epoch") else "left", overflow="fold")
    for row in status["rows"]:
        epoch = f"{row['epoch'] or 0}/{row['epochs'] or '?'}" if row["kind"] != "aggregate" else "-"
        params = [_fmt(row["params"].get(name)) for name in parameters]
        note = row["detail"] or ("" if row["kind"] in ("run", "trial") else row["kind"])
        table.add_row(str(row["index"]), row["run_name"], row["state"], epoch, _fmt(row["metric"]), *params, note)
    return table


def search_leaderboard(connection: redis.Redis, name: str, limit: int = ALL_ROWS) -> list[dict[str, Any]]:
    """The search's finished points (k-fold sets as one row), best first by the search's metric."""
    return leaderboard(connection, limit=limit, search=name)


def search_leaderboard_table(rows: list[dict[str, Any]], name: str, definition: dict[str, Any] | None) -> Table:
    """Best first; a k-fold set shows mean ± std over its folds."""
    metric = ((definition or {}).get("metric") or {}).get("name", "val_f1")
    table = Table(title=f"search {name}: best {metric} first")
    parameters = _parameter_names(definition, rows)
    for column in ("#", "run", "status", metric, *parameters, "epochs"):
        table.add_column(column, justify="right" if column in ("#", "epochs") else "left")
    for rank, row in enumerate(rows, 1):
        if row.get("kind") == "kfold":
            value = f"{_fmt(row['mean'][metric])} ± {_fmt(row['std'][metric])} (k={row['k']})"
        else:
            value = _fmt((row.get("metric") or {}).get("best", row["best"].get("val_f1")))
        params = [_fmt((row.get("params") or {}).get(parameter)) for parameter in parameters]
        table.add_row(
            str(rank),
            row["run_name"],
            row.get("status", "finished"),
            value,
            *params,
            str(row.get("epochs_completed", "-")),
        )
    return table

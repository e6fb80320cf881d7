"""`schedule-search --json` prints each job as it is enqueued; the publish report stays small."""

from __future__ import annotations

import json

import redis
from click.testing import CliRunner
from rq.job import Job

import schedule_search.publish as publish_module
from contracts.keys import search_points_key
from runyard.cli.schedule_search import schedule_search_command
from schedule_search.publish import publish_search
from schedule_search.search import load_search
from tests.helpers import write_search

WIDE = {"lr": {"values": [0.001 * (index + 1) for index in range(30)]}, "seed": {"values": [0, 1, 2, 3]}}


def test_json_lists_every_enqueued_job_one_line_each_and_the_report_keeps_only_the_first(
    connection, tmp_path, monkeypatch
):
    monkeypatch.setattr(publish_module, "CHUNK", 7)
    monkeypatch.setattr(publish_module, "FIRST_JOBS", 5)
    path = write_search(tmp_path / "wide.yaml", tmp_path, WIDE, name="wide")
    result = CliRunner().invoke(schedule_search_command, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert (printed["points"], printed["enqueued"], printed["counts"]) == (120, 120, {"new": 120})
    assert [job["run_name"] for job in printed["jobs"]] == [f"wide-{index:03d}" for index in range(1, 121)]
    assert all(Job.exists(job["job_id"], connection=connection) for job in printed["jobs"])
    job_lines = [line for line in result.stdout.splitlines() if line.startswith('    {"point": ')]
    assert len(job_lines) == 120  # one line a job, written as it was enqueued
    again: list[dict] = []
    report = publish_search(connection, load_search(path), on_job=again.append)
    assert report.enqueued == 0 and report.first_jobs == [] and again == []
    assert report.outcomes == {"queued": 120}


def test_report_counts_every_outcome_but_keeps_only_the_first_jobs(connection, tmp_path, monkeypatch):
    monkeypatch.setattr(publish_module, "FIRST_JOBS", 5)
    search = load_search(write_search(tmp_path / "wide.yaml", tmp_path, WIDE, name="wide"))
    seen: list[tuple[str, str]] = []
    jobs: list[dict] = []
    report = publish_search(connection, search, on_point=lambda p, o: seen.append((p.id, o)), on_job=jobs.append)
    assert report.enqueued == 120 and report.counts() == {"new": 120} and report.queues == {"default"}
    assert report.first_jobs == jobs[:5] and len(jobs) == 120
    assert seen == [(point.id, "new") for point in search.points]


def test_a_publish_that_fails_midway_still_prints_valid_json_of_what_it_enqueued(connection, tmp_path, monkeypatch):
    monkeypatch.setattr(publish_module, "CHUNK", 40)
    enqueue_runs, calls = publish_module._enqueue_runs, []

    def failing_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise redis.ConnectionError("Redis went away")
        return enqueue_runs(*args, **kwargs)

    monkeypatch.setattr(publish_module, "_enqueue_runs", failing_second_chunk)
    path = write_search(tmp_path / "wide.yaml", tmp_path, WIDE, name="wide")
    result = CliRunner().invoke(schedule_search_command, [str(path), "--json"])
    assert result.exit_code != 0 and isinstance(result.exception, redis.ConnectionError)
    printed = json.loads(result.stdout)
    assert printed["error"] == "Redis went away" and len(printed["jobs"]) == 40
    assert all(Job.exists(job["job_id"], connection=connection) for job in printed["jobs"])
    assert connection.hlen(search_points_key("wide")) == 40  # the failed chunk's claims were given back


def test_dry_run_json_lists_every_point_with_what_publishing_would_do(connection, tmp_path):
    path = write_search(tmp_path / "wide.yaml", tmp_path, WIDE, name="wide", run_cap=100)
    publish_search(connection, load_search(path))  # the first 100 points queued
    grown = write_search(tmp_path / "grown.yaml", tmp_path, WIDE, name="wide")
    result = CliRunner().invoke(schedule_search_command, [str(grown), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["dry_run"] is True and (printed["new"], printed["done"]) == (20, 0)
    statuses = [row["status"] for row in printed["points"]]
    assert statuses == ["queued"] * 100 + ["new"] * 20
    assert [row["index"] for row in printed["points"]] == list(range(1, 121))

"""One enqueue path: `publish`, `schedule-search` (runs, folds, k-fold aggregates) set a job's options alike."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from rq import Queue
from rq.job import Job
from rq.registry import DeferredJobRegistry
from rq.serializers import JSONSerializer

from runyard.cli.publish import publish_command
from runyard.cli.schedule_search import schedule_search_command
from tests.helpers import tiny_spec, write_search


def _options(job: Job) -> tuple:
    return (job.timeout, job.result_ttl, job.failure_ttl, job.meta["max_requeues"])


def test_publish_and_schedule_search_enqueue_with_the_same_options_and_max_requeues(connection, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path)))
    published = CliRunner().invoke(
        publish_command, ["--config", str(spec), "--max-requeues", "5", "--timeout", "2h", "--json"]
    )
    assert published.exit_code == 0, published.output
    path = write_search(tmp_path / "cv.yaml", tmp_path, {"lr": {"values": [0.001]}}, name="cv")
    document = yaml.safe_load(path.read_text())
    document["fixed"]["kfold"] = {"k": 2}
    path.write_text(yaml.safe_dump(document))
    scheduled = CliRunner().invoke(
        schedule_search_command, [str(path), "--max-requeues", "5", "--timeout", "2h", "--json"]
    )
    assert scheduled.exit_code == 0, scheduled.output

    publish_job = Job.fetch(json.loads(published.stdout)["job_id"], connection=connection, serializer=JSONSerializer)
    search_jobs = [
        Job.fetch(job["job_id"], connection=connection, serializer=JSONSerializer)
        for job in json.loads(scheduled.stdout)["jobs"]
    ]
    assert len(search_jobs) == 3  # two folds and their aggregate
    assert {_options(job) for job in [publish_job, *search_jobs]} == {
        (2 * 3600, publish_job.result_ttl, publish_job.failure_ttl, 5)
    }
    assert DeferredJobRegistry("default", connection=connection, serializer=JSONSerializer).count == 1
    runs = [job for job in search_jobs if job.meta["kind"] == "fold"]
    assert [job.retries_left for job in runs] == [publish_job.retries_left] * 2
    assert Queue("default", connection=connection, serializer=JSONSerializer).count == 3


def test_schedule_search_defaults_to_the_max_requeues_of_publish(connection, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path)))
    published = CliRunner().invoke(publish_command, ["--config", str(spec), "--json"])
    path = write_search(tmp_path / "grid.yaml", tmp_path, {"lr": {"values": [0.001]}}, name="g")
    scheduled = CliRunner().invoke(schedule_search_command, [str(path), "--json"])
    assert published.exit_code == scheduled.exit_code == 0, published.output + scheduled.output
    jobs = Queue("default", connection=connection, serializer=JSONSerializer).get_jobs()
    assert [job.meta["max_requeues"] for job in jobs] == [3, 3]

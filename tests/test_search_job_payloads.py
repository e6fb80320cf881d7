"""A published search job carries exactly what publisher.queue.job_options and the spec's own dump say.

Publishing builds each run job's payload and meta from a template checked once per search; these
tests rebuild every job the straightforward way (the point's spec with its claimed run name,
SearchPayload validated, job_options per job) and compare them field by field.
"""

from __future__ import annotations

import yaml
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.search_payload import SearchPayload
from publisher.queue import job_options
from schedule_search.publish import publish_search
from schedule_search.search import Search, load_search
from tests.helpers import write_search
from worker.fair_share import job_owner

CONTEXT = {"user": "u", "owner": "team-a", "host": "h", "published_at": 1.0}


def expected_job(search: Search, point, claim: dict) -> dict:
    """Payload and options of a point's run job, built one job at a time with full validation."""
    spec = point.spec.model_copy(update={"run_name": claim["run_name"]})
    payload = SearchPayload(
        name=search.name,
        point=point.id,
        params=point.params,
        metric=search.metric,
        study=search.study,
        kfold_set=point.kfold_set if point.kind == "fold" else None,
        asha=search.asha,
    ).model_dump(mode="json")
    options = job_options(
        spec,
        claim["run_name"],
        retries=2,
        job_id=claim["job_id"],
        spec_hash=point.id if point.kind in ("run", "fold") else None,
        search=search.name,
        point=point.id,
        kind=point.kind,
        params=point.params,
        owner=job_owner(CONTEXT),
    )
    return {"kwargs": {"spec": spec.to_payload(), "context": CONTEXT, "search": payload}, "options": options}


def assert_jobs_match(connection, search: Search) -> int:
    jobs: list[dict] = []
    publish_search(connection, search, retries=2, context=CONTEXT, on_job=jobs.append)
    points = {point.id: point for point in search.points}
    compared = 0
    for enqueued in jobs:
        point = points[enqueued["point"]]
        if point.kind == "aggregate":
            continue
        job = Job.fetch(enqueued["job_id"], connection=connection, serializer=JSONSerializer)
        expected = expected_job(search, point, {"run_name": enqueued["run_name"], "job_id": enqueued["job_id"]})
        assert job.kwargs == expected["kwargs"]
        assert list(job.kwargs["spec"]) == list(expected["kwargs"]["spec"])  # same field order in the payload
        options = expected["options"]
        assert job.meta == options["meta"] and list(job.meta) == list(options["meta"])
        assert job.description == options["description"] == enqueued["run_name"]
        assert (job.timeout, job.result_ttl, job.failure_ttl) == (
            options["timeout"],
            options["result_ttl"],
            options["failure_ttl"],
        )
        assert job.retries_left == options["retry"].max
        compared += 1
    return compared


def test_grid_and_k_fold_jobs_match_the_one_at_a_time_build(connection, tmp_path):
    grid = {"lr": {"values": [0.001, 0.01]}, "loss": {"values": ["f1", "focal"]}, "resize": {"values": ["32x32"]}}
    path = write_search(tmp_path / "grid.yaml", tmp_path, grid, name="g")
    assert assert_jobs_match(connection, load_search(path)) == 4

    path = write_search(tmp_path / "cv.yaml", tmp_path, {"lr": {"values": [0.001, 0.002]}}, name="cv")
    document = yaml.safe_load(path.read_text())
    document["fixed"]["kfold"] = {"k": 2}
    path.write_text(yaml.safe_dump(document))
    assert assert_jobs_match(connection, load_search(path)) == 4  # the folds; aggregates are built one by one


def test_bayes_trial_jobs_match_the_one_at_a_time_build(connection, tmp_path):
    space = {"lr": {"min": 0.001, "max": 0.1, "distribution": "log_uniform_values"}}
    path = write_search(tmp_path / "b.yaml", tmp_path, space, method="bayes", run_cap=3, name="tpe")
    assert assert_jobs_match(connection, load_search(path)) == 3

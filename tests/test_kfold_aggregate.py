"""The k-fold aggregate reads its folds' run records: mean ± std when all finished, a clear failure if not."""

from __future__ import annotations

import statistics

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.spec import SpecError
from tests.helpers import tiny_spec
from worker.fold_aggregate import FoldsMissing, aggregate
from worker.results import get_run, leaderboard, record_run

FOLD_F1 = [0.5, 0.7, 0.6]


def fold_record(fold: int, f1: float) -> dict:
    return {
        "run_name": f"cv-001-fold{fold}",
        "best": {"val_f1": f1, "val_acc": f1 + 0.1, "epoch": 2},
        "epochs_completed": 2,
        "run_dir": f"/runs/cv-001-fold{fold}",
        "durations": {"total_s": 10.0},
        "search": "cv",
        "metric": {"name": "val_f1", "goal": "maximize", "best": f1},
        "search_score": None,  # a fold stays off the search's board
        "status": "finished",
    }


def aggregate_job(connection) -> Job:
    job = Job.create("worker.jobs.aggregate_folds", connection=connection, serializer=JSONSerializer)
    job.save()
    return job


def arguments(tmp_path) -> dict:
    spec = tiny_spec(tmp_path) | {"kfold": {"k": 3}, "run_name": "cv-001", "wandb": {"group": "cv-001"}}
    folds = [{"fold": fold, "run_name": f"cv-001-fold{fold}", "point": f"p{fold}"} for fold in range(3)]
    return {"search": {"name": "cv", "point": "kfold-x", "params": {"lr": 0.01}}, "spec": spec, "folds": folds}


def test_aggregate_reports_mean_and_std_of_its_folds_on_the_search_board(connection, tmp_path):
    for fold, f1 in enumerate(FOLD_F1):
        record_run(connection, fold_record(fold, f1))
    result = aggregate(aggregate_job(connection), **arguments(tmp_path), run_name="cv-001")
    assert result["mean"]["val_f1"] == pytest.approx(statistics.fmean(FOLD_F1))
    assert result["std"]["val_f1"] == pytest.approx(statistics.pstdev(FOLD_F1))
    assert result["mean"]["val_acc"] == pytest.approx(statistics.fmean(FOLD_F1) + 0.1)
    assert [row["val_f1"] for row in result["folds"]] == FOLD_F1
    assert result["ensemble"] == {"written": False, "reason": "the spec has no eval_dir"}
    assert [row["run_name"] for row in leaderboard(connection, search="cv")] == ["cv-001"]
    assert "cv-001" not in [row["run_name"] for row in leaderboard(connection)]  # not a run of its own
    assert get_run(connection, "cv-001")["search_score"] == pytest.approx(statistics.fmean(FOLD_F1))


def test_aggregate_with_a_fold_that_did_not_finish_fails_and_says_to_re_run_the_search(connection, tmp_path):
    for fold, f1 in enumerate(FOLD_F1[:2]):
        record_run(connection, fold_record(fold, f1))
    job = aggregate_job(connection)
    with pytest.raises(FoldsMissing, match="folds 2 of cv-001 did not finish; re-run the search"):
        aggregate(job, **arguments(tmp_path), run_name="cv-001")
    job = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert job.meta["failure_reason"] == "fold_failed"
    assert leaderboard(connection, search="cv") == []


def test_aggregate_job_with_a_malformed_payload_fails_as_a_spec_error(connection, tmp_path):
    kwargs = arguments(tmp_path) | {"spec": {"lr": -1}, "run_name": "cv-001"}
    job = Job.create("worker.jobs.aggregate_folds", kwargs=kwargs, connection=connection, serializer=JSONSerializer)
    job.save()
    with pytest.raises(SpecError, match="lr: Input should be greater than 0"):
        job.perform()  # RQ's own in-process run of the job
    assert Job.fetch(job.id, connection=connection, serializer=JSONSerializer).meta["failure_reason"] == "spec_error"

"""The worker's side of a search point: the pruner each epoch and bayes sampling, on a real Optuna
study in the real Redis (journal storage), fed the trainer's own EpochReport."""

from __future__ import annotations

import math
import re

import optuna
import pytest
from optuna.distributions import FloatDistribution, distribution_to_json
from optuna.storages.journal import JournalRedisBackend, JournalStorage
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.keys import optuna_study_prefix as study_prefix
from contracts.spec import SpecError
from trainer.train import EpochReport
from worker.search_trial import SearchTrial, parse_payload, search_fields


def report(epoch: int, val_f1: float, epochs: int = 9) -> EpochReport:
    return EpochReport(epoch, epochs, 1.0, 0.5, 1.0, 0.5, val_f1, 1e-3, 0.1, val_f1, epoch, 0.0)


def payload(point: str, pruner: dict | None = None, bayes: dict | None = None, search: str = "s") -> dict:
    study = {"name": f"runyard-{search}", "prefix": study_prefix(search), "early_terminate": pruner, "bayes": bayes}
    return {"name": search, "point": point, "metric": {"name": "val_f1"}, "study": study}


def train(trial: SearchTrial, scores: list[float]) -> dict:
    """What the trainer does with on_epoch: report each epoch, stop when told."""
    for epoch, score in enumerate(scores, 1):
        if trial.should_stop(report(epoch, score, len(scores))):
            return {"stopped_early": epoch < len(scores), "best": {"val_f1": max(scores[:epoch])}}
    return {"stopped_early": False, "best": {"val_f1": max(scores)}}


def study(redis_url: str, search: str = "s") -> optuna.Study:
    storage = JournalStorage(JournalRedisBackend(redis_url, prefix=study_prefix(search)))
    return optuna.load_study(study_name=f"runyard-{search}", storage=storage)


HYPERBAND = {"type": "hyperband", "min_iter": 1, "max_iter": 2, "eta": 3}  # checked at epoch 1


@pytest.mark.parametrize("kind", ["hyperband", "hyperband_brackets"])  # 2 epochs / 1 < eta: a single bracket
def test_hyperband_prunes_a_run_far_below_the_others_and_it_ends_pruned(redis_url, kind):
    pruner = HYPERBAND | {"type": kind}
    good = SearchTrial(None, parse_payload(payload("good", pruner)))
    assert good.finish(train(good, [0.50, 0.60])) == "finished"
    bad = SearchTrial(None, parse_payload(payload("bad", pruner)))
    result = train(bad, [0.05, 0.90])
    assert result["stopped_early"] and bad.pruned
    assert bad.finish(result) == "pruned"
    states = [trial.state for trial in study(redis_url).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert study(redis_url).trials[0].value == 0.60


def test_a_run_that_keeps_up_with_the_best_is_not_pruned(redis_url):
    first = SearchTrial(None, parse_payload(payload("a", HYPERBAND)))
    first.finish(train(first, [0.50, 0.60]))
    second = SearchTrial(None, parse_payload(payload("b", HYPERBAND)))
    assert second.finish(train(second, [0.55, 0.58])) == "finished"


def test_hyperband_checks_at_min_iter_times_powers_of_eta_as_w_and_b_does(redis_url):
    halving = {"type": "hyperband", "min_iter": 1, "max_iter": 8, "eta": 2}
    leader = SearchTrial(None, parse_payload(payload("lead", halving)))
    leader.finish(train(leader, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8]))
    # Level with the leader at epochs 1 and 2, behind it from epoch 3: stopped at the next rung, epoch 4.
    follower = SearchTrial(None, parse_payload(payload("follow", halving)))
    result = train(follower, [0.3, 0.4, 0.41, 0.42, 0.43, 0.9, 0.9, 0.9])
    assert follower.pruned and len(follower.trial.study.trials[1].intermediate_values) == 4
    assert follower.finish(result) == "pruned"
    assert type(follower.study.pruner) is optuna.pruners.SuccessiveHalvingPruner


def test_hyperband_brackets_is_optunas_bracketed_hyperband(redis_url):
    brackets = {"type": "hyperband_brackets", "min_iter": 1, "max_iter": 9, "eta": 3}
    trial = SearchTrial(None, parse_payload(payload("p", brackets)))
    assert type(trial.study.pruner) is optuna.pruners.HyperbandPruner


def test_without_early_terminate_nothing_is_pruned_and_no_study_is_made(redis_url, connection):
    trial = SearchTrial(None, parse_payload({"name": "s", "point": "p"}))
    assert trial.finish(train(trial, [0.9, 0.1, 0.1])) == "finished"
    assert trial.best == 0.9 and trial.study is None
    assert not connection.keys(f"{study_prefix('s')}*")


def bayes_settings(seed: int = 3) -> dict:
    space = {
        "lr": distribution_to_json(FloatDistribution(1e-4, 1e-1, log=True)),
        "resize": distribution_to_json(optuna.distributions.CategoricalDistribution(["[32, 32]", "[48, 40]"])),
    }
    return {"space": space, "json_params": ["resize"], "seed": seed, "n_startup_trials": 2}


def test_bayes_points_sample_the_space_set_it_on_the_spec_and_report_their_result(redis_url):
    results = []
    for index in range(1, 7):
        trial = SearchTrial(None, parse_payload(payload(f"t{index:03d}", bayes=bayes_settings())))
        spec = trial.complete_spec({"model": "test_efficientnet", "lr": 1.0, "wandb": {"group": "s"}})
        assert 1e-4 <= spec["lr"] <= 1e-1 and spec["resize"] in ([32, 32], [48, 40])
        assert spec["model"] == "test_efficientnet" and spec["wandb"] == {"group": "s"}
        score = 1.0 - abs(math.log10(spec["lr"]) + 2.0) / 3  # best at lr = 1e-2
        assert trial.finish(train(trial, [score])) == "finished"
        results.append((spec["lr"], score))
    trials = study(redis_url).trials
    assert [trial.value for trial in trials] == pytest.approx([score for _lr, score in results])
    assert [trial.params["lr"] for trial in trials] == pytest.approx([lr for lr, _score in results])
    assert len({lr for lr, _score in results}) == 6


def test_a_retried_job_carries_on_with_its_trial_and_its_params(redis_url, connection):
    job = Job.create("worker.jobs.run_experiment", connection=connection, serializer=JSONSerializer)
    job.save()
    first = SearchTrial(job, parse_payload(payload("t001", HYPERBAND, bayes_settings())))
    first.should_stop(report(1, 0.4, 2))
    again = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)  # the retry's copy of the job
    second = SearchTrial(again, parse_payload(payload("t001", HYPERBAND, bayes_settings())))
    assert second.trial.number == first.trial.number == again.meta["trial_number"]
    assert second.params == first.params == again.meta["params"]
    assert len(study(redis_url).trials) == 1


def test_a_failed_run_marks_its_trial_failed_only_on_its_last_attempt(redis_url):
    trial = SearchTrial(None, parse_payload(payload("t001", HYPERBAND)))
    trial.fail(final=False)
    assert study(redis_url).trials[0].state == optuna.trial.TrialState.RUNNING
    trial.fail(final=True)
    assert study(redis_url).trials[0].state == optuna.trial.TrialState.FAIL


def test_a_malformed_search_payload_is_a_spec_error():
    with pytest.raises(SpecError, match=re.escape("search.point: Field required")):
        parse_payload({"name": "s"})
    with pytest.raises(SpecError, match=re.escape("search.metric: unknown metric 'f1'")):
        parse_payload({"name": "s", "point": "p", "metric": {"name": "f1"}})


def test_a_search_ranks_points_by_its_metric_with_lower_losses_first():
    loss = parse_payload({"name": "s", "point": "p", "metric": {"name": "val_loss"}})
    assert loss.metric.goal == "minimize"
    assert search_fields(loss, 0.2, "finished")["search_score"] > search_fields(loss, 0.3, "finished")["search_score"]
    fold = parse_payload({"name": "s", "point": "p", "kfold_set": "s-001"})
    assert search_fields(fold, 0.9, "finished")["search_score"] is None  # its set's aggregate ranks instead

"""A search point as the worker runs it: its search's records and, when the search stops runs early
or samples adaptively, its trial in the search's Optuna study.

It lives in worker/ because the work horse needs it and worker must never import schedule_search
(dependencies point trainer <- worker <- publisher <- schedule_search). The `search` payload a
job carries is contracts.search_payload.SearchPayload, which schedule_search builds.
Optuna is imported only by searches that use a study (early_terminate or bayes).

The study lives in Redis through Optuna's journal storage, under its own key prefix, so every
worker shares it: the pruner compares a run with every other run of the search, and the bayes
sampler sees finished and running trials alike (`constant_liar`).
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from rq.job import Job

from contracts.job_meta import update_job_meta
from contracts.search_payload import BayesSettings, EarlyTerminate, SearchPayload, StudySettings
from contracts.spec import SpecError, format_validation_error
from worker.connection import redis_url

log = logging.getLogger("runyard.search")


def search_fields(payload: SearchPayload, best: float | None, status: str) -> dict[str, Any]:
    """What a search point adds to its run record: search, point, params, status, metric, rank score."""
    scored = best is not None and payload.kfold_set is None
    return {
        "search": payload.name,
        "point": payload.point,
        "params": payload.params,
        "status": status,
        "metric": {"name": payload.metric.name, "goal": payload.metric.goal, "best": best},
        "search_score": payload.metric.score(best) if scored else None,
        "kfold_set": payload.kfold_set,
    }


def parse_payload(search: dict[str, Any]) -> SearchPayload:
    """Validate a job's `search` argument; a malformed one is a SpecError (the job fails, no retry)."""
    try:
        return SearchPayload.model_validate(search)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, prefix="search.")) from None


def open_search_trial(job: Job | None, search: dict[str, Any] | None) -> SearchTrial | None:
    """The SearchTrial of a job published by schedule-search, None for a plain `publish` job."""
    if not search:
        return None
    return SearchTrial(job, parse_payload(search))


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# Optuna's pruner for each contracts.plugins.PRUNERS name, built from the search's early_terminate.
PRUNER_FACTORIES: dict[str, Callable[[Any, EarlyTerminate], Any]] = {
    "hyperband": lambda optuna, early: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=early.min_iter, reduction_factor=early.eta
    ),
    "successive_halving": lambda optuna, early: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=early.min_iter, reduction_factor=early.eta
    ),
    "hyperband_brackets": lambda optuna, early: optuna.pruners.HyperbandPruner(
        min_resource=early.min_iter, max_resource=early.max_iter, reduction_factor=early.eta
    ),
}


class SearchTrial:
    """One point's run: tracks its best metric, asks the pruner each epoch, tells the study the end."""

    def __init__(self, job: Job | None, payload: SearchPayload):
        self.job = job
        self.payload = payload
        self.metric = payload.metric
        self.params = dict(payload.params)
        self.best: float | None = None
        self.pruned = False
        self.paused = False  # an ASHA point stopped at its rung
        self.study = None
        self.trial = None
        if payload.study is not None:
            self._join_study(payload.study)

    def _join_study(self, settings: StudySettings) -> None:
        optuna = _optuna()
        from optuna.storages.journal import JournalRedisBackend, JournalStorage

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = JournalStorage(JournalRedisBackend(redis_url(start_embedded=False), prefix=settings.prefix))
            self.study = optuna.create_study(
                study_name=settings.name,
                storage=storage,
                direction=self.metric.goal,
                sampler=self._sampler(settings),
                pruner=self._pruner(settings.early_terminate),
                load_if_exists=True,
            )
            meta = self.job.meta if self.job is not None else {}
            if meta.get("trial_number") is not None:
                # A retry of this job (worker died, crash): carry on with the same trial and params,
                # so a run resumed from its checkpoint stays the point it was.
                self.trial = self._existing_trial(storage, int(meta["trial_number"]))
            if self.trial is None:
                distributions = self._distributions(settings)
                self.trial = self.study.ask(distributions)
                self.trial.set_user_attr("point", self.payload.point)
                if self.job is not None:
                    self.trial.set_user_attr("run_name", self.job.meta.get("run_name"))
                    update_job_meta(self.job.meta, trial_number=self.trial.number)
                    self.job.save_meta()
        if settings.bayes is not None:
            self.params = self._decode(self.trial.params, settings.bayes)
            if self.job is not None:
                update_job_meta(self.job.meta, params=self.params)
                self.job.save_meta()

    def _existing_trial(self, storage, number: int):
        """The study's trial `number` to carry on with, if it is still running."""
        optuna = _optuna()
        try:
            study_id = storage.get_study_id_from_name(self.study.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            return None
        if storage.get_trial(trial_id).state != optuna.trial.TrialState.RUNNING:
            return None
        return optuna.trial.Trial(self.study, trial_id)

    @staticmethod
    def _distributions(settings: StudySettings) -> dict[str, Any] | None:
        if settings.bayes is None:
            return None
        from optuna.distributions import json_to_distribution

        return {name: json_to_distribution(text) for name, text in settings.bayes.space.items()}

    def _sampler(self, settings: StudySettings):
        optuna = _optuna()
        if settings.bayes is None:
            return optuna.samplers.RandomSampler(seed=0)  # grid/random points are never sampled here
        # Each point seeds its own sampler: reproducible per point, different across points.
        seed = (settings.bayes.seed + zlib.crc32(self.payload.point.encode())) % 2**31
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=settings.bayes.n_startup_trials, constant_liar=True
        )

    @staticmethod
    def _pruner(early_terminate: EarlyTerminate | None):
        optuna = _optuna()
        if early_terminate is None:
            return optuna.pruners.NopPruner()
        return PRUNER_FACTORIES[early_terminate.type](optuna, early_terminate)

    @staticmethod
    def _decode(params: dict[str, Any], bayes: BayesSettings) -> dict[str, Any]:
        import json

        return {name: json.loads(value) if name in bayes.json_params else value for name, value in params.items()}

    def complete_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The spec to train: the published one, with a bayes point's sampled params set on it."""
        if self.payload.study is None or self.payload.study.bayes is None:
            return spec
        completed = dict(spec)
        for name, value in self.params.items():
            *parents, leaf = name.split(".")
            target = completed
            for parent in parents:
                target[parent] = dict(target.get(parent) or {})
                target = target[parent]
            target[leaf] = value
        return completed

    def should_stop(self, report: Any) -> bool:
        """Record this epoch's metric; True when the pruner says the run is not worth finishing."""
        value = float(getattr(report, self.metric.name))
        self.best = value if self.best is None else self.metric.better(self.best, value)
        if self.payload.asha is not None:
            # `>=`: a job run again after it reached its rung (its worker died before the job
            # ended) resumes past the rung's checkpoint; it pauses after one more epoch, not never.
            pause = self.payload.asha.pause_epoch()
            self.paused = pause is not None and report.epoch >= pause
            return self.paused
        if self.trial is None or self.payload.study.early_terminate is None:
            return False
        try:
            # The best so far, not this epoch's value: one noisy epoch should not end a good run.
            self.trial.report(self.best, step=report.epoch)
            self.pruned = bool(self.trial.should_prune())
        except Exception as error:  # the search's study unreachable: train on rather than fail
            log.warning("pruner unavailable, training on: %s", error)
            return False
        return self.pruned

    def resumed(self, reports: list[Any]) -> None:
        """A job resumed from its checkpoint: the epochs trained before count toward the best so far.

        They were reported to the pruner by the earlier attempt (the same trial), so only the best
        is restored here.
        """
        for report in reports:
            value = float(getattr(report, self.metric.name))
            self.best = value if self.best is None else self.metric.better(self.best, value)

    def finish(self, result: dict[str, Any]) -> str:
        """Tell the study how the run ended; returns the point's status, `finished`, `pruned` or `paused`."""
        status = "pruned" if self.pruned and result.get("stopped_early") else "finished"
        if self.paused and result.get("stopped_early"):
            status = "paused"
        if self.best is None:  # no epoch reported (cannot happen with the trainer's loop)
            self.best = float(result["best"]["val_f1"]) if self.metric.name == "val_f1" else None
        if self.trial is not None:
            optuna = _optuna()
            try:
                if status == "pruned":
                    self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    self.study.tell(self.trial, self.best)
            except Exception as error:
                log.warning("could not record the result in the search's study: %s", error)
        return status

    def fail(self, final: bool) -> None:
        """A failed run: on its last attempt, mark its trial failed so the study stops counting it as running."""
        if self.trial is None or not final:
            return
        optuna = _optuna()
        try:
            self.study.tell(self.trial, state=optuna.trial.TrialState.FAIL)
        except Exception as error:
            log.warning("could not mark the trial failed in the search's study: %s", error)

    def summary_fields(self, status: str) -> dict[str, Any]:
        """What this point adds to its run record (see search_fields); an ASHA point adds its rung."""
        fields = search_fields(self.payload.model_copy(update={"params": self.params}), self.best, status)
        if self.payload.asha is not None:
            asha = self.payload.asha
            fields["asha"] = {"rung": asha.rung, "rung_epochs": asha.rung_epochs()[asha.rung], "state": status}
        return fields

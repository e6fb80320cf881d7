"""The functions a runyard worker runs. A job naming anything else is refused (see worker.job).

Torch is imported inside the functions, in RQ's work horse, never in the worker's parent process.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict
from typing import Any

from rq import get_current_job
from rq.job import Job

from trainer.spec import SpecError, load_spec
from worker.code_version import compare_code, loaded_code_state
from worker.results import record_run
from worker.search_trial import SearchTrial, open_search_trial

RUN_EXPERIMENT = "worker.jobs.run_experiment"
AGGREGATE_FOLDS = "worker.jobs.aggregate_folds"
ENTRY_POINTS = frozenset({RUN_EXPERIMENT, AGGREGATE_FOLDS})
CALLBACKS: frozenset[str] = frozenset()

FAILURE_REASONS = ("spec_error", "data_error", "oom", "crashed", "cancelled", "code_error", "fold_failed")

log = logging.getLogger("runyard.jobs")


def run_experiment(
    spec: dict[str, Any], context: dict[str, Any] | None = None, search: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one experiment spec (a JSON dict) and return its result; progress goes to job.meta.

    `search` (set by schedule-search) makes the run a point of a search: a bayes point's params are
    sampled here, a pruner may stop it early (status `pruned`), and its record joins the search's.
    """
    job = get_current_job()
    trial = None
    try:
        trial = open_search_trial(job, search)
        experiment = load_spec(trial.complete_spec(spec) if trial else spec)
    except SpecError as error:
        _mark_failure(job, "spec_error", str(error), retry=False, trial=trial)
        raise

    from trainer.data import DataError
    from trainer.train import train

    context, code = with_worker_code(context, job)
    if job is not None:
        job.meta["code"] = code
        job.save_meta()
    progress = JobProgress(job, trial)
    try:
        result = train(experiment, on_epoch=progress.on_epoch, context=context)
    except DataError as error:
        _mark_failure(job, "data_error", str(error), retry=False, trial=trial)
        raise
    except Exception as error:
        _mark_failure(job, "code_error", f"{type(error).__name__}: {error}", retry=True, trial=trial)
        raise

    result["status"] = trial.finish(result) if trial else "finished"
    result["job_id"] = job.id if job else None
    result["worker"] = {"host": socket.gethostname(), "name": job.worker_name if job else None}
    result["code"] = code
    if job is not None:
        summary = result | {
            "loss": experiment.loss,
            "optimizer": experiment.optimizer,
            "lr": experiment.lr,
            "batch_size": experiment.batch_size,
            "epochs": experiment.epochs,
            "finished_at": time.time(),
            "context": context or {},
        }
        if trial is not None:
            summary |= trial.summary_fields(result["status"])
        job.meta["status"] = result["status"]
        job.save_meta()
        record_run(job.connection, summary)
    return result


def with_worker_code(context: dict[str, Any] | None, job: Job | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's context plus the training side (`context["worker"]`), and the code comparison.

    The worker's commit is the one its process imported at start-up, not the checkout's HEAD now.
    """
    context = dict(context or {})
    worker_code = loaded_code_state()
    context["worker"] = {
        "host": socket.gethostname(),
        "name": job.worker_name if job else None,
        "git_sha": worker_code["git_sha"],
        "git_dirty": worker_code["git_dirty"],
    }
    return context, compare_code(context, worker_code)


def aggregate_folds(
    search: dict[str, Any], spec: dict[str, Any], folds: list[dict[str, Any]], run_name: str
) -> dict[str, Any]:
    """Mean ± std of a k-fold set's folds, once they have run (the job depends on them)."""
    from worker.kfold import aggregate

    job = get_current_job()
    try:
        return aggregate(job, search, spec, folds, run_name)
    except SpecError as error:
        _mark_failure(job, "spec_error", str(error), retry=False)
        raise


class JobProgress:
    """Writes each epoch's report into the RQ job's meta, where `runyard status` reads it.

    For a search point it also asks the search's pruner; True stops training after this epoch.
    """

    def __init__(self, job: Job | None, trial: SearchTrial | None = None):
        self.job = job
        self.trial = trial
        self.history: list[dict[str, float]] = []

    def on_epoch(self, report) -> bool:
        stop = self.trial.should_stop(report) if self.trial is not None else False
        if self.job is None:
            return stop
        self.history.append({"epoch": report.epoch, "train_loss": report.train_loss, "val_f1": report.val_f1})
        self.job.meta["progress"] = asdict(report)
        self.job.meta["history"] = self.history
        self.job.save_meta()
        return stop


def _mark_failure(job: Job | None, reason: str, message: str, retry: bool, trial: SearchTrial | None = None) -> None:
    """Say why the job failed in its meta; with retry=False, RQ's Retry policy is not used up on it."""
    if trial is not None:
        trial.fail(final=not retry or job is None or not job.retries_left)
    if job is None:
        return
    job.meta["failure_reason"] = reason
    job.meta["failure_message"] = message[:2000]
    job.save_meta()
    if not retry:
        job.retries_left = 0

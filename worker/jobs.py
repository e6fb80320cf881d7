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

RUN_EXPERIMENT = "worker.jobs.run_experiment"
ENTRY_POINTS = frozenset({RUN_EXPERIMENT})
CALLBACKS: frozenset[str] = frozenset()

FAILURE_REASONS = ("spec_error", "data_error", "oom", "crashed", "cancelled", "code_error")

log = logging.getLogger("runyard.jobs")


def run_experiment(spec: dict[str, Any], context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one experiment spec (a JSON dict) and return its result; progress goes to job.meta."""
    job = get_current_job()
    try:
        experiment = load_spec(spec)
    except SpecError as error:
        _mark_failure(job, "spec_error", str(error), retry=False)
        raise

    from trainer.data import DataError
    from trainer.train import train

    context, code = with_worker_code(context, job)
    if job is not None:
        job.meta["code"] = code
        job.save_meta()
    progress = JobProgress(job)
    try:
        result = train(experiment, on_epoch=progress.on_epoch, context=context)
    except DataError as error:
        _mark_failure(job, "data_error", str(error), retry=False)
        raise
    except Exception as error:
        _mark_failure(job, "code_error", f"{type(error).__name__}: {error}", retry=True)
        raise

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


class JobProgress:
    """Writes each epoch's report into the RQ job's meta, where `runyard status` reads it."""

    def __init__(self, job: Job | None):
        self.job = job
        self.history: list[dict[str, float]] = []

    def on_epoch(self, report) -> bool:
        if self.job is None:
            return False
        self.history.append({"epoch": report.epoch, "train_loss": report.train_loss, "val_f1": report.val_f1})
        self.job.meta["progress"] = asdict(report)
        self.job.meta["history"] = self.history
        self.job.save_meta()
        return False


def _mark_failure(job: Job | None, reason: str, message: str, retry: bool) -> None:
    """Say why the job failed in its meta; with retry=False, RQ's Retry policy is not used up on it."""
    if job is None:
        return
    job.meta["failure_reason"] = reason
    job.meta["failure_message"] = message[:2000]
    job.save_meta()
    if not retry:
        job.retries_left = 0

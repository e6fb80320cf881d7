"""The functions a runyard worker runs. A job naming anything else is refused (see worker.allow_listed_job).

Torch is imported inside the functions, in RQ's work horse, never in the worker's parent process.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import asdict
from typing import Any

from rq import Retry, get_current_job
from rq.job import Job

from contracts.job_meta import FailureReason, set_failure, update_job_meta
from contracts.spec import ExperimentSpec, SpecError, load_spec
from trainer.interrupt import CANCELLED, LOST, PREEMPTED, SETUP_BOUNDARY, SHUTDOWN, ResumeInfo, TrainingInterrupted
from trainer.paths import runs_root
from worker.asha import enqueue_promotions, promotion_started, report_rung
from worker.code_version import compare_code, loaded_code_state
from worker.control import JobControl
from worker.preemption import record_preemption
from worker.progress import MetaWriter
from worker.results import record_run
from worker.search_stop import SearchStopped, cancel_waiting_points, record_data_error, search_stopped
from worker.search_trial import SearchTrial, open_search_trial

RUN_EXPERIMENT = "worker.jobs.run_experiment"
AGGREGATE_FOLDS = "worker.jobs.aggregate_folds"
ENTRY_POINTS = frozenset({RUN_EXPERIMENT, AGGREGATE_FOLDS})
CALLBACKS: frozenset[str] = frozenset()

# A run's files cannot be written: retrying on the same box fails the same way until someone acts.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

# A warm shutdown returns RQ's Retry: the job goes back to the front of its queue. It is not a
# failure, so the bound only stops a job that is shut down over and over from looping forever.
SHUTDOWN_REQUEUES = 100

log = logging.getLogger("runyard.jobs")


class JobCancelled(RuntimeError):
    """`runyard cancel` stopped this job at a step boundary; its checkpoint is kept."""


class JobLost(RuntimeError):
    """This work horse no longer owns its job (it was requeued elsewhere); nothing was recorded."""


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory even at the spec's min_batch_size."""


class StorageFailure(RuntimeError):
    """The run's directory or a checkpoint cannot be written (disk full, read-only, no permission)."""


def storage_problem(error: BaseException, run_root: str) -> str | None:
    """One line naming the errno and the path when `error` (or its cause) is a storage failure."""
    for _depth in range(8):  # the error, its cause, their causes
        if error is None:
            break
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            name = errno.errorcode.get(error.errno, str(error.errno))
            where = error.filename or f"a file under {run_root}"
            hint = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
            return (
                f"{name} ({error.strerror}) writing {where}: {hint} on this worker's box (or set output_dir), "
                "then publish the run again"
            )
        error = error.__cause__ or error.__context__
    return None


def run_experiment(
    spec: dict[str, Any], context: dict[str, Any] | None = None, search: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one experiment spec (a JSON dict) and return its result; progress goes to job.meta.

    `search` (set by schedule-search) makes the run a point of a search: a bayes point's params are
    sampled here, a pruner may stop it early (status `pruned`), an ASHA point pauses at its rung
    (status `paused`, see worker.asha), and its record joins the search's.
    """
    job = get_current_job()
    trial, experiment = _load_experiment(job, spec, search)
    context, code = _start_job(job, trial, context)
    progress = JobProgress(job, trial)
    experiment = progress.apply_adjustments(experiment)
    control = JobControl(job)
    # Cancelled or preempted while it was being dequeued: stop before the seconds of importing torch.
    reason = control.should_stop(boundary=SETUP_BOUNDARY) if job is not None else None
    if reason in (CANCELLED, PREEMPTED):
        progress.close()
        return _stopped(job, TrainingInterrupted(reason, trained_epoch(job)), trial)
    from trainer.train import train

    try:
        try:
            result = train(
                experiment,
                on_epoch=progress.on_epoch,
                context=context,
                should_stop=control.should_stop,
                on_resume=progress.on_resume,
                resume=job is not None,
            )
        finally:
            progress.close()  # the last epoch's report lands before any write below
    except TrainingInterrupted as stop:
        return _stopped(job, stop, trial)
    except Exception as error:
        _record_failure(job, trial, experiment, (search or {}).get("name"), error)
        raise
    if job is not None and control.should_stop(force=True) == LOST:  # requeued meanwhile: its new owner reports
        raise JobLost(f"job {job.id} was requeued while this worker trained it")
    return _finish(job, trial, experiment, context, code, result)


def trained_epoch(job: Job) -> int:
    """The last epoch an earlier attempt of `job` trained (0 for a first attempt), from its meta."""
    return max((int(row["epoch"]) for row in job.meta.get("history") or []), default=0)


def _load_experiment(
    job: Job | None, spec: dict[str, Any], search: dict[str, Any] | None
) -> tuple[SearchTrial | None, ExperimentSpec]:
    """The search point's trial (None outside a search) and the checked spec; refuses a stopped search."""
    trial = None
    try:
        trial = open_search_trial(job, search)
        experiment = load_spec(trial.complete_spec(spec) if trial else spec)
    except SpecError as error:
        _mark_failure(job, "spec_error", str(error), retry=False, trial=trial)
        raise
    search_name = (search or {}).get("name")
    stopped = search_stopped(job.connection, search_name) if job is not None and search_name else None
    if stopped is not None:
        _mark_failure(job, "search_stopped", stopped["reason"], retry=False, trial=trial)
        raise SearchStopped(f"search {search_name} {stopped['reason']}")
    return trial, experiment


def _start_job(
    job: Job | None, trial: SearchTrial | None, context: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's context (with this worker's code) and the code comparison, also saved in the job's meta."""
    context, code = with_worker_code(context, job)
    if trial is not None:
        context["search"] = trial.payload.name  # the run store groups a search's runs by it
    if job is not None:
        update_job_meta(job.meta, code=code)
        if trial is not None and trial.payload.asha is not None:
            _start_rung(job, trial)
        job.save_meta()
    return context, code


def _record_failure(
    job: Job | None, trial: SearchTrial | None, experiment: ExperimentSpec, search_name: str | None, error: Exception
) -> None:
    """Say in the job's meta why training failed; raises the runyard error that names it, if there is one."""
    from trainer.data import DataError
    from trainer.oom import is_out_of_memory
    from trainer.store import StoreError

    if isinstance(error, DataError):
        _mark_failure(job, "data_error", str(error), retry=False, trial=trial)
        if job is not None and search_name:
            _count_data_error(job, search_name, str(error))
        return
    if isinstance(error, StoreError):
        _mark_failure(job, "store_error", str(error), retry=False, trial=trial)
        return
    if is_out_of_memory(error):
        message = f"{error}; the batch cannot be halved further (min_batch_size {experiment.min_batch_size})"
        _mark_failure(job, "oom", message, retry=False, trial=trial)
        raise OutOfMemory(str(error)) from error
    problem = storage_problem(error, str(runs_root(experiment.output_dir)))
    if problem is not None:
        _mark_failure(job, "storage_error", problem, retry=False, trial=trial)
        raise StorageFailure(problem) from error
    _mark_failure(job, "code_error", f"{type(error).__name__}: {error}", retry=True, trial=trial)


def _finish(
    job: Job | None,
    trial: SearchTrial | None,
    experiment: ExperimentSpec,
    context: dict[str, Any],
    code: dict[str, Any],
    result: dict[str, Any],
) -> dict[str, Any]:
    """Complete a trained run's result, record the run (leaderboard, search) and report an ASHA rung."""
    result["status"] = trial.finish(result) if trial else "finished"
    result["job_id"] = job.id if job else None
    result["worker"] = {"host": socket.gethostname(), "name": job.worker_name if job else None}
    result["code"] = code
    if job is None:
        return result
    summary = {
        "loss": experiment.loss,
        "optimizer": experiment.optimizer,
        "lr": experiment.lr,
        "batch_size": experiment.batch_size,
        "epochs": experiment.epochs,
        "finished_at": time.time(),
        "context": context or {},
    } | result  # the result's batch_size is the one trained with, after any out-of-memory retry
    if trial is not None:
        summary |= trial.summary_fields(result["status"])
    update_job_meta(job.meta, status=result["status"])
    job.save_meta()
    record_run(job.connection, summary)
    if trial is not None and trial.payload.asha is not None:
        _report_rung(job, trial, result["run_name"])
    return result


def _count_data_error(job: Job, search_name: str, message: str) -> None:
    """The search stops (its waiting points cancelled) when this is its Nth identical data error."""
    if record_data_error(job.connection, search_name, message, job.description):
        cancelled = cancel_waiting_points(job.connection, search_name)
        log.warning("search %s stopped after repeated data errors; %d queued points cancelled", search_name, cancelled)


def _start_rung(job: Job, trial: SearchTrial) -> None:
    """An ASHA point's job says in its meta where it pauses; a promotion's job is no longer pending."""
    asha = trial.payload.asha
    update_job_meta(job.meta, rung=asha.rung, rung_epochs=asha.rung_epochs()[asha.rung])
    if asha.rung > 0:
        promotion_started(job.connection, trial.payload.name, trial.payload.point)


def _report_rung(job: Job, trial: SearchTrial, run_name: str) -> None:
    """Report the rung this ASHA point reached, and enqueue the promotions that report makes due."""
    score = trial.metric.score(trial.best)
    promotions = report_rung(
        job.connection, trial.payload.name, trial.payload.point, trial.payload.asha, score, run_name, job
    )
    enqueue_promotions(job.connection, promotions)


def _stopped(job: Job | None, stop: TrainingInterrupted, trial: SearchTrial | None = None):
    """What a job interrupted at a step boundary leaves behind, by reason."""
    if stop.reason == SHUTDOWN:
        log.info("job %s: worker shutting down; requeued to resume after epoch %d", job.id if job else "-", stop.epoch)
        if job is not None:
            shutdowns = int(job.meta.get("shutdowns", 0)) + 1
            update_job_meta(job.meta, shutdowns=shutdowns, shutdown_after_epoch=stop.epoch)
        return Retry(max=SHUTDOWN_REQUEUES, enqueue_at_front=True)
    if stop.reason == PREEMPTED:
        if job is not None:
            record_preemption(job, stop.epoch)
        return Retry(max=SHUTDOWN_REQUEUES, enqueue_at_front=True)  # like a shutdown: resumes from its checkpoint
    if stop.reason == LOST:
        raise JobLost(str(stop))
    message = f"cancelled by `runyard cancel` after epoch {stop.epoch}; its checkpoint is kept"
    _mark_failure(job, "cancelled", message, retry=False, trial=trial)  # the worker then marks it canceled
    raise JobCancelled(message)


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
    from trainer.store import StoreError
    from worker.fold_aggregate import aggregate

    job = get_current_job()
    try:
        return aggregate(job, search, spec, folds, run_name)
    except SpecError as error:
        _mark_failure(job, "spec_error", str(error), retry=False)
        raise
    except StoreError as error:
        _mark_failure(job, "store_error", str(error), retry=False)
        raise


class JobProgress:
    """Writes each epoch's report into the RQ job's meta, where `runyard status` reads it.

    The meta history is keyed by epoch: a resumed job starts from its checkpoint's history,
    so the history has no gap and no epoch twice. Writes go through a MetaWriter thread: a
    Redis outage of any length costs training no time, and the newest report lands once Redis
    is back. For a search point it also asks the search's pruner; True stops training after
    this epoch.
    """

    def __init__(self, job: Job | None, trial: SearchTrial | None = None):
        self.job = job
        self.trial = trial
        self.history: list[dict[str, float]] = []
        self.writer = MetaWriter(job) if job is not None else None

    def close(self) -> None:
        """Write the last report (waiting a few seconds at most) and stop the writer thread."""
        if self.writer is not None:
            self.writer.stop()

    def apply_adjustments(self, spec: ExperimentSpec) -> ExperimentSpec:
        """A requeued job keeps the smaller batch an out-of-memory retry settled on."""
        changes = (self.job.meta.get("batch_adjustment") if self.job is not None else None) or {}
        return ExperimentSpec.model_validate(spec.model_dump() | changes) if changes else spec

    def on_resume(self, info: ResumeInfo) -> None:
        if self.trial is not None:
            self.trial.resumed(info.history)
        if self.job is None:
            return
        meta = self.job.meta
        update_job_meta(meta, attempts=int(meta.get("attempts", 0)) + 1, resumed_from_epoch=info.start_epoch)
        if info.fallbacks:
            update_job_meta(meta, checkpoint_fallback=info.fallbacks)
        if info.start_epoch:
            update_job_meta(meta, resume_note=f"resumed after epoch {info.start_epoch} from {info.checkpoint}")
        elif info.fallbacks:
            update_job_meta(meta, resume_note="restarted from epoch 0: " + "; ".join(info.fallbacks))
        elif meta.get("history"):
            # An earlier attempt trained epochs, but their checkpoint is not on this box's filesystem.
            note = (
                f"restarted from epoch 0 on {socket.gethostname()}: the checkpoint of epoch "
                f"{meta['history'][-1]['epoch']} is not reachable here (set RUNYARD_STORE on every "
                "box to a shared path or s3://BUCKET/PREFIX to resume anywhere)"
            )
            update_job_meta(meta, resume_note=note)
            log.warning("job %s: %s", self.job.id, note)  # not only in the meta
        self.history = [self._row(report) for report in info.history]
        update_job_meta(meta, history=self.history)
        if info.adjustments:
            batch = {key: value for adjustment in info.adjustments for key, value in adjustment["to"].items()}
            update_job_meta(meta, oom_adjustments=info.adjustments, batch_adjustment=batch)
        self._save()

    def on_epoch(self, report) -> bool:
        stop = self.trial.should_stop(report) if self.trial is not None else False
        if self.job is None:
            return stop
        self.history = [row for row in self.history if row["epoch"] < report.epoch] + [self._row(report)]
        update_job_meta(
            self.job.meta,
            progress=asdict(report),
            history=self.history,
            checkpoint_at=time.time(),  # the trainer saved this epoch's checkpoint (preemption)
            artifacts_pending=getattr(report, "store_pending", 0),
        )
        self._save()
        return stop

    @staticmethod
    def _row(report) -> dict[str, float]:
        return {"epoch": report.epoch, "train_loss": report.train_loss, "val_f1": report.val_f1}

    def _save(self) -> None:
        self.writer.submit(self.job.meta)


def _mark_failure(
    job: Job | None, reason: FailureReason, message: str, retry: bool, trial: SearchTrial | None = None
) -> None:
    """Say why the job failed in its meta; with retry=False, RQ's Retry policy is not used up on it."""
    if trial is not None:
        trial.fail(final=not retry or job is None or not job.retries_left)
    if job is None:
        return
    set_failure(job.meta, reason, message)
    job.save_meta()
    if not retry:
        job.retries_left = 0

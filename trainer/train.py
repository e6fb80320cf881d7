"""The training loop: one spec in, a run dir and a JSON-ready result out.

It knows nothing of Redis or RQ. Whoever runs it hands it `on_epoch`, called after every epoch
with an EpochReport; returning True from it stops training after that epoch (a pruner or a cancel
flag answers through it). `should_stop`, asked after every optimizer step (the step boundary)
and before every epoch, returns a reason to stop now (see trainer.interrupt: shutdown, cancelled, lost); training then
raises TrainingInterrupted and the last finished epoch's checkpoint is what remains.

Run dir ($RUNYARD_HOME/runs/<run_name>, or the spec's output_dir):
    spec.json  metrics.csv  train.log  result.json  checkpoints/{best,last}.pt  wandb/
    pictures/{confusion_matrix,per_class_f1,val_predictions}.png  submission.csv (with eval_dir)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from contracts.epoch_report import EpochReport
from contracts.spec import ExperimentSpec
from trainer import checkpoint, compute, oom, store_sync
from trainer.checkpoint import Progress
from trainer.checkpoint import save_atomic as save_atomic  # callers import it from here too
from trainer.epoch_steps import (
    AppendMetricsRow,
    EarlyStopping,
    EpochOutcome,
    EpochStep,
    LogEpochLine,
    LogToTracker,
    ReportToCaller,
    SaveCheckpoints,
    UploadToStore,
    log_report,
    run_epoch_steps,
    start_metrics_csv,
)
from trainer.final_steps import FinishedRun, run_final_steps
from trainer.interrupt import LOST, SETUP_BOUNDARY, ResumeInfo, TrainingInterrupted
from trainer.learner import Learner, StopCallback
from trainer.models import parameter_count
from trainer.paths import runs_root
from trainer.store import StoreError, open_store
from trainer.store_sync import StoreSync
from trainer.tracking import WandbTracker

log = logging.getLogger("runyard.trainer")


EpochCallback = Callable[[EpochReport], "bool | None"]
ResumeCallback = Callable[[ResumeInfo], None]


def write_run_files(run_dir: Path, spec: ExperimentSpec, run_name: str, context: dict[str, Any]) -> None:
    """spec.json, and context.json: who published it and which code versions published and trained
    it (see worker.code_version)."""
    (run_dir / "spec.json").write_text(json.dumps(spec.to_payload() | {"run_name": run_name}, indent=2))
    (run_dir / "context.json").write_text(json.dumps(context, indent=2, default=str))


def start_tracker(spec: ExperimentSpec, run_name: str, run_dir: Path, config: dict[str, Any]) -> WandbTracker:
    """The run's W&B run, its config the spec plus `config`."""
    return WandbTracker(
        run_name,
        run_dir,
        spec.to_payload() | {"run_name": run_name, "spec_hash": spec.spec_hash()} | config,
        project=spec.wandb.project,
        entity=spec.wandb.entity,
        group=spec.wandb.group,
        tags=spec.wandb.tags,
        job_type="fold" if spec.kfold.k > 1 else "train",
    )


class Trainer(Learner):
    """A Learner that owns a run: its run dir, store upload and W&B run; fits the spec and runs the
    steps after each epoch (trainer.epoch_steps) and after the last (trainer.final_steps)."""

    def __init__(
        self,
        spec: ExperimentSpec,
        context: dict[str, Any] | None = None,
        compute_plan: compute.ComputePlan | None = None,
    ):
        self.started = time.perf_counter()
        self.run_name = spec.run_name or spec.default_run_name()
        self.run_dir = runs_root(spec.output_dir) / self.run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(spec.output_dir)  # the run dir is its cache when it is elsewhere
        self.sync: StoreSync | None = None
        self.context = context or {}
        super().__init__(spec, compute_plan)
        self.best_eval: dict[str, Any] | None = None  # the best epoch's validation, for the pictures
        self.stop_reason: str | None = None
        self.tracker: WandbTracker | None = None
        self.oom_adjustments: list[dict[str, Any]] = []
        self.checkpoint_fallbacks: list[str] = []  # checkpoints that would not load, and what was done

    def resume(self) -> ResumeInfo:
        """Continue from the newest checkpoint that loads, if there is one (see trainer.checkpoint)."""
        info = checkpoint.resume(self.state, self.run_dir, self.run_name, self.store, self.device)
        self.checkpoint_fallbacks = info.fallbacks
        return info

    def fit(self, on_epoch: EpochCallback | None = None, should_stop: StopCallback | None = None) -> dict[str, Any]:
        """Train for the spec's epochs (or until `on_epoch` says stop); return the result.

        Raises TrainingInterrupted when `should_stop` gives a reason at a step boundary.
        """
        self.should_stop = should_stop
        write_run_files(self.run_dir, self.spec, self.run_name, self.context)
        start_metrics_csv(self.run_dir / "metrics.csv", self.progress.history)
        if self.store.remote:
            self.sync = StoreSync(self.store, self.run_name, self.run_dir)
        # The data and model are ready, nothing trained yet: a stop asked during the set-up costs
        # nothing here, and the W&B run (seconds to start, and to finish) is not started for it.
        self.stop_if_asked(boundary=SETUP_BOUNDARY)
        config = {"context": self.context, "oom_adjustments": self.oom_adjustments}
        self.tracker = start_tracker(self.spec, self.run_name, self.run_dir, config)
        # A killed attempt's W&B records may never have reached disk or server: log the resumed
        # epochs again. W&B keeps steps increasing, so what it already holds is not duplicated.
        for report in self.progress.history:
            if report.epoch >= self.tracker.next_step:
                log_report(self.tracker, report)
        self._log_start()
        setup_seconds = time.perf_counter() - self.started
        try:
            stopped_early = self._train_epochs(self._epoch_steps(on_epoch), setup_seconds)
            return run_final_steps(self._finished_run(setup_seconds, stopped_early))
        finally:
            self.tracker.finish()

    def _epoch_steps(self, on_epoch: EpochCallback | None) -> list[EpochStep]:
        """What runs after each epoch, in order (see trainer.epoch_steps)."""
        steps: list[EpochStep] = [
            SaveCheckpoints(self.state, self.run_dir),
            AppendMetricsRow(self.run_dir / "metrics.csv"),
        ]
        if self.sync is not None:  # uploaded while the next epoch trains
            steps.append(UploadToStore(self.sync, self.run_dir, self.progress))
        steps += [LogToTracker(self.tracker), LogEpochLine()]
        if on_epoch is not None:  # a cancel or a pruner
            steps.append(ReportToCaller(on_epoch))
        if self.spec.early_stopping_patience:
            steps.append(EarlyStopping(self.spec.early_stopping_patience))
        return steps

    def _train_epochs(self, steps: list[EpochStep], setup_seconds: float) -> bool:
        """The remaining epochs, each followed by `steps`; True when a step stopped before the last."""
        for epoch in range(self.progress.start_epoch + 1, self.spec.epochs + 1):
            self.stop_if_asked(boundary="epoch")
            outcome = self._run_epoch(epoch, setup_seconds)
            run_epoch_steps(steps, outcome)
            if outcome.stop:
                self.stop_reason = outcome.stop_reason
                return epoch < self.spec.epochs
        return False

    def _run_epoch(self, epoch: int, setup_seconds: float) -> EpochOutcome:
        """Train and evaluate one epoch; its report joins the run's progress."""
        epoch_started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss, train_acc = self.train_one_epoch()
        self.scheduler.step()
        val = self.evaluate()
        progress = self.progress
        improved = val["f1"] > progress.best["val_f1"]
        if improved:
            progress.best = {"epoch": epoch, "val_f1": val["f1"], "val_acc": val["acc"], "val_loss": val["loss"]}
            self.best_eval = val
        now = time.perf_counter()
        per_epoch = (now - self.started - setup_seconds) / (epoch - progress.start_epoch)
        report = EpochReport(
            epoch=epoch,
            epochs=self.spec.epochs,
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=val["loss"],
            val_acc=val["acc"],
            val_f1=val["f1"],
            lr=lr,
            seconds=now - epoch_started,
            best_val_f1=progress.best["val_f1"],
            best_epoch=progress.best["epoch"],
            eta_seconds=per_epoch * (self.spec.epochs - epoch),
            train_seconds=self.epoch_timing[0],
            data_seconds=self.epoch_timing[1],
        )
        progress.history.append(report)
        return EpochOutcome(report, improved)

    def finish_store(self, status: str, result: dict[str, Any] | None = None, best_effort: bool = False) -> None:
        """Wait until the run's files are durable in the store (no-op without a separate store).

        Raises StoreError when they are not; with `best_effort` (a run that stops anyway) it only logs.
        """
        sync, self.sync = self.sync, None
        if sync is None:
            return
        summary = store_summary(self.progress, self.context, result)
        try:
            sync.finish(status, summary, timeout=60 if best_effort else store_sync.FINISH_TIMEOUT_S)
            log.info("run %s: %s in the store at %s", self.run_name, status, self.store.run_url(self.run_name))
        except StoreError as error:
            if not best_effort:
                raise
            log.warning("run %s: the store did not get every file before stopping: %s", self.run_name, error)

    def drop_store(self) -> None:
        """Upload nothing more (this process lost the run to another box)."""
        sync, self.sync = self.sync, None
        if sync is not None:
            sync.drop()

    def _log_start(self) -> None:
        spec = self.spec
        log.info(
            "run %s: %s (%d parameters) on %s, %d train / %d val images, %d epochs",
            self.run_name,
            spec.model,
            parameter_count(self.model),
            self.device,
            len(self.train_loader.dataset),
            len(self.val_loader.dataset),
            spec.epochs,
        )
        if self.progress.start_epoch:
            log.info("run %s: resuming after epoch %d from %s", self.run_name, self.progress.start_epoch, self.run_dir)

    def _finished_run(self, setup_seconds: float, stopped_early: bool) -> FinishedRun:
        """What the end-of-run steps read (see trainer.final_steps)."""
        images = {"train": len(self.train_loader.dataset), "val": len(self.val_loader.dataset)}
        return FinishedRun(
            run_name=self.run_name,
            run_dir=self.run_dir,
            spec=self.spec,
            device=self.device,
            progress=self.progress,
            tracker=self.tracker,
            best_eval=self.best_eval,
            class_names=self.class_names,
            num_classes=self.num_classes,
            val_samples=self.val_loader.dataset.samples,
            parameters=parameter_count(self.model),
            images=images | {"skipped": len(self.skipped_images)},
            skipped_images=self.skipped_images,
            started=self.started,
            setup_seconds=setup_seconds,
            store_url=self.store.run_url(self.run_name),
            checkpoint_fallbacks=self.checkpoint_fallbacks,
            oom_adjustments=self.oom_adjustments,
            stopped_early=stopped_early,
            stop_reason=self.stop_reason,
        )


def store_summary(progress: Progress, context: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    """What the store's manifest says of the run: its best, how far it got, its search and result."""
    summary = {
        "best": progress.best,
        "epoch": progress.last_epoch,
        "search": context.get("search"),  # `runyard gc --keep-top` ranks within a search
    }
    if result is not None:
        summary["result"] = {key: result[key] for key in ("best", "epochs_completed", "model") if key in result}
    return summary


def train(
    spec: ExperimentSpec,
    on_epoch: EpochCallback | None = None,
    context: dict[str, Any] | None = None,
    should_stop: StopCallback | None = None,
    on_resume: ResumeCallback | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train `spec` into its run dir and return the result (JSON-ready).

    `context` (who published it, from where, at which git commit) is logged beside the spec.
    With `resume`, training continues after the run dir's last checkpoint and `on_resume` is told
    where it starts. CUDA out of memory is retried in this process with a smaller batch (see
    trainer.oom); TrainingInterrupted propagates when `should_stop` asks to stop.
    """
    adjustments: list[dict[str, Any]] = []
    while True:
        trainer = Trainer(spec, context)
        trainer.oom_adjustments = adjustments
        retry = None
        with logging_to(trainer.run_dir / "train.log"):
            try:
                info = trainer.resume() if resume else ResumeInfo()
                info.adjustments = list(adjustments)
                if on_resume is not None:
                    on_resume(info)
                result = trainer.fit(on_epoch, should_stop)
                trainer.finish_store("finished", result)  # finished only once durable in the store
                return result
            except Exception as error:
                retry = oom.smaller_batch(spec, trainer.phase) if oom.is_out_of_memory(error) else None
                tell_store(trainer, error, retrying=retry is not None)
                if retry is None:
                    raise
                log.warning(
                    "run %s: %s; retrying with %s", trainer.run_name, str(error).splitlines()[0], retry[1]["to"]
                )
        # Outside the except block the error's traceback, and the tensors its frames held, are gone.
        spec, adjustment = retry
        spec = spec.model_copy(update={"run_name": trainer.run_name})  # same run dir, whatever the clock says
        adjustments.append(adjustment | {"after_epoch": trainer.progress.last_epoch})
        resume = resume or bool(trainer.progress.history)
        del trainer
        oom.free_memory()


@contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """The runyard loggers also write to `path` (a run's train.log) inside the block."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("runyard")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def tell_store(trainer: Trainer, error: Exception, retrying: bool) -> None:
    """A run that stopped with `error`: finish its upload as interrupted or failed, or drop it if lost."""
    if isinstance(error, TrainingInterrupted) and error.reason == LOST:
        trainer.drop_store()  # its new owner writes the run now
    elif not isinstance(error, StoreError):
        stopped = isinstance(error, TrainingInterrupted) or retrying
        trainer.finish_store("interrupted" if stopped else "failed", best_effort=True)

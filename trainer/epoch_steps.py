"""What happens after each epoch, in order: one small step each.

The Trainer trains and evaluates an epoch, appends its report to the run's progress, then hands
an EpochOutcome to each step in turn: save the checkpoints (the epoch's commit point), append the
metrics.csv row, queue the store upload, log to W&B, write the log line, tell the caller (a pruner
or a cancel flag answers), check early stopping. A step that says stop ends the run after this
epoch; the steps after it are not run.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from contracts.epoch_report import EpochReport
from trainer import checkpoint
from trainer.checkpoint import Progress, TrainingState

log = logging.getLogger("runyard.trainer")

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "seconds")
STORE_SMALL_FILES = ("metrics.csv", "train.log", "spec.json", "context.json")  # uploaded after every epoch


@dataclass
class EpochOutcome:
    """One finished epoch as the steps after it see it; a step sets `stop` to end the run after it."""

    report: EpochReport
    improved: bool  # a better val F1 than every epoch before
    saved: dict[str, Path] = field(default_factory=dict)  # the checkpoints written, by kind
    stop: bool = False
    stop_reason: str | None = None


class EpochStep(Protocol):
    """One thing done after every epoch."""

    def after_epoch(self, outcome: EpochOutcome) -> None: ...


def format_eta(seconds: float) -> str:
    """Seconds -> `1h05m` or `4m09s`, for log lines."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def start_metrics_csv(path: Path, history: Sequence[EpochReport]) -> None:
    """metrics.csv with its header and a row for each epoch already trained (a resumed run's)."""
    checkpoint.sync_metrics_csv(path, history, METRIC_COLUMNS)


def log_report(tracker: Any, report: EpochReport) -> None:
    """An epoch's report as W&B metrics at step = epoch."""
    logged = {key: value for key, value in asdict(report).items() if key not in ("epochs", "store_pending")}
    tracker.log(logged, step=report.epoch)


class SaveCheckpoints:
    """last.pt (the one before kept as previous.pt) and, when the epoch improved, best.pt.

    The checkpoint (with this epoch's report in its history) is the commit point of an epoch: a run
    killed after it resumes with the next epoch and logs this one if it went unlogged.
    """

    def __init__(self, state: TrainingState, run_dir: Path):
        self.state = state
        self.run_dir = run_dir

    def after_epoch(self, outcome: EpochOutcome) -> None:
        contents = checkpoint.checkpoint_contents(self.state, outcome.report.epoch, outcome.report.val_f1)
        outcome.saved = checkpoint.save_epoch(contents, self.run_dir, outcome.improved)


class AppendMetricsRow:
    """One metrics.csv row per epoch, in METRIC_COLUMNS order."""

    def __init__(self, path: Path):
        self.path = path

    def after_epoch(self, outcome: EpochOutcome) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([getattr(outcome.report, column) for column in METRIC_COLUMNS])


class UploadToStore:
    """Queue the epoch's checkpoints and small files for the run store; they upload while the next
    epoch trains, and the report says how many uploads are still pending."""

    def __init__(self, sync: Any, run_dir: Path, progress: Progress):
        self.sync = sync  # trainer.store_sync.StoreSync
        self.run_dir = run_dir
        self.progress = progress

    def after_epoch(self, outcome: EpochOutcome) -> None:
        small = [self.run_dir / name for name in STORE_SMALL_FILES]
        self.sync.epoch(outcome.report.epoch, outcome.saved, small, dict(self.progress.best))
        outcome.report.store_pending = self.sync.pending


class LogToTracker:
    """The epoch's metrics to W&B."""

    def __init__(self, tracker: Any):
        self.tracker = tracker  # trainer.tracking.WandbTracker

    def after_epoch(self, outcome: EpochOutcome) -> None:
        log_report(self.tracker, outcome.report)


class LogEpochLine:
    """One line in train.log: losses, accuracy, F1, the best so far, time and ETA."""

    def after_epoch(self, outcome: EpochOutcome) -> None:
        report = outcome.report
        log.info(
            "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f F1 %.4f | best F1 %.4f (epoch %d) | %.1fs"
            " (waiting for data %.1fs) | ETA %s",
            report.epoch,
            report.epochs,
            report.train_loss,
            report.train_acc,
            report.val_loss,
            report.val_acc,
            report.val_f1,
            report.best_val_f1,
            report.best_epoch,
            report.seconds,
            report.data_seconds,
            format_eta(report.eta_seconds),
        )


class ReportToCaller:
    """Hand the report to whoever runs the training (a pruner, a cancel flag); True from it stops."""

    def __init__(self, on_epoch: Callable[[EpochReport], bool | None]):
        self.on_epoch = on_epoch

    def after_epoch(self, outcome: EpochOutcome) -> None:
        if self.on_epoch(outcome.report):
            outcome.stop = True
            last = outcome.report.epoch >= outcome.report.epochs
            outcome.stop_reason = None if last else "requested"  # nothing was cut short after the last epoch


class EarlyStopping:
    """Stop when val F1 has not improved for `patience` epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def after_epoch(self, outcome: EpochOutcome) -> None:
        report = outcome.report
        if report.epoch - report.best_epoch < self.patience:
            return
        outcome.stop, outcome.stop_reason = True, "early_stopping"
        log.info(
            "early stopping: no better val F1 than %.4f (epoch %d) for %d epochs",
            report.best_val_f1,
            report.best_epoch,
            self.patience,
        )


def run_epoch_steps(steps: Sequence[EpochStep], outcome: EpochOutcome) -> None:
    """Each step in order, until one says stop."""
    for step in steps:
        step.after_epoch(outcome)
        if outcome.stop:
            return

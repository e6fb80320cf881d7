"""The steps after each epoch and after the last (trainer.epoch_steps, trainer.final_steps), each alone.

No training here: a one-layer model, its optimizer and scheduler stand for a run's parts, so each
step's effect on its files, the run's progress and the result is checked directly.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from contracts.epoch_report import EpochReport
from contracts.spec import load_spec
from trainer import checkpoint
from trainer.checkpoint import Progress, TrainingState
from trainer.epoch_steps import (
    METRIC_COLUMNS,
    AppendMetricsRow,
    EarlyStopping,
    EpochOutcome,
    ReportToCaller,
    SaveCheckpoints,
    UploadToStore,
    run_epoch_steps,
    start_metrics_csv,
)
from trainer.final_steps import DescribeRun, FinishedRun, SavePictures, WriteResultFile, WriteSubmission
from trainer.store import open_store
from trainer.store_sync import StoreSync
from trainer.tracking import WandbTracker


def report(epoch: int, best_epoch: int | None = None, epochs: int = 5, val_f1: float = 0.5) -> EpochReport:
    best = best_epoch or epoch
    return EpochReport(
        epoch=epoch,
        epochs=epochs,
        train_loss=1.0 / epoch,
        train_acc=0.5,
        val_loss=1.2 / epoch,
        val_acc=0.4,
        val_f1=val_f1,
        lr=1e-3,
        seconds=2.0,
        best_val_f1=0.5,
        best_epoch=best,
        eta_seconds=10.0,
    )


def training_state(seed: int = 0) -> TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    description = {
        "spec": {"model": "linear"},
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "class_counts": [1, 1, 1],
    }
    return TrainingState(
        model,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cpu", enabled=False),
        None,
        torch.Generator(),
        Progress(),
        description,
    )


def train_a_step(state: TrainingState) -> None:
    state.model(torch.ones(2, 4)).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    state.progress.steps += 1


def finish_epoch(state: TrainingState, epoch: int, improved: bool) -> EpochOutcome:
    """What the Trainer does before the steps: the report joins the progress, a better epoch becomes the best."""
    if improved:
        state.progress.best = {"epoch": epoch, "val_f1": 0.1 * epoch}
    state.progress.history.append(report(epoch, best_epoch=state.progress.best["epoch"]))
    return EpochOutcome(state.progress.history[-1], improved)


def test_save_checkpoints_keeps_the_last_two_and_the_best_and_a_fresh_state_resumes_from_last(tmp_path):
    state = training_state()
    save = SaveCheckpoints(state, tmp_path)
    train_a_step(state)
    first = finish_epoch(state, 1, improved=True)
    save.after_epoch(first)
    train_a_step(state)
    second = finish_epoch(state, 2, improved=False)
    save.after_epoch(second)

    assert set(first.saved) == {"last", "best"} and set(second.saved) == {"last"}
    folder = tmp_path / "checkpoints"
    assert [checkpoint.load_checkpoint(folder / f"{kind}.pt")["epoch"] for kind in ("last", "previous", "best")] == [
        2,
        1,
        1,
    ]

    fresh = training_state(seed=1)
    info = checkpoint.resume(fresh, tmp_path, "run", open_store(str(tmp_path / "runs")), "cpu")
    assert info.start_epoch == 2 and [item.epoch for item in info.history] == [1, 2]
    assert fresh.progress.best == {"epoch": 1, "val_f1": 0.1} and fresh.progress.last_epoch == 2
    assert torch.equal(fresh.model.weight, state.model.weight)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 2
    assert fresh.scheduler.get_last_lr() == state.scheduler.get_last_lr()


def test_a_checkpoint_holds_the_description_inference_reads_and_no_steps_without_ema():
    state = training_state()
    state.progress.history.append(report(1))
    contents = checkpoint.checkpoint_contents(state, 1, 0.5)
    assert {"spec", "num_classes", "class_names", "class_counts", "rng", "history"} <= set(contents)
    assert (contents["epoch"], contents["val_f1"], contents["num_classes"]) == (1, 0.5, 3)
    assert "ema" not in contents and "steps" not in contents
    assert contents["history"][0]["epoch"] == 1 and "loader" in contents["rng"]


def test_metrics_csv_starts_with_the_resumed_epochs_and_gets_one_row_per_epoch_in_column_order(tmp_path):
    path = tmp_path / "metrics.csv"
    start_metrics_csv(path, [report(1)])
    AppendMetricsRow(path).after_epoch(EpochOutcome(report(2), improved=False))
    with open(path) as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(METRIC_COLUMNS)
    assert [row[0] for row in rows[1:]] == ["1", "2"]
    assert float(rows[2][METRIC_COLUMNS.index("train_loss")]) == pytest.approx(0.5)


def test_report_to_caller_stops_as_requested_before_the_last_epoch_and_with_no_reason_at_it():
    asked = []
    step = ReportToCaller(lambda epoch_report: asked.append(epoch_report.epoch) or epoch_report.epoch >= 2)
    outcomes = [EpochOutcome(report(epoch, epochs=3), improved=True) for epoch in (1, 2, 3)]
    for outcome in outcomes:
        step.after_epoch(outcome)
    assert asked == [1, 2, 3]
    assert [(outcome.stop, outcome.stop_reason) for outcome in outcomes] == [
        (False, None),
        (True, "requested"),
        (True, None),
    ]


def test_early_stopping_stops_once_val_f1_has_not_improved_for_patience_epochs(caplog):
    step = EarlyStopping(patience=2)
    waiting, exhausted = EpochOutcome(report(3, best_epoch=2), False), EpochOutcome(report(4, best_epoch=2), False)
    with caplog.at_level(logging.INFO, logger="runyard.trainer"):
        step.after_epoch(waiting)
        step.after_epoch(exhausted)
    assert (waiting.stop, waiting.stop_reason) == (False, None)
    assert (exhausted.stop, exhausted.stop_reason) == (True, "early_stopping")
    assert "no better val F1 than 0.5000 (epoch 2) for 2 epochs" in caplog.text


def test_a_step_that_says_stop_is_the_last_step_run_after_that_epoch(tmp_path):
    path = tmp_path / "metrics.csv"
    start_metrics_csv(path, [])
    steps = [EarlyStopping(patience=1), AppendMetricsRow(path)]
    stopped = EpochOutcome(report(3, best_epoch=1), improved=False)
    run_epoch_steps(steps, stopped)
    assert stopped.stop and len(path.read_text().splitlines()) == 1  # the header only
    run_epoch_steps(steps, EpochOutcome(report(1), improved=True))
    assert len(path.read_text().splitlines()) == 2


def test_upload_to_store_queues_the_epochs_checkpoints_and_files_and_reports_what_is_pending(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNYARD_STORE", str(tmp_path / "shared" / "runyard"))
    (tmp_path / "shared").mkdir()
    store, run_dir = open_store(str(tmp_path / "runs")), tmp_path / "runs" / "up"
    state = training_state()
    state.progress.best = {"epoch": 1, "val_f1": 0.3}
    state.progress.history.append(report(1))
    outcome = EpochOutcome(state.progress.history[-1], improved=True)
    SaveCheckpoints(state, run_dir).after_epoch(outcome)
    start_metrics_csv(run_dir / "metrics.csv", state.progress.history)
    sync = StoreSync(store, "up", run_dir)
    UploadToStore(sync, run_dir, state.progress).after_epoch(outcome)
    assert outcome.report.store_pending is not None and outcome.report.store_pending >= 0
    sync.finish("finished", {"best": state.progress.best})
    manifest = store.read_manifest("up")
    assert set(manifest["checkpoints"]) == {"last", "best"} and "metrics.csv" in manifest["files"]
    assert manifest["checkpoints"]["last"]["epoch"] == 1


@pytest.fixture
def finished_run(tmp_path, monkeypatch) -> FinishedRun:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    spec = load_spec({"model": "test_resnet", "data_dir": str(tmp_path), "epochs": 3, "pictures": False})
    progress = Progress(best={"epoch": 2, "val_f1": 0.6}, history=[report(epoch, epochs=3) for epoch in (1, 2, 3)])
    return FinishedRun(
        run_name="done",
        run_dir=tmp_path,
        spec=spec,
        device=torch.device("cpu"),
        progress=progress,
        tracker=WandbTracker("done", tmp_path, {}),
        best_eval=None,
        class_names=["a"],
        num_classes=1,
        val_samples=[],
        parameters=123,
        images={"train": 10, "val": 4, "skipped": 1},
        skipped_images=["bad.jpg"],
        started=0.0,
        setup_seconds=1.23456,
        store_url=str(tmp_path),
        checkpoint_fallbacks=[],
        oom_adjustments=[],
        stopped_early=False,
        stop_reason=None,
    )


def test_the_result_describes_the_run_and_result_json_holds_it(finished_run):
    result: dict = {}
    for step in (DescribeRun(), SavePictures(), WriteSubmission(), WriteResultFile()):
        step.after_training(finished_run, result)
    assert (result["epochs_completed"], result["best"]["epoch"], result["last"]["epoch"]) == (3, 2, 3)
    assert result["durations"]["setup_s"] == 1.235 and result["durations"]["mean_epoch_s"] == 2.0
    assert result["images"] == {"train": 10, "val": 4, "skipped": 1} and result["parameters"] == 123
    assert "checkpoint_fallback" not in result and result["wandb"] == {"mode": "disabled"}
    assert "pictures" not in result and "submission" not in result  # pictures off, no eval_dir
    assert json.loads((Path(finished_run.run_dir) / "result.json").read_text()) == result

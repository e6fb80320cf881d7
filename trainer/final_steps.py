"""What happens once training ends, in order: the best model to W&B, the result, the pictures of the
best epoch, the submission (with an eval_dir), result.json. Each step adds its part to the result."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from contracts.spec import ExperimentSpec
from trainer.checkpoint import Progress
from trainer.pictures import save_run_pictures

log = logging.getLogger("runyard.trainer")


@dataclass
class FinishedRun:
    """What the end-of-run steps read of a run that finished training."""

    run_name: str
    run_dir: Path
    spec: ExperimentSpec
    device: torch.device
    progress: Progress
    tracker: Any  # trainer.tracking.WandbTracker
    best_eval: dict[str, Any] | None  # the best epoch's validation (confusion matrix, predictions)
    class_names: list[str]
    num_classes: int
    val_samples: list  # the validation split, in the order of best_eval's predictions
    parameters: int
    images: dict[str, int]  # train, val, skipped
    skipped_images: list[str]  # bad_images: skip: what the run was not trained on
    started: float  # time.perf_counter() when the Trainer was built
    setup_seconds: float
    store_url: str  # no credentials: see trainer.store.display_url
    checkpoint_fallbacks: list[str]  # checkpoints that would not load, and what was done
    oom_adjustments: list[dict[str, Any]]
    stopped_early: bool
    stop_reason: str | None


class FinalStep(Protocol):
    """One thing done once training ends; adds its part to `result`."""

    def after_training(self, run: FinishedRun, result: dict[str, Any]) -> None: ...


class TrackBestModel:
    """The best metrics as the W&B run's summary and best.pt as its model artifact."""

    def after_training(self, run: FinishedRun, result: dict[str, Any]) -> None:
        best = run.progress.best
        run.tracker.summary({f"best_{key}": value for key, value in best.items()})  # best_val_f1, best_epoch...
        run.tracker.log_artifact(
            run.run_dir / "checkpoints" / "best.pt",
            name=f"{run.run_name}-best",
            kind="model",
            aliases=["best"],
            metadata={"epoch": best["epoch"], "val_f1": best["val_f1"], "model": run.spec.model},
        )


class DescribeRun:
    """The result's body: what ran, how far, its best and last epoch, where its files and W&B run are."""

    def after_training(self, run: FinishedRun, result: dict[str, Any]) -> None:
        history = run.progress.history
        last = history[-1]
        result |= {
            "run_name": run.run_name,
            "spec_hash": run.spec.spec_hash(),
            "model": run.spec.model,
            "epochs_completed": last.epoch,
            "stopped_early": run.stopped_early,
            "best": run.progress.best,
            "last": {"epoch": last.epoch, "val_f1": last.val_f1, "val_acc": last.val_acc, "val_loss": last.val_loss},
            "run_dir": str(run.run_dir),
            "device": str(run.device),
            "parameters": run.parameters,
            "images": run.images,
            "skipped_images": run.skipped_images,
            "durations": {
                "total_s": round(time.perf_counter() - run.started, 3),
                "setup_s": round(run.setup_seconds, 3),
                "mean_epoch_s": round(sum(report.seconds for report in history) / len(history), 3),
            },
            "wandb": run.tracker.describe(),
            "resumed_from_epoch": run.progress.start_epoch,
            "store": run.store_url,
            **({"checkpoint_fallback": run.checkpoint_fallbacks} if run.checkpoint_fallbacks else {}),
            "batch_size": run.spec.batch_size,
            "grad_accum_steps": run.spec.grad_accum_steps,
            "oom_adjustments": run.oom_adjustments,
            "stop_reason": run.stop_reason,
        }


class SavePictures:
    """Confusion matrix, per-class F1 and sample predictions of the best epoch, also to W&B."""

    def after_training(self, run: FinishedRun, result: dict[str, Any]) -> None:
        if not run.spec.pictures or run.best_eval is None:
            return
        predictions = run.best_eval["predictions"].tolist()
        pictures = save_run_pictures(
            run.run_dir, run.best_eval["matrix"], run.val_samples, predictions, run.class_names
        )
        step = run.progress.history[-1].epoch
        run.tracker.log_images({f"pictures/{name}": path for name, path in pictures.items()}, step=step)
        result["pictures"] = {name: str(path) for name, path in pictures.items()}


class WriteSubmission:
    """With an eval_dir: submission.csv predicted by the best checkpoint, scored when answers exist."""

    def after_training(self, run: FinishedRun, result: dict[str, Any]) -> None:
        if not run.spec.eval_dir:
            return
        from trainer.infer import predict_submission, score_submission

        spec = run.spec
        output = run.run_dir / "submission.csv"
        path = predict_submission(
            [run.run_dir], spec.eval_dir, tta=spec.tta, output=output, device=run.device.type, progress=log.info
        )
        submission: dict[str, Any] = {"path": str(path), "tta": spec.tta}
        answers = Path(spec.eval_dir).expanduser() / "answers.csv"
        if answers.is_file():  # the demo data knows its eval labels
            submission |= {"eval": score_submission(path, answers, run.num_classes)}
            log.info("submission scored against %s: macro F1 %.4f", answers, submission["eval"]["f1"])
        run.tracker.log_artifact(
            path,
            name=f"{run.run_name}-submission",
            kind="submission",
            metadata={"tta": spec.tta, "best_epoch": run.progress.best["epoch"], **submission.get("eval", {})},
        )
        result["submission"] = submission


class WriteResultFile:
    """result.json in the run dir: the result as the caller gets it."""

    def after_training(self, run: FinishedRun, result: dict[str, Any]) -> None:
        (run.run_dir / "result.json").write_text(json.dumps(result, indent=2))


FINAL_STEPS: tuple[FinalStep, ...] = (
    TrackBestModel(),
    DescribeRun(),
    SavePictures(),
    WriteSubmission(),
    WriteResultFile(),
)


def run_final_steps(run: FinishedRun, steps: tuple[FinalStep, ...] = FINAL_STEPS) -> dict[str, Any]:
    """Each end-of-run step in order; returns the result they built."""
    result: dict[str, Any] = {}
    for step in steps:
        step.after_training(run, result)
    return result

"""The training loop: one spec in, a run dir and a JSON-ready result out.

It knows nothing of Redis or RQ. Whoever runs it hands it `on_epoch`, called after every epoch
with an EpochReport; returning True from it stops training after that epoch (a pruner or a cancel
flag answers through it). `should_stop`, asked after every optimizer step (the step boundary),
returns a reason to stop now (see trainer.interrupt: shutdown, cancelled, lost); training then
raises TrainingInterrupted and the last finished epoch's checkpoint is what remains.

Run dir ($RUNYARD_HOME/runs/<run_name>, or the spec's output_dir):
    spec.json  metrics.csv  train.log  result.json  checkpoints/{best,last}.pt  wandb/
    pictures/{confusion_matrix,per_class_f1,val_predictions}.png  submission.csv (with eval_dir)
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3

from contracts.epoch_report import EpochReport
from trainer import checkpoint, compute, oom, store_sync
from trainer.checkpoint import save_atomic
from trainer.data import DataError
from trainer.heads import predict_classes
from trainer.interrupt import LOST, ResumeInfo, TrainingInterrupted
from trainer.loaders import build_loaders, class_counts, class_names, load_samples, loader_workers
from trainer.losses import create_criterion
from trainer.metrics import accuracy, confusion_matrix, macro_f1
from trainer.mixing import BatchMixer
from trainer.models import create_model, normalization, parameter_count
from trainer.optim import create_optimizer, create_scheduler
from trainer.paths import runs_root
from trainer.pictures import save_run_pictures
from trainer.spec import ExperimentSpec
from trainer.store import StoreError, open_store
from trainer.store_sync import StoreSync
from trainer.tracking import WandbTracker

log = logging.getLogger("runyard.trainer")


EpochCallback = Callable[[EpochReport], "bool | None"]
StopCallback = Callable[..., "str | None"]  # called after each step, and with boundary="epoch" before each epoch
ResumeCallback = Callable[[ResumeInfo], None]
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(enabled: bool) -> None:
    """Deterministic kernels where they exist (cuDNN, cuBLAS); CPU training is deterministic already."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before the first matmul
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def pick_device(spec: ExperimentSpec) -> torch.device:
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def format_eta(seconds: float) -> str:
    """Seconds -> `1h05m` or `4m09s`, for log lines."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Autocast:
    """AMP on CUDA (bf16 where the GPU has it natively, else fp16 with a GradScaler); a no-op on CPU
    unless a `dtype` is given (tests run the CUDA paths on the CPU that way)."""

    def __init__(self, device: torch.device, enabled: bool, dtype: torch.dtype | None = None):
        self.enabled = enabled and (device.type == "cuda" or dtype is not None)
        self.dtype = dtype or (compute.cuda_amp_dtype() if self.enabled else torch.float16)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled and self.dtype == torch.float16)
        self.device_type = device.type

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class Trainer:
    """Builds everything a spec names (data, model, loss, optimizer, W&B run) and fits it."""

    def __init__(
        self,
        spec: ExperimentSpec,
        context: dict[str, Any] | None = None,
        compute_plan: compute.ComputePlan | None = None,
    ):
        self.started = time.perf_counter()
        self.spec = spec
        self.run_name = spec.run_name or spec.default_run_name()
        self.run_dir = runs_root(spec.output_dir) / self.run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(spec.output_dir)  # the run dir is its cache when it is elsewhere
        self.sync: StoreSync | None = None
        self.context = context or {}
        seed_everything(spec.seed)
        configure_determinism(spec.deterministic)
        self.device = pick_device(spec)
        # channels_last, AMP dtype, torch.compile, cuDNN autotuning (see trainer.compute)
        self.compute = compute_plan or compute.plan_compute(spec, self.device)
        compute.configure_backends(self.compute, self.device, loader_workers(spec, self.device))
        if spec.eval_dir and not (Path(spec.eval_dir).expanduser() / "info.csv").is_file():
            # Found out now, not after hours of training.
            raise DataError(f"eval_dir {spec.eval_dir} has no info.csv (an eval dir holds images/ and info.csv)")
        samples, self.num_classes = load_samples(spec)
        self.class_names = class_names(spec, self.num_classes)
        self.model = create_model(spec, self.num_classes).to(self.device)
        self.forward = compute.prepare_model(self.model, self.compute)
        mean, std = normalization(self.model)
        self.train_loader, self.val_loader = build_loaders(spec, samples, mean, std, self.device)
        self.skipped_images = self.train_loader.dataset.skipped + self.val_loader.dataset.skipped
        self.class_counts = class_counts(self.train_loader.dataset.samples, self.num_classes)
        self.loss_fn = create_criterion(spec, self.num_classes, self.class_counts).to(self.device)
        self.mixer = BatchMixer(spec.mixup, spec.cutmix) if spec.mixup or spec.cutmix else None
        # Decay warm-up: early updates follow the weights closely, so short runs still gain.
        self.ema = ModelEmaV3(self.model, decay=spec.ema_decay, use_warmup=True) if spec.ema_decay else None
        self.optimizer = create_optimizer(spec, self.model)
        self.scheduler = create_scheduler(spec, self.optimizer)
        self.autocast = Autocast(self.device, self.compute.amp_dtype is not None, self.compute.amp_dtype)
        self.best: dict[str, Any] = {"epoch": 0, "val_f1": -1.0}
        self.best_eval: dict[str, Any] | None = None  # the best epoch's validation, for the pictures
        self.steps = 0
        self.stop_reason: str | None = None
        self.history: list[EpochReport] = []
        self.tracker: WandbTracker | None = None
        self.start_epoch = 0  # epochs already trained by an earlier attempt (see resume)
        self.should_stop: StopCallback | None = None
        self.phase = "setup"  # "train" or "eval": where an out-of-memory error came from
        self.oom_adjustments: list[dict[str, Any]] = []
        self.checkpoint_fallbacks: list[str] = []  # checkpoints that would not load, and what was done
        self.epoch_timing = (0.0, 0.0)  # the last training pass: (seconds, of which waiting for data)

    def resume(self) -> ResumeInfo:
        """Continue from the newest checkpoint that loads, if there is one (see trainer.checkpoint)."""
        info = checkpoint.resume(self)
        self.checkpoint_fallbacks = info.fallbacks
        return info

    def fit(self, on_epoch: EpochCallback | None = None, should_stop: StopCallback | None = None) -> dict[str, Any]:
        """Train for the spec's epochs (or until `on_epoch` says stop); return the result.

        Raises TrainingInterrupted when `should_stop` gives a reason at a step boundary.
        """
        spec = self.spec
        self.should_stop = should_stop
        (self.run_dir / "spec.json").write_text(json.dumps(spec.to_payload() | {"run_name": self.run_name}, indent=2))
        # Who published it and which code versions published and trained it (see worker.code_version).
        (self.run_dir / "context.json").write_text(json.dumps(self.context, indent=2, default=str))
        if self.start_epoch:
            checkpoint.sync_metrics_csv(self.run_dir / "metrics.csv", self.history, METRIC_COLUMNS)
        else:
            with open(self.run_dir / "metrics.csv", "w", newline="") as handle:
                csv.writer(handle).writerow(METRIC_COLUMNS)
        if self.store.remote:
            self.sync = StoreSync(self.store, self.run_name, self.run_dir)
        self.tracker = self._start_tracker()
        # A killed attempt's W&B records may never have reached disk or server: log the resumed
        # epochs again. W&B keeps steps increasing, so what it already holds is not duplicated.
        for report in self.history:
            if report.epoch >= self.tracker.next_step:
                self._log_to_tracker(report)
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
        setup_seconds = time.perf_counter() - self.started
        stopped_early = False
        if self.start_epoch:
            log.info("run %s: resuming after epoch %d from %s", self.run_name, self.start_epoch, self.run_dir)
        try:
            for epoch in range(self.start_epoch + 1, spec.epochs + 1):
                self._step_boundary(boundary="epoch")
                report = self._run_epoch(epoch, setup_seconds)
                if on_epoch is not None and on_epoch(report):
                    stopped_early = epoch < spec.epochs
                    self.stop_reason = "requested" if stopped_early else None  # a cancel or a pruner
                    break
                if self._patience_exhausted(report):
                    stopped_early = epoch < spec.epochs
                    break
            result = self._result(setup_seconds, stopped_early) | self._write_outputs()
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
            return result
        finally:
            self.tracker.finish()

    def _run_epoch(self, epoch: int, setup_seconds: float) -> EpochReport:
        epoch_started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss, train_acc = self.train_one_epoch()
        self.scheduler.step()
        val = self.evaluate()
        improved = val["f1"] > self.best["val_f1"]
        if improved:
            self.best = {"epoch": epoch, "val_f1": val["f1"], "val_acc": val["acc"], "val_loss": val["loss"]}
            self.best_eval = val
        now = time.perf_counter()
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
            best_val_f1=self.best["val_f1"],
            best_epoch=self.best["epoch"],
            eta_seconds=(now - self.started - setup_seconds) / (epoch - self.start_epoch) * (self.spec.epochs - epoch),
            train_seconds=self.epoch_timing[0],
            data_seconds=self.epoch_timing[1],
        )
        self.history.append(report)
        # The checkpoint (with this report in its history) is the commit point of an epoch: a run
        # killed after it resumes with the next epoch and logs this one if it went unlogged.
        state = self._checkpoint(epoch, val["f1"])
        saved = {"last": checkpoint.save_last(state, self.run_dir)}
        if improved:
            saved["best"] = self.run_dir / "checkpoints" / "best.pt"
            save_atomic(state, saved["best"])
        del state
        with open(self.run_dir / "metrics.csv", "a", newline="") as handle:
            csv.writer(handle).writerow([getattr(report, column) for column in METRIC_COLUMNS])
        if self.sync is not None:  # uploaded while the next epoch trains
            small = [self.run_dir / name for name in ("metrics.csv", "train.log", "spec.json", "context.json")]
            self.sync.epoch(epoch, saved, small, dict(self.best))
            report.store_pending = self.sync.pending
        self._log_to_tracker(report)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f F1 %.4f | best F1 %.4f (epoch %d) | %.1fs"
            " (waiting for data %.1fs) | ETA %s",
            epoch,
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
        return report

    def train_one_epoch(self) -> tuple[float, float]:
        """One pass over the training loader; returns mean loss and accuracy.

        With grad_accum_steps = k, gradients of k batches are summed (each loss scaled by 1/k)
        before one optimizer step; a trailing group of fewer than k batches is skipped, as
        drop_last skips a short batch, so the effective batch is always batch_size x k.
        The time spent waiting for batches is kept in `epoch_timing` (train seconds, data seconds).
        """
        self.model.train()
        self.phase = "train"
        accumulation = self.spec.grad_accum_steps
        usable_batches = len(self.train_loader) - len(self.train_loader) % accumulation
        total_loss, correct, seen = 0.0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        started = waiting_since = time.perf_counter()
        data_seconds = 0.0
        for index, (images, labels) in enumerate(self.train_loader):
            if index >= usable_batches:
                break
            oom.inject_fault(len(labels))
            images = self._on_device(images, self.train_loader)
            labels = labels.to(self.device, non_blocking=True)
            data_seconds += time.perf_counter() - waiting_since
            mixed = self.mixer(images, labels) if self.mixer else None
            with self.autocast():
                logits = self.forward(mixed.images if mixed else images)
                loss = mixed.loss(self.loss_fn, logits) if mixed else self.loss_fn(logits, labels)
            self.autocast.scaler.scale(loss / accumulation if accumulation > 1 else loss).backward()
            if (index + 1) % accumulation == 0:
                self._clip_gradients()
                self.autocast.scaler.step(self.optimizer)
                self.autocast.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.steps += 1
                if self.ema is not None:
                    self.ema.update(self.model, step=self.steps)
                self._step_boundary()
            total_loss += float(loss.detach()) * len(labels)
            targets = mixed.dominant_labels if mixed else labels
            correct += int((predict_classes(logits, self.spec.heads) == targets).sum())
            seen += len(labels)
            waiting_since = time.perf_counter()
        self.epoch_timing = (time.perf_counter() - started, data_seconds)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def _on_device(self, images: torch.Tensor, loader) -> torch.Tensor:
        """A loader's batch on the device, augmented and normalised (on CUDA the recipe runs here,
        after a non-blocking copy of the pinned uint8 batch), in the plan's memory format."""
        images = loader.collate_fn.finish(images.to(self.device, non_blocking=True))
        return compute.prepare_input(images, self.compute)

    def _clip_gradients(self) -> None:
        if self.spec.grad_clip > 0:
            self.autocast.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)

    def _patience_exhausted(self, report: EpochReport) -> bool:
        """Early stopping: no better val F1 for `early_stopping_patience` epochs."""
        patience = self.spec.early_stopping_patience
        if patience and report.epoch - report.best_epoch >= patience:
            self.stop_reason = "early_stopping"
            log.info(
                "early stopping: no better val F1 than %.4f (epoch %d) for %d epochs",
                report.best_val_f1,
                report.best_epoch,
                patience,
            )
            return True
        return False

    @torch.inference_mode()
    def evaluate(self) -> dict[str, Any]:
        """Loss, accuracy, macro F1, the confusion matrix and each image's prediction on the validation split.

        With `ema_decay` set, the EMA weights are what is evaluated (and what inference uses).
        """
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        self.phase = "eval"
        total_loss, seen = 0.0, 0
        matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        predictions = []
        for images, labels in self.val_loader:
            images = self._on_device(images, self.val_loader)
            labels = labels.to(self.device, non_blocking=True)
            with self.autocast():
                logits = model(images)
            total_loss += float(self.loss_fn(logits.float(), labels)) * len(labels)
            seen += len(labels)
            predicted = predict_classes(logits, self.spec.heads).cpu()
            matrix += confusion_matrix(predicted, labels.cpu(), self.num_classes)
            predictions.append(predicted)
        return {
            "loss": total_loss / max(seen, 1),
            "acc": accuracy(matrix),
            "f1": macro_f1(matrix),
            "matrix": matrix,
            "predictions": torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64),
        }

    def finish_store(self, status: str, result: dict[str, Any] | None = None, best_effort: bool = False) -> None:
        """Wait until the run's files are durable in the store (no-op without a separate store).

        Raises StoreError when they are not; with `best_effort` (a run that stops anyway) it only logs.
        """
        sync, self.sync = self.sync, None
        if sync is None:
            return
        summary = {
            "best": self.best,
            "epoch": self.history[-1].epoch if self.history else 0,
            "search": self.context.get("search"),  # `runyard gc --keep-top` ranks within a search
        }
        if result is not None:
            summary["result"] = {key: result[key] for key in ("best", "epochs_completed", "model") if key in result}
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

    def _checkpoint(self, epoch: int, val_f1: float) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.autocast.scaler.state_dict(),
            "epoch": epoch,
            "val_f1": val_f1,
            "best": self.best,
            "spec": self.spec.to_payload(),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "class_counts": self.class_counts,
            **({"ema": self.ema.module.state_dict(), "steps": self.steps} if self.ema is not None else {}),
        } | checkpoint.training_state(self)

    def _step_boundary(self, **where: str) -> None:
        """After each optimizer step (and before each epoch): stop here if `should_stop` says so."""
        reason = self.should_stop(**where) if self.should_stop is not None else None
        if reason:
            raise TrainingInterrupted(reason, self.history[-1].epoch if self.history else self.start_epoch)

    def _log_to_tracker(self, report: EpochReport) -> None:
        logged = {key: value for key, value in asdict(report).items() if key not in ("epochs", "store_pending")}
        self.tracker.log(logged, step=report.epoch)

    def _write_outputs(self) -> dict[str, Any]:
        """After training: the pictures of the best epoch and, with an eval_dir, the submission."""
        outputs: dict[str, Any] = {"stop_reason": self.stop_reason}
        if self.spec.pictures and self.best_eval is not None:
            pictures = save_run_pictures(
                self.run_dir,
                self.best_eval["matrix"],
                self.val_loader.dataset.samples,
                self.best_eval["predictions"].tolist(),
                self.class_names,
            )
            self.tracker.log_images(
                {f"pictures/{name}": path for name, path in pictures.items()}, step=self.history[-1].epoch
            )
            outputs["pictures"] = {name: str(path) for name, path in pictures.items()}
        if self.spec.eval_dir:
            outputs["submission"] = self._write_submission()
        return outputs

    def _write_submission(self) -> dict[str, Any]:
        from trainer.infer import predict_submission, score_submission

        path = predict_submission(
            [self.run_dir],
            self.spec.eval_dir,
            tta=self.spec.tta,
            output=self.run_dir / "submission.csv",
            device=self.device.type,
            progress=log.info,
        )
        submission: dict[str, Any] = {"path": str(path), "tta": self.spec.tta}
        answers = Path(self.spec.eval_dir).expanduser() / "answers.csv"
        if answers.is_file():  # the demo data knows its eval labels
            submission |= {"eval": score_submission(path, answers, self.num_classes)}
            log.info("submission scored against %s: macro F1 %.4f", answers, submission["eval"]["f1"])
        self.tracker.log_artifact(
            path,
            name=f"{self.run_name}-submission",
            kind="submission",
            metadata={"tta": self.spec.tta, "best_epoch": self.best["epoch"], **submission.get("eval", {})},
        )
        return submission

    def _start_tracker(self) -> WandbTracker:
        spec = self.spec
        config = spec.to_payload() | {
            "run_name": self.run_name,
            "spec_hash": spec.spec_hash(),
            "context": self.context,
            "oom_adjustments": self.oom_adjustments,
        }
        return WandbTracker(
            self.run_name,
            self.run_dir,
            config,
            project=spec.wandb.project,
            entity=spec.wandb.entity,
            group=spec.wandb.group,
            tags=spec.wandb.tags,
            job_type="fold" if spec.kfold.k > 1 else "train",
        )

    def _result(self, setup_seconds: float, stopped_early: bool) -> dict[str, Any]:
        last = self.history[-1]
        self.tracker.summary({f"best_{key}": value for key, value in self.best.items()})  # best_val_f1, best_epoch...
        self.tracker.log_artifact(
            self.run_dir / "checkpoints" / "best.pt",
            name=f"{self.run_name}-best",
            kind="model",
            aliases=["best"],
            metadata={"epoch": self.best["epoch"], "val_f1": self.best["val_f1"], "model": self.spec.model},
        )
        return {
            "run_name": self.run_name,
            "spec_hash": self.spec.spec_hash(),
            "model": self.spec.model,
            "epochs_completed": last.epoch,
            "stopped_early": stopped_early,
            "best": self.best,
            "last": {"epoch": last.epoch, "val_f1": last.val_f1, "val_acc": last.val_acc, "val_loss": last.val_loss},
            "run_dir": str(self.run_dir),
            "device": str(self.device),
            "parameters": parameter_count(self.model),
            "images": {
                "train": len(self.train_loader.dataset),
                "val": len(self.val_loader.dataset),
                "skipped": len(self.skipped_images),
            },
            "skipped_images": self.skipped_images,  # bad_images: skip: what the run was not trained on
            "durations": {
                "total_s": round(time.perf_counter() - self.started, 3),
                "setup_s": round(setup_seconds, 3),
                "mean_epoch_s": round(sum(report.seconds for report in self.history) / len(self.history), 3),
            },
            "wandb": self.tracker.describe(),
            "resumed_from_epoch": self.start_epoch,
            "store": self.store.run_url(self.run_name),  # no credentials: see trainer.store.display_url
            **({"checkpoint_fallback": self.checkpoint_fallbacks} if self.checkpoint_fallbacks else {}),
            "batch_size": self.spec.batch_size,
            "grad_accum_steps": self.spec.grad_accum_steps,
            "oom_adjustments": self.oom_adjustments,
        }


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
        handler = logging.FileHandler(trainer.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger = logging.getLogger("runyard")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        retry = None
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
            if isinstance(error, TrainingInterrupted) and error.reason == LOST:
                trainer.drop_store()  # its new owner writes the run now
            elif not isinstance(error, StoreError):
                stopped = isinstance(error, TrainingInterrupted) or retry is not None
                trainer.finish_store("interrupted" if stopped else "failed", best_effort=True)
            if retry is None:
                raise
            log.warning("run %s: %s; retrying with %s", trainer.run_name, str(error).splitlines()[0], retry[1]["to"])
        finally:
            logger.removeHandler(handler)
            handler.close()
        # Outside the except block the error's traceback, and the tensors its frames held, are gone.
        spec, adjustment = retry
        spec = spec.model_copy(update={"run_name": trainer.run_name})  # same run dir, whatever the clock says
        adjustments.append(adjustment | {"after_epoch": trainer.history[-1].epoch if trainer.history else 0})
        resume = resume or bool(trainer.history)
        del trainer
        oom.free_memory()

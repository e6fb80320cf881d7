"""The training loop: one spec in, a run dir and a JSON-ready result out.

It knows nothing of Redis or RQ. Whoever runs it hands it `on_epoch`, called after every epoch
with an EpochReport; returning True from it stops training after that epoch (a pruner or a cancel
flag answers through it).

Run dir ($RUNYARD_HOME/runs/<run_name>, or the spec's output_dir):
    spec.json  metrics.csv  train.log  result.json  checkpoints/{best,last}.pt  wandb/
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.loaders import build_loaders, load_samples
from trainer.losses import create_loss
from trainer.metrics import accuracy, confusion_matrix, macro_f1
from trainer.models import create_model, normalization, parameter_count
from trainer.paths import runs_root
from trainer.spec import ExperimentSpec
from trainer.tracking import WandbTracker

log = logging.getLogger("runyard.trainer")


@dataclass
class EpochReport:
    """What one epoch did; sent to `on_epoch`, the metrics CSV and W&B."""

    epoch: int  # 1-based
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_f1: float
    lr: float
    seconds: float
    best_val_f1: float
    best_epoch: int
    eta_seconds: float


EpochCallback = Callable[[EpochReport], "bool | None"]
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(spec: ExperimentSpec) -> torch.device:
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def create_optimizer(spec: ExperimentSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


def create_scheduler(spec: ExperimentSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if spec.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.lr_decay_step, gamma=spec.lr_gamma)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename: a reader never sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def format_eta(seconds: float) -> str:
    """Seconds -> `1h05m` or `4m09s`, for log lines."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Autocast:
    """AMP on CUDA (bf16 where supported, else fp16 with a GradScaler); a no-op on CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)
        self.device_type = device.type

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class Trainer:
    """Builds everything a spec names (data, model, loss, optimizer, W&B run) and fits it."""

    def __init__(self, spec: ExperimentSpec, context: dict[str, Any] | None = None):
        self.started = time.perf_counter()
        self.spec = spec
        self.run_name = spec.run_name or spec.default_run_name()
        self.run_dir = runs_root(spec.output_dir) / self.run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.context = context or {}
        seed_everything(spec.seed)
        self.device = pick_device(spec)
        samples, self.num_classes = load_samples(spec)
        self.model = create_model(spec, self.num_classes).to(self.device)
        mean, std = normalization(self.model)
        self.train_loader, self.val_loader = build_loaders(spec, samples, mean, std, self.device)
        self.loss_fn = create_loss(spec.loss, self.num_classes)
        self.optimizer = create_optimizer(spec, self.model)
        self.scheduler = create_scheduler(spec, self.optimizer)
        self.autocast = Autocast(self.device, spec.amp)
        self.best: dict[str, Any] = {"epoch": 0, "val_f1": -1.0}
        self.history: list[EpochReport] = []
        self.tracker: WandbTracker | None = None

    def fit(self, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
        """Train for the spec's epochs (or until `on_epoch` says stop); return the result."""
        spec = self.spec
        (self.run_dir / "spec.json").write_text(json.dumps(spec.to_payload() | {"run_name": self.run_name}, indent=2))
        # Who published it and which code versions published and trained it (see worker.code_version).
        (self.run_dir / "context.json").write_text(json.dumps(self.context, indent=2, default=str))
        with open(self.run_dir / "metrics.csv", "w", newline="") as handle:
            csv.writer(handle).writerow(METRIC_COLUMNS)
        self.tracker = self._start_tracker()
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
        try:
            for epoch in range(1, spec.epochs + 1):
                report = self._run_epoch(epoch, setup_seconds)
                if on_epoch is not None and on_epoch(report):
                    stopped_early = epoch < spec.epochs
                    break
            result = self._result(setup_seconds, stopped_early)
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
        if val["f1"] > self.best["val_f1"]:
            self.best = {"epoch": epoch, "val_f1": val["f1"], "val_acc": val["acc"], "val_loss": val["loss"]}
            save_atomic(self._checkpoint(epoch, val["f1"]), self.run_dir / "checkpoints" / "best.pt")
        save_atomic(self._checkpoint(epoch, val["f1"]), self.run_dir / "checkpoints" / "last.pt")
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
            eta_seconds=(now - self.started - setup_seconds) / epoch * (self.spec.epochs - epoch),
        )
        self.history.append(report)
        with open(self.run_dir / "metrics.csv", "a", newline="") as handle:
            csv.writer(handle).writerow([getattr(report, column) for column in METRIC_COLUMNS])
        self.tracker.log({key: value for key, value in asdict(report).items() if key != "epochs"}, step=epoch)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f F1 %.4f | best F1 %.4f (epoch %d) | %.1fs"
            " | ETA %s",
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
            format_eta(report.eta_seconds),
        )
        return report

    def train_one_epoch(self) -> tuple[float, float]:
        """One pass over the training loader; returns mean loss and accuracy."""
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        for images, labels in self.train_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                logits = self.model(images)
                loss = self.loss_fn(logits, labels)
            self.autocast.scaler.scale(loss).backward()
            self.autocast.scaler.step(self.optimizer)
            self.autocast.scaler.update()
            total_loss += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    @torch.inference_mode()
    def evaluate(self) -> dict[str, Any]:
        """Loss, accuracy, macro F1 and the confusion matrix on the validation split."""
        self.model.eval()
        total_loss, seen = 0.0, 0
        matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        for images, labels in self.val_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.model(images)
            total_loss += float(self.loss_fn(logits.float(), labels)) * len(labels)
            seen += len(labels)
            matrix += confusion_matrix(logits.argmax(dim=1).cpu(), labels.cpu(), self.num_classes)
        return {"loss": total_loss / max(seen, 1), "acc": accuracy(matrix), "f1": macro_f1(matrix), "matrix": matrix}

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
        }

    def _start_tracker(self) -> WandbTracker:
        spec = self.spec
        config = spec.to_payload() | {
            "run_name": self.run_name,
            "spec_hash": spec.spec_hash(),
            "context": self.context,
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
            "images": {"train": len(self.train_loader.dataset), "val": len(self.val_loader.dataset)},
            "durations": {
                "total_s": round(time.perf_counter() - self.started, 3),
                "setup_s": round(setup_seconds, 3),
                "mean_epoch_s": round(sum(report.seconds for report in self.history) / len(self.history), 3),
            },
            "wandb": self.tracker.describe(),
        }


def train(
    spec: ExperimentSpec, on_epoch: EpochCallback | None = None, context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train `spec` into its run dir and return the result (JSON-ready).

    `context` (who published it, from where, at which git commit) is logged beside the spec.
    """
    trainer = Trainer(spec, context)
    handler = logging.FileHandler(trainer.run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("runyard")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return trainer.fit(on_epoch)
    finally:
        logger.removeHandler(handler)
        handler.close()

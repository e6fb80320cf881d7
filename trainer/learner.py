"""A spec's model and what trains it, and the passes over the data; nothing of run dirs, W&B or stores.

The Learner builds the data loaders, model, loss, optimizer, scheduler, EMA and AMP a spec names
and trains or evaluates one epoch at a time. Between optimizer steps it asks `should_stop` (the
step boundary, see trainer.interrupt). trainer.train.Trainer is a Learner that also owns a run.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3

from contracts.spec import ExperimentSpec
from trainer import compute, oom
from trainer.checkpoint import Progress, TrainingState
from trainer.data import DataError
from trainer.heads import predict_classes
from trainer.interrupt import TrainingInterrupted
from trainer.loaders import build_loaders, class_counts, class_names, load_samples, loader_workers
from trainer.losses import create_criterion
from trainer.metrics import accuracy, confusion_matrix, macro_f1
from trainer.mixing import BatchMixer
from trainer.models import create_model, normalization
from trainer.optim import create_optimizer, create_scheduler

StopCallback = Callable[..., "str | None"]  # called as should_stop(boundary="step" | "epoch")


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


def prepare_process(spec: ExperimentSpec, plan: compute.ComputePlan | None) -> tuple[torch.device, compute.ComputePlan]:
    """Seed, determinism, the device and its compute plan (channels_last, AMP dtype, torch.compile,
    cuDNN autotuning: see trainer.compute), with the backends set up for it."""
    seed_everything(spec.seed)
    configure_determinism(spec.deterministic)
    device = pick_device(spec)
    plan = plan or compute.plan_compute(spec, device)
    compute.configure_backends(plan, device, loader_workers(spec, device))
    return device, plan


def check_eval_dir(spec: ExperimentSpec) -> None:
    """An eval_dir without info.csv is found out now, not after hours of training."""
    if spec.eval_dir and not (Path(spec.eval_dir).expanduser() / "info.csv").is_file():
        raise DataError(f"eval_dir {spec.eval_dir} has no info.csv (an eval dir holds images/ and info.csv)")


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


class Learner:
    """Builds the model and what trains it from a spec; trains and evaluates one epoch at a time."""

    def __init__(self, spec: ExperimentSpec, compute_plan: compute.ComputePlan | None = None):
        self.spec = spec
        self.device, self.compute = prepare_process(spec, compute_plan)
        check_eval_dir(spec)
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
        self.progress = Progress()  # steps, best, history, start_epoch: what a checkpoint restores
        self.state = self._training_state()
        self.should_stop: StopCallback | None = None
        self.phase = "setup"  # "train" or "eval": where an out-of-memory error came from
        self.epoch_timing = (0.0, 0.0)  # the last training pass: (seconds, of which waiting for data)

    def _training_state(self) -> TrainingState:
        """What this run's checkpoints hold, handed to trainer.checkpoint (which never sees the Trainer)."""
        description = {"spec": self.spec.to_payload(), "num_classes": self.num_classes}
        description |= {"class_names": self.class_names, "class_counts": self.class_counts}
        parts = (self.model, self.optimizer, self.scheduler, self.autocast.scaler, self.ema)
        return TrainingState(*parts, self.train_loader.generator, self.progress, description)

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
                self._optimizer_step()
            total_loss += float(loss.detach()) * len(labels)
            targets = mixed.dominant_labels if mixed else labels
            correct += int((predict_classes(logits, self.spec.heads) == targets).sum())
            seen += len(labels)
            waiting_since = time.perf_counter()
        self.epoch_timing = (time.perf_counter() - started, data_seconds)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def _optimizer_step(self) -> None:
        """Apply the summed gradients, update the EMA weights, then the step boundary."""
        self._clip_gradients()
        self.autocast.scaler.step(self.optimizer)
        self.autocast.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.steps += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.steps)
        self.stop_if_asked(boundary="step")

    def _on_device(self, images: torch.Tensor, loader) -> torch.Tensor:
        """A loader's batch on the device, augmented and normalised (on CUDA the recipe runs here,
        after a non-blocking copy of the pinned uint8 batch), in the plan's memory format."""
        images = loader.collate_fn.finish(images.to(self.device, non_blocking=True))
        return compute.prepare_input(images, self.compute)

    def _clip_gradients(self) -> None:
        if self.spec.grad_clip > 0:
            self.autocast.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)

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

    def stop_if_asked(self, boundary: str) -> None:
        """Raise TrainingInterrupted if `should_stop` gives a reason.

        Asked at two boundaries: "step" (after each optimizer step) and "epoch" (before each epoch).
        Either way what remains is the last finished epoch's checkpoint.
        """
        reason = self.should_stop(boundary=boundary) if self.should_stop is not None else None
        if reason:
            raise TrainingInterrupted(reason, self.progress.last_epoch)

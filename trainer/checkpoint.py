"""What a checkpoint holds, and how a run picks up from one.

A checkpoint is written at the end of every epoch (atomically: a reader never sees half a file)
and holds everything that makes epoch N+1 of a resumed run the epoch N+1 an uninterrupted run
would have trained: model, optimizer, scheduler (warmup included), AMP scaler, EMA weights and
step count when the spec asks for EMA, epoch, best metric, every epoch's report, and the random
states (Python, NumPy, torch, CUDA and the training loader's shuffling generator; mixup and
cutmix draw from torch's).

Checkpoints are loaded with `weights_only=True`: a checkpoint file is data, never code, even on
a shared filesystem someone else can write to.

Resume granularity: a stop request (warm shutdown, cancel) is honoured at the next optimizer
step, but what is kept is the last finished epoch. Continuing mid-epoch would also need the
position in the epoch's sample order, the loader workers' augmentation random streams and the
partial epoch metrics; instead the interrupted epoch is trained again, so a stop costs at most
one epoch of work.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from contracts.epoch_report import EpochReport
from trainer.interrupt import ResumeInfo


class Resumable(Protocol):
    """What a checkpoint saves and restores of a trainer (trainer.train.Trainer is one)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Any  # its `scaler`: the AMP GradScaler
    ema: Any  # timm's ModelEmaV3, or None
    train_loader: Any  # its `generator` shuffles the training set
    history: list[EpochReport]
    best: dict[str, Any]
    steps: int
    start_epoch: int
    run_dir: Path
    device: torch.device


# What a Trainer's checkpoint holds state_dict()s of, restored by name.
STATEFUL_PARTS = ("model", "optimizer", "scheduler")


def checkpoint_path(run_dir: Path) -> Path:
    """The checkpoint a resumed run starts from."""
    return run_dir / "checkpoints" / "last.pt"


def capture_rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state the training loop draws from, as tensors and plain lists (weights_only-safe)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["loader"] = generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Put back what `capture_rng_states` saved."""
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "loader" in states:
        generator.set_state(states["loader"])


def training_state(trainer: Resumable) -> dict[str, Any]:
    """What a checkpoint needs beyond the weights and optimizer to resume exactly: RNG states and
    the epoch history (the EMA weights and step count are in the trainer's own checkpoint)."""
    return {
        "rng": capture_rng_states(trainer.train_loader.generator),
        "history": [asdict(report) for report in trainer.history],
    }


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint as data only (no pickled code is ever executed)."""
    return torch.load(path, map_location=device, weights_only=True)


def restore_training_state(trainer: Resumable, state: dict[str, Any]) -> list[EpochReport]:
    """Load a checkpoint's states into a freshly built Trainer; returns the restored epoch reports."""
    for name in STATEFUL_PARTS:
        getattr(trainer, name).load_state_dict(state[name])
    trainer.autocast.scaler.load_state_dict(state["scaler"])
    if trainer.ema is not None and "ema" in state:  # the averaged weights and the step count their decay uses
        trainer.ema.module.load_state_dict(state["ema"])
        trainer.steps = int(state.get("steps", trainer.steps))
    restore_rng_states(state["rng"], trainer.train_loader.generator)
    known = {item.name for item in fields(EpochReport)}
    history = [EpochReport(**{key: value for key, value in row.items() if key in known}) for row in state["history"]]
    trainer.history = history
    trainer.best = dict(state["best"])
    trainer.start_epoch = int(state["epoch"])
    return history


def resume(trainer: Resumable) -> ResumeInfo:
    """Continue `trainer` from its run dir's last checkpoint; from scratch when there is none."""
    path = checkpoint_path(trainer.run_dir)
    if not path.exists():
        return ResumeInfo()
    history = restore_training_state(trainer, load_checkpoint(path, trainer.device))
    return ResumeInfo(start_epoch=trainer.start_epoch, history=list(history), checkpoint=str(path))


def sync_metrics_csv(path: Path, history: Sequence[EpochReport], columns: Iterable[str]) -> None:
    """Rewrite metrics.csv to exactly the checkpoint's epochs, atomically.

    The checkpoint is an epoch's commit point (written before its CSV row), so a run killed in
    between would otherwise miss a row, and one killed mid-epoch must not keep a partial one.
    """
    columns = list(columns)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for report in history:
            writer.writerow([getattr(report, column) for column in columns])
    temporary.replace(path)

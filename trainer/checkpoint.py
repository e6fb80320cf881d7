"""What a checkpoint holds, and how a run picks up from one.

A checkpoint is written at the end of every epoch (atomically: a reader never sees half a file)
and holds everything that makes epoch N+1 of a resumed run the epoch N+1 an uninterrupted run
would have trained: model, optimizer, scheduler (warmup included), AMP scaler, EMA weights and
step count when the spec asks for EMA, epoch, best metric, every epoch's report, and the random
states (Python, NumPy, torch, CUDA and the training loader's shuffling generator; mixup and
cutmix draw from torch's).

A run keeps `last.pt`, the one before it (`previous.pt`) and `best.pt`. Resuming takes the newest
of them that loads (with a run store, the store's copies count too: another box may have trained
further); one that does not load is set aside as `<name>.unreadable` and the reason is logged and
returned, and with none readable the run starts over.

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
import logging
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contracts.epoch_report import EpochReport
from trainer.interrupt import ResumeInfo

if TYPE_CHECKING:
    from trainer.store import RunStore


def _no_best() -> dict[str, Any]:
    return {"epoch": 0, "val_f1": -1.0}


@dataclass
class Progress:
    """How far a run got: optimizer steps, its best epoch and every finished epoch's report."""

    steps: int = 0
    best: dict[str, Any] = field(default_factory=_no_best)
    history: list[EpochReport] = field(default_factory=list)
    start_epoch: int = 0  # epochs already trained by an earlier attempt (set by a resume)

    @property
    def last_epoch(self) -> int:
        """The last finished epoch: its checkpoint is what a stop now keeps."""
        return self.history[-1].epoch if self.history else self.start_epoch


@dataclass
class TrainingState:
    """What a checkpoint saves and restores: the parts trained in place, and the run's progress.

    The Trainer builds one and hands it over; a resume loads into its parts and sets its progress.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: Any  # timm's ModelEmaV3, or None
    loader_generator: torch.Generator | None  # shuffles the training set
    progress: Progress
    description: dict[str, Any]  # what inference reads: spec, num_classes, class_names, class_counts


log = logging.getLogger("runyard.trainer")

# What a checkpoint holds state_dict()s of, restored by name.
STATEFUL_PARTS = ("model", "optimizer", "scheduler", "scaler")


def checkpoint_path(run_dir: Path) -> Path:
    """The checkpoint a resumed run starts from."""
    return run_dir / "checkpoints" / "last.pt"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename: a reader never sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Through a file object, a full disk is OSError(ENOSPC) naming nothing worse than the
        # errno; given a path, torch reports it as `inline_container.cc:672 unexpected pos`.
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)  # a partial file only takes the space a retry needs
        if error.filename is None:
            error.filename = str(temporary)
        raise


def save_last(state: dict[str, Any], run_dir: Path) -> Path:
    """Write the epoch's last.pt, keeping the one it replaces as previous.pt (a fallback)."""
    path = checkpoint_path(run_dir)
    if path.exists():
        os.replace(path, path.with_name("previous.pt"))
    save_atomic(state, path)
    return path


def save_epoch(contents: dict[str, Any], run_dir: Path, improved: bool) -> dict[str, Path]:
    """Write an epoch's last.pt, and best.pt when it improved; returns the files by kind."""
    saved = {"last": save_last(contents, run_dir)}
    if improved:
        saved["best"] = run_dir / "checkpoints" / "best.pt"
        save_atomic(contents, saved["best"])
    return saved


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


def checkpoint_contents(state: TrainingState, epoch: int, val_f1: float) -> dict[str, Any]:
    """What epoch `epoch`'s checkpoint file holds (state_dicts, tensors and plain values only)."""
    progress = state.progress
    return {
        **{name: getattr(state, name).state_dict() for name in STATEFUL_PARTS},
        "epoch": epoch,
        "val_f1": val_f1,
        "best": progress.best,
        **state.description,
        **({"ema": state.ema.module.state_dict(), "steps": progress.steps} if state.ema is not None else {}),
        "rng": capture_rng_states(state.loader_generator),
        "history": [asdict(report) for report in progress.history],
    }


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint as data only (no pickled code is ever executed)."""
    return torch.load(path, map_location=device, weights_only=True)


def restore_training_state(state: TrainingState, saved: dict[str, Any]) -> list[EpochReport]:
    """Load a checkpoint into a freshly built TrainingState; returns the restored epoch reports."""
    for name in STATEFUL_PARTS:
        getattr(state, name).load_state_dict(saved[name])
    progress = state.progress
    if state.ema is not None and "ema" in saved:  # the averaged weights and the step count their decay uses
        state.ema.module.load_state_dict(saved["ema"])
        progress.steps = int(saved.get("steps", progress.steps))
    restore_rng_states(saved["rng"], state.loader_generator)
    known = {item.name for item in fields(EpochReport)}
    progress.history = [
        EpochReport(**{key: value for key, value in row.items() if key in known}) for row in saved["history"]
    ]
    progress.best = dict(saved["best"])
    progress.start_epoch = int(saved["epoch"])
    return progress.history


def candidate_paths(run_dir: Path) -> list[Path]:
    """The checkpoints a resume may start from, this box's first, then the ones fetched from the store."""
    folder = run_dir / "checkpoints"
    local = [folder / f"{kind}.pt" for kind in ("last", "previous", "best")]
    fetched = [folder / "store" / f"{kind}.pt" for kind in ("last", "previous", "best")]
    return [path for path in local + fetched if path.is_file()]


def newest_readable(paths: Sequence[Path], device: torch.device | str) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint of the latest epoch among those that load, and why each other one did not."""
    chosen, state, problems = None, None, []
    for path in paths:
        try:
            candidate = torch.load(path, map_location=device, weights_only=True, mmap=True)
            epoch = int(candidate["epoch"])
            for key in ("model", "optimizer", "scheduler", "rng", "history", "best"):
                candidate[key]
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            name = f"the store's {path.name}" if path.parent.name == "store" else f"checkpoints/{path.name}"
            problems.append(f"{name} is unreadable ({type(error).__name__}: {reason[:200]})")
            path.replace(path.with_name(f"{path.name}.unreadable"))  # never rotated into previous.pt
            continue
        if state is None or epoch > int(state["epoch"]):
            chosen, state = path, candidate
    return chosen, state, problems


def resume(
    state: TrainingState, run_dir: Path, run_name: str, store: RunStore, device: torch.device | str
) -> ResumeInfo:
    """Load into `state` the newest checkpoint of the run that loads; from scratch when none does.

    `store` may hold other boxes' checkpoints of this run (fetched first). Every
    checkpoint that would not load is named, with the reason, in the log and in the result.
    """
    fetch_notes = fetch_from_store(store, run_name, run_dir)
    paths = candidate_paths(run_dir)
    chosen, saved, problems = newest_readable(paths, device)
    problems = fetch_notes + problems
    if saved is None:
        if problems:
            problems.append("no readable checkpoint: training starts over from epoch 0")
        for problem in problems:
            log.warning("run %s: %s", run_name, problem)
        return ResumeInfo(fallbacks=problems)
    if problems:
        problems.append(f"resumed from {chosen.name} of epoch {int(saved['epoch'])} instead")
    for problem in problems:
        log.warning("run %s: %s", run_name, problem)
    history = restore_training_state(state, saved)
    if chosen != checkpoint_path(run_dir):
        save_atomic(saved, checkpoint_path(run_dir))  # the next epoch's previous.pt
    del saved
    shutil.rmtree(run_dir / "checkpoints" / "store", ignore_errors=True)
    return ResumeInfo(
        start_epoch=state.progress.start_epoch, history=list(history), checkpoint=str(chosen), fallbacks=problems
    )


def fetch_from_store(store: RunStore, run_name: str, run_dir: Path) -> list[str]:
    """Download the store's checkpoints of this run that this box does not have (checked by size and
    sha256 against the manifest) into checkpoints/store/; returns what could not be fetched."""
    if not store.remote:
        return []
    from trainer.store import StoreError, explain, matches

    try:
        manifest = store.read_manifest(run_name)
    except Exception as error:
        return [f"the store's checkpoints were not fetched: {explain(store.url, error)}"]
    notes = []
    local = run_dir / "checkpoints"
    for kind, entry in ((manifest or {}).get("checkpoints") or {}).items():
        if matches(local / f"{kind}.pt", entry):
            continue
        try:
            store.get(run_name, entry["path"], local / "store" / f"{kind}.pt", expected=entry)
            log.info(
                "run %s: fetched %s (epoch %d) from %s",
                run_name,
                entry["path"],
                entry["epoch"],
                store.run_url(run_name),
            )
        except StoreError as error:
            notes.append(str(error))
        except Exception as error:
            notes.append(f"{entry['path']} was not fetched: {explain(store.url, error)}")
    return notes


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

"""Submissions: `ImageID,ans` in the order of eval/info.csv, from one run, k fold runs or an ensemble.

Voting over several runs:
- soft: the mean of the runs' class probabilities, then the most probable class;
- hard: each run votes for its most probable class; a tie goes to the tied class seen most often
  in the runs' training splits (then the lower class number);
- auto: soft for one run or for the folds of one cross-validation (same spec but kfold.fold),
  hard for an ensemble of different runs.
Optional h-flip test-time augmentation averages each run's probabilities over the image and its
mirror. `predict_submission` is the one entry point; `runyard infer` and the trainer (spec
`eval_dir`) call it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from contracts.spec import ExperimentSpec, KFold, SpecError, load_spec
from trainer.data import Sample
from trainer.heads import class_probabilities
from trainer.loaders import build_eval_loader
from trainer.metrics import accuracy, confusion_matrix, macro_f1
from trainer.models import create_model, normalization
from trainer.paths import runs_root
from trainer.store import RunNotInStore, StoreError, open_store

VOTINGS = ("auto", "soft", "hard")  # auto: see choose_voting
TTAS = ("none", "hflip")
CHECKPOINTS = ("best", "last")


class InferenceError(ValueError):
    """A run dir or eval dir cannot be used; the message names it and the fix."""


@dataclass
class TrainedRun:
    """A run's model with its trained weights (the EMA weights when the run kept them)."""

    run_dir: Path
    spec: ExperimentSpec
    num_classes: int
    class_names: list[str] | None
    class_counts: list[int] | None
    model: nn.Module


def resolve_run_dir(run: str | Path, checkpoint: str | None = None) -> Path:
    """A run dir path, or a run name: in the run store (RUNYARD_STORE, fetched once into
    $RUNYARD_HOME/runs and checked by size and sha256) or under $RUNYARD_HOME/runs."""
    path = Path(run).expanduser()
    if path.is_dir():
        return path
    named = runs_root(None) / str(run)
    if not path.is_absolute():
        try:
            store = open_store()
            if store.remote:
                return store.pull(str(run), named, kinds=(checkpoint,) if checkpoint else None, files=False)
        except RunNotInStore as error:
            if not named.is_dir():  # a run this box trained before it had a store is still usable
                raise InferenceError(f"run {run}: {error}") from None
        except StoreError as error:
            raise InferenceError(f"run {run}: {error}") from None
        if named.is_dir():
            return named
    raise InferenceError(f"run {run}: no such run dir (give a run dir, or a run name under {runs_root(None)})")


def load_run(run_dir: str | Path, checkpoint: str = "best", device: torch.device | None = None) -> TrainedRun:
    """Rebuild a run's model from its checkpoint (no pretrained download: the weights are in it)."""
    run_dir = resolve_run_dir(run_dir, checkpoint)
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise InferenceError(f"run {run_dir}: no checkpoints/{checkpoint}.pt (did it finish an epoch?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        spec = load_spec(state["spec"]).model_copy(update={"pretrained": False})
    except SpecError as error:
        raise InferenceError(f"{path}: its spec does not validate with this runyard version:\n{error}") from None
    except Exception as error:
        raise InferenceError(f"{path}: not a runyard checkpoint ({type(error).__name__}: {error})") from None
    num_classes = int(state["num_classes"])
    model = create_model(spec, num_classes)
    model.load_state_dict(state.get("ema") or state["model"])
    model.to(device or torch.device("cpu")).eval()
    return TrainedRun(run_dir, spec, num_classes, state.get("class_names"), state.get("class_counts"), model)


def read_eval_dir(eval_dir: str | Path) -> list[str]:
    """The ImageIDs of eval_dir/info.csv, in order, after checking every image is in eval_dir/images/."""
    eval_dir = Path(eval_dir).expanduser()
    info = eval_dir / "info.csv"
    if not info.is_file():
        raise InferenceError(f"eval dir {eval_dir}: no info.csv (an eval dir holds images/ and info.csv with ImageID)")
    with open(info, newline="") as handle:
        reader = csv.DictReader(handle)
        if "ImageID" not in (reader.fieldnames or []):
            raise InferenceError(f"{info}: no ImageID column (header is {','.join(reader.fieldnames or [])})")
        image_ids = [row["ImageID"] for row in reader]
    if not image_ids:
        raise InferenceError(f"{info}: no rows")
    missing = [image_id for image_id in image_ids if not (eval_dir / "images" / image_id).is_file()]
    if missing:
        raise InferenceError(
            f"eval dir {eval_dir}: {len(missing)} of {len(image_ids)} images of info.csv are not in images/ "
            f"(first: {missing[0]})"
        )
    return image_ids


@torch.inference_mode()
def predict_probabilities(
    run: TrainedRun,
    eval_dir: str | Path,
    image_ids: Sequence[str] | None = None,
    tta: str = "none",
    batch_size: int | None = None,
) -> torch.Tensor:
    """[images, classes] probabilities of one run on eval_dir (float64, on the CPU)."""
    eval_dir = Path(eval_dir).expanduser()
    image_ids = list(image_ids) if image_ids is not None else read_eval_dir(eval_dir)
    device = next(run.model.parameters()).device
    samples = [Sample(str(eval_dir / "images" / image_id), 0, image_id) for image_id in image_ids]
    mean, std = normalization(run.model)
    loader = build_eval_loader(run.spec, samples, mean, std, device, batch_size=batch_size)
    batches = []
    for images, _labels in loader:
        images = loader.collate_fn.finish(images.to(device, non_blocking=True))
        probabilities = class_probabilities(run.model(images), run.spec.heads)
        if tta == "hflip":
            flipped = class_probabilities(run.model(torch.flip(images, dims=[-1])), run.spec.heads)
            probabilities = (probabilities + flipped) / 2
        batches.append(probabilities.double().cpu())
    return torch.cat(batches)


def vote(probabilities: Sequence[torch.Tensor], voting: str, class_counts: Sequence[int] | None = None) -> torch.Tensor:
    """Combine the runs' [images, classes] probabilities into one class per image (soft or hard)."""
    if voting == "soft":
        return torch.stack(list(probabilities)).mean(dim=0).argmax(dim=1)
    num_classes = probabilities[0].shape[1]
    votes = torch.zeros(probabilities[0].shape[0], num_classes, dtype=torch.float64)
    for run_probabilities in probabilities:
        votes += torch.nn.functional.one_hot(run_probabilities.argmax(dim=1), num_classes).double()
    # A bonus below one vote that orders classes by training frequency, then by lower class number.
    counts = list(class_counts) if class_counts is not None else [0] * num_classes
    order = sorted(range(num_classes), key=lambda label: (-counts[label], label))
    bonus = torch.zeros(num_classes, dtype=torch.float64)
    for position, label in enumerate(order):
        bonus[label] = (num_classes - position) / (num_classes + 1)
    return (votes + bonus).argmax(dim=1)


def choose_voting(runs: Sequence[TrainedRun], voting: str) -> str:
    """`auto` -> soft for one run or the folds of one cross-validation, else hard."""
    if voting not in VOTINGS:
        raise InferenceError(f"voting is one of {', '.join(VOTINGS)}, not {voting!r}")
    if voting != "auto":
        return voting
    if len(runs) == 1:
        return "soft"
    hashes = {run.spec.model_copy(update={"kfold": KFold(k=run.spec.kfold.k)}).spec_hash() for run in runs}
    folds = {run.spec.kfold.fold for run in runs}
    is_cross_validation = len(hashes) == 1 and runs[0].spec.kfold.k > 1 and len(folds) == len(runs)
    return "soft" if is_cross_validation else "hard"


def predict_submission(
    run_dirs: Sequence[str | Path],
    eval_dir: str | Path,
    voting: str = "auto",
    tta: str = "none",
    output: str | Path | None = None,
    checkpoint: str = "best",
    batch_size: int | None = None,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the submission CSV of `run_dirs` on `eval_dir`; returns its path (default ./submission.csv).

    `run_dirs` are run dirs or run names; see the module docstring for `voting` and `tta`.
    """
    if checkpoint not in CHECKPOINTS:
        raise InferenceError(f"checkpoint is one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}")
    if not run_dirs:
        raise InferenceError("give at least one run dir")
    read_eval_dir(eval_dir)  # a bad eval dir is reported before any model is loaded
    runs = load_runs(run_dirs, checkpoint, device)
    return submit(runs, eval_dir, choose_voting(runs, voting), tta, output, batch_size, progress)


def load_runs(run_dirs: Sequence[str | Path], checkpoint: str = "best", device: str = "auto") -> list[TrainedRun]:
    """Load every run and check that they predict the same classes."""
    target = _device(device)
    runs = [load_run(run_dir, checkpoint, target) for run_dir in run_dirs]
    _check_compatible(runs)
    return runs


def submit(
    runs: Sequence[TrainedRun],
    eval_dir: str | Path,
    voting: str = "soft",
    tta: str = "none",
    output: str | Path | None = None,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Predict with loaded runs, vote (soft or hard) and write the submission; returns its path."""
    if voting not in ("soft", "hard") or tta not in TTAS:
        raise InferenceError(f"voting is soft or hard (choose_voting resolves auto), tta one of {', '.join(TTAS)}")
    say = progress or (lambda message: None)
    image_ids = read_eval_dir(eval_dir)
    probabilities = []
    for number, run in enumerate(runs, 1):
        say(f"[{number}/{len(runs)}] {run.run_dir.name}: predicting {len(image_ids)} images (tta {tta})")
        probabilities.append(predict_probabilities(run, eval_dir, image_ids, tta, batch_size))
    counts = [sum(column) for column in zip(*(run.class_counts or [0] * run.num_classes for run in runs), strict=True)]
    classes = vote(probabilities, voting, counts)
    path = Path(output) if output else Path.cwd() / "submission.csv"
    write_submission(path, image_ids, classes.tolist())
    say(f"wrote {path}: {len(image_ids)} rows, {voting} voting over {len(runs)} run(s)")
    return path


def write_submission(path: str | Path, image_ids: Sequence[str], classes: Sequence[int]) -> None:
    """`ImageID,ans` rows, written to a temporary file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "ans"])
        writer.writerows(zip(image_ids, classes, strict=True))
    os.replace(temporary, path)


def score_submission(submission: str | Path, answers: str | Path, num_classes: int) -> dict[str, float]:
    """Macro F1 and accuracy of a submission against an answers CSV (the demo data's eval/answers.csv)."""
    truth = _read_answers(answers)
    predicted = _read_answers(submission)
    if set(truth) != set(predicted):
        raise InferenceError(f"{submission} and {answers} do not list the same ImageIDs")
    order = sorted(truth)
    matrix = confusion_matrix(
        torch.tensor([predicted[key] for key in order]), torch.tensor([truth[key] for key in order]), num_classes
    )
    return {"f1": macro_f1(matrix), "acc": accuracy(matrix), "images": len(order)}


def _read_answers(path: str | Path) -> dict[str, int]:
    with open(path, newline="") as handle:
        return {row["ImageID"]: int(row["ans"]) for row in csv.DictReader(handle)}


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _check_compatible(runs: Sequence[TrainedRun]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.num_classes != first.num_classes:
            raise InferenceError(
                f"runs predict different classes: {first.run_dir.name} has {first.num_classes}, "
                f"{run.run_dir.name} has {run.num_classes}; vote only over runs trained on the same labels"
            )
        if first.class_names and run.class_names and run.class_names != first.class_names:
            raise InferenceError(
                f"runs {first.run_dir.name} and {run.run_dir.name} name their classes differently; "
                "vote only over runs trained on the same labels"
            )

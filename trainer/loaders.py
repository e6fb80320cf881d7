"""The one place that builds DataLoaders.

A dataset item is an image's recipe prefix as uint8 [3, H, W] (decoded once, see
trainer.image_cache); the collate function stacks a batch and runs the recipe's random ops on the
whole batch with per-image parameters: in the DataLoader worker on the CPU (or in the training
process when there are no workers), or on the GPU after a pinned, non-blocking copy of the uint8
batch, via `CollateBatch.finish`. One recipe object serves both, so the distributions are the same.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from contracts.spec import ExperimentSpec
from trainer import augment, cores
from trainer.augment import Prefix, Recipe
from trainer.data import (
    NUM_CLASSES,
    DataError,
    Sample,
    UnreadableImage,
    class_name,
    image_folder_classes,
    profile_group,
    scan_image_folder,
    scan_mask_dataset,
    split_by_profile,
)
from trainer.folds import kfold_split
from trainer.image_cache import ImageStore, available_memory, decode, find_unreadable, fork_context, open_store
from trainer.image_files import FIX, crop_problem
from trainer.paths import runyard_home
from trainer.relabel import corrections_file, load_corrections

log = logging.getLogger("runyard.trainer")


class ImageDataset(Dataset):
    """A split's images as their recipe prefix (uint8 [3, H, W]) with labels; read from `store` when given."""

    def __init__(
        self, samples: list[Sample], prefix: Prefix, store: ImageStore | None = None, skipped: Sequence[str] = ()
    ):
        self.samples = samples
        self.prefix = prefix
        self.store = store
        self.skipped = list(skipped)  # files of this split left out by `bad_images: skip`
        self.positions = [store.positions[sample.path] for sample in samples] if store is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        if self.store is None:
            return self.prefix(decode(sample.path)), sample.label
        return self.store.load(self.positions[index]), sample.label


class CollateBatch:
    """Stacks a batch's uint8 images and labels, and runs `recipe` on the batch: here (on the CPU,
    in the DataLoader worker) unless `on_device`, in which case `finish` runs it after the copy to
    the device."""

    def __init__(self, recipe: Recipe, on_device: bool):
        self.recipe = recipe
        self.on_device = on_device

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        return (images if self.on_device else self.recipe(images)), labels

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """A batch on its device, ready for the model (the recipe's ops and normalization done)."""
        return self.recipe(images) if self.on_device else images


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers from this process's share of the box's cores (see trainer.cores)."""
    return cores.default_loader_workers(device.type)


def loader_workers(spec: ExperimentSpec, device: torch.device) -> int:
    """The spec's `num_workers`, or the default for the device."""
    return spec.num_workers if spec.num_workers is not None else default_num_workers(device)


def dataset_identity(spec: ExperimentSpec) -> dict[str, Any]:
    """What, besides its files and the prefix, names a dataset in the disk cache's key."""
    relabel = corrections_file(spec.relabel) if spec.dataset == "mask" else None
    relabel_hash = hashlib.sha256(relabel.read_bytes()).hexdigest() if relabel is not None else "none"
    return {"data_dir": str(Path(spec.data_dir).expanduser().resolve()), "relabel": relabel_hash}


def image_stores(
    spec: ExperimentSpec, samples: list[Sample], prefixes: Sequence[Prefix], workers: int
) -> dict[Prefix, ImageStore | None]:
    """One store per distinct prefix over all of the dataset's images (train and validation share one)."""
    paths = [sample.path for sample in samples]
    identity = dataset_identity(spec) if spec.image_cache == "disk" else {}
    budget = available_memory() // cores.workers_per_box() // 2
    root = runyard_home() / "cache" / "images"
    stores: dict[Prefix, ImageStore | None] = {}
    for prefix in prefixes:
        if prefix not in stores:
            stores[prefix] = open_store(spec.image_cache, paths, prefix, identity, root, workers, budget)
            budget -= ImageStore.nbytes(len(paths), prefix)
    return stores


def unreadable_images(
    spec: ExperimentSpec, samples: list[Sample], stores: dict[Prefix, ImageStore | None], workers: int
) -> dict[str, str]:
    """The dataset's files that cannot be decoded (path -> reason), as filling the stores found them.

    Without a store the files are decoded once now only for `bad_images: skip`; with `fail` a bad
    file then fails the job when a loader reaches it.
    """
    unreadable: dict[str, str] = {}
    for store in stores.values():
        if store is not None:
            unreadable.update(store.unreadable)
    if None in stores.values() and spec.bad_images == "skip":
        log.info("bad_images: skip: decoding %d images once to find the bad ones", len(samples))
        unreadable.update(find_unreadable([sample.path for sample in samples], workers))
    return unreadable


def refuse_or_skip(
    spec: ExperimentSpec, unreadable: dict[str, str], splits: Sequence[list[Sample]]
) -> list[tuple[list[Sample], list[str]]]:
    """Each split without the unreadable files, and those it lost; UnreadableImage for `bad_images: fail`."""
    if unreadable and spec.bad_images == "fail":
        shown = sorted(unreadable)[:10]
        more = f"\n... and {len(unreadable) - len(shown)} more" if len(unreadable) > len(shown) else ""
        reasons = "\n".join(unreadable[path].removesuffix(f"; {FIX}") for path in shown)
        raise UnreadableImage(
            f"{len(unreadable)} image(s) of {spec.data_dir} cannot be decoded:\n{reasons}{more}\n{FIX}"
        )
    kept = []
    for split in splits:
        lost = [sample.path for sample in split if sample.path in unreadable]
        for path in lost:
            log.warning("bad_images: skip: skipping %s", unreadable[path].removesuffix(f"; {FIX}"))
        kept.append(([sample for sample in split if sample.path not in unreadable], lost))
    if unreadable:
        log.warning("bad_images: skip: %d unreadable image(s) left out of training and validation", len(unreadable))
    if not all(split for split, _ in kept):
        raise DataError(f"{spec.data_dir}: no readable images are left in the train or validation split")
    return kept


def check_crop(spec: ExperimentSpec, samples: list[Sample]) -> None:
    """Refuse a center_crop that does not fit the dataset's first readable image (before any decoding)."""
    problem = crop_problem(tuple(spec.center_crop), (sample.path for sample in samples)) if spec.center_crop else None
    if problem:
        raise DataError(problem)


def load_samples(spec: ExperimentSpec) -> tuple[list[Sample], int]:
    """All samples of the spec's dataset and its number of classes."""
    if spec.dataset == "image_folder":
        samples, classes = scan_image_folder(spec.data_dir)
        return samples, len(classes)
    corrections = load_corrections(spec.relabel)
    samples = scan_mask_dataset(spec.data_dir, spec.age_threshold, corrections)
    if corrections:
        found = len(corrections.keys() & {sample.profile for sample in samples})
        log.info(
            "relabel %s: %d corrections, %d of their profiles are in this dataset",
            spec.relabel,
            len(corrections),
            found,
        )
    return samples, NUM_CLASSES


def class_names(spec: ExperimentSpec, num_classes: int) -> list[str]:
    """A readable name per label: wear/female/<30 for the mask layout, the folder name for image_folder."""
    if spec.dataset == "image_folder":
        return image_folder_classes(spec.data_dir)
    return [class_name(label) for label in range(num_classes)]


def split_samples(spec: ExperimentSpec, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """The spec's train/validation split: by profile, stratified by gender x age (or by class).

    With kfold.k > 1, validation is fold kfold.fold of a stratified k-fold grouped by profile.
    """
    stratify = profile_group if spec.dataset == "mask" else (lambda sample: sample.label)
    if spec.kfold.k > 1:
        return kfold_split(samples, spec.kfold.k, spec.kfold.fold, spec.seed, stratify)
    return split_by_profile(samples, spec.val_ratio, spec.seed, stratify)


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """How many samples carry each label."""
    counts = [0] * num_classes
    for sample in samples:
        counts[sample.label] += 1
    return counts


def balanced_sampler(samples: Sequence[Sample], num_classes: int, seed: int) -> WeightedRandomSampler:
    """Draws len(samples) images with replacement, each class equally likely (seeded)."""
    counts = class_counts(samples, num_classes)
    weights = torch.tensor([1.0 / counts[sample.label] for sample in samples], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=generator)


def build_loaders(
    spec: ExperimentSpec,
    samples: list[Sample],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
) -> tuple[DataLoader, DataLoader]:
    """Train (augmented, shuffled, seeded) and validation loaders over the spec's split of `samples`.

    Each loader's `collate_fn` is a CollateBatch: call its `finish` on every batch once it is on
    the device.
    """
    train_samples, val_samples = split_samples(spec, samples)
    size = tuple(spec.resize)
    crop = tuple(spec.center_crop) if spec.center_crop else None
    workers = loader_workers(spec, device)
    train_recipe = augment.train_recipe(spec.augmentation, size, mean, std, crop)
    eval_recipe = augment.eval_recipe(size, mean, std, crop)
    check_crop(spec, samples)
    stores = image_stores(spec, samples, [train_recipe.prefix, eval_recipe.prefix], workers)
    unreadable = unreadable_images(spec, samples, stores, workers)
    (train_samples, train_skipped), (val_samples, val_skipped) = refuse_or_skip(
        spec, unreadable, [train_samples, val_samples]
    )
    num_classes = max(sample.label for sample in samples) + 1
    sampler = balanced_sampler(train_samples, num_classes, spec.seed) if spec.balanced_sampler else None
    train_loader = DataLoader(
        ImageDataset(train_samples, train_recipe.prefix, stores[train_recipe.prefix], train_skipped),
        batch_size=spec.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(train_samples) > spec.batch_size,
        generator=torch.Generator().manual_seed(spec.seed),
        collate_fn=CollateBatch(train_recipe, on_device=device.type == "cuda"),
        # Not persistent: workers started each epoch take their augmentation seeds from the
        # loader's generator, which checkpoints save, so a resumed run draws what an uninterrupted
        # one drew. Forking them costs milliseconds; the image cache's pages are shared, not copied.
        **_worker_options(workers, device, persistent=False),
    )
    val_loader = build_eval_loader(
        spec, val_samples, mean, std, device, persistent=True, store=stores[eval_recipe.prefix]
    )
    val_loader.dataset.skipped = val_skipped
    return train_loader, val_loader


def build_eval_loader(
    spec: ExperimentSpec,
    samples: list[Sample],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int | None = None,
    persistent: bool = False,
    store: ImageStore | None = None,
) -> DataLoader:
    """Validation / inference loader: the spec's crop and size, no augmentation, in sample order.

    `persistent` keeps its worker processes between passes (validation runs once per epoch);
    `store` holds the decoded images (validation reads them every epoch; inference once).
    """
    crop = tuple(spec.center_crop) if spec.center_crop else None
    recipe = augment.eval_recipe(tuple(spec.resize), mean, std, crop)
    return DataLoader(
        ImageDataset(samples, recipe.prefix, store),
        batch_size=batch_size or spec.valid_batch_size,
        shuffle=False,
        # Its own generator: starting its workers (once, when persistent) then never draws from the
        # global stream that training's random ops use, so resumed and uninterrupted runs stay equal.
        generator=torch.Generator().manual_seed(spec.seed),
        collate_fn=CollateBatch(recipe, on_device=device.type == "cuda"),
        **_worker_options(loader_workers(spec, device), device, persistent),
    )


def _worker_options(workers: int, device: torch.device, persistent: bool) -> dict[str, Any]:
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": persistent and workers > 0,
        # forked workers share the memory image cache's pages (and start faster than spawned ones)
        "multiprocessing_context": fork_context() if workers > 0 else None,
    }

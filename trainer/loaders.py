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

from trainer import augment, cores
from trainer.augment import Prefix, Recipe
from trainer.data import (
    NUM_CLASSES,
    Sample,
    class_name,
    image_folder_classes,
    profile_group,
    scan_image_folder,
    scan_mask_dataset,
    split_by_profile,
)
from trainer.image_cache import ImageStore, available_memory, decode, fork_context, open_store
from trainer.kfold import kfold_split
from trainer.paths import runyard_home
from trainer.relabel import corrections_file, load_corrections
from trainer.spec import ExperimentSpec

log = logging.getLogger("runyard.trainer")


class ImageDataset(Dataset):
    """A split's images as their recipe prefix (uint8 [3, H, W]) with labels; read from `store` when given."""

    def __init__(self, samples: list[Sample], prefix: Prefix, store: ImageStore | None = None):
        self.samples = samples
        self.prefix = prefix
        self.store = store
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
    stores = image_stores(spec, samples, [train_recipe.prefix, eval_recipe.prefix], workers)
    num_classes = max(sample.label for sample in samples) + 1
    sampler = balanced_sampler(train_samples, num_classes, spec.seed) if spec.balanced_sampler else None
    train_loader = DataLoader(
        ImageDataset(train_samples, train_recipe.prefix, stores[train_recipe.prefix]),
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

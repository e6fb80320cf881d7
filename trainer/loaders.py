"""The one place that builds DataLoaders: images decoded to uint8 tensors, transformed per sample."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.io import ImageReadMode, decode_image

from trainer import augment
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
from trainer.kfold import kfold_split
from trainer.relabel import load_corrections
from trainer.spec import ExperimentSpec

log = logging.getLogger("runyard.trainer")


class ImageDataset(Dataset):
    """Decodes each sample's image to a uint8 CHW tensor and applies `transform`."""

    def __init__(self, samples: list[Sample], transform: Callable[[torch.Tensor], torch.Tensor]):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = decode_image(sample.path, mode=ImageReadMode.RGB)
        return self.transform(image), sample.label


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers: this process's share of the box's cores, leaving one for the main loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers_on_box = max(1, int(os.environ.get("RUNYARD_WORKERS_PER_BOX", "1")))
    share = cores // workers_on_box
    if device.type == "cpu":
        return 0 if share <= 2 else min(4, share - 1)
    return max(1, min(8, share - 1))


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
    """Train (augmented, shuffled, seeded) and validation loaders over the spec's split of `samples`."""
    train_samples, val_samples = split_samples(spec, samples)
    size = tuple(spec.resize)
    crop = tuple(spec.center_crop) if spec.center_crop else None
    workers = spec.num_workers if spec.num_workers is not None else default_num_workers(device)
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    num_classes = max(sample.label for sample in samples) + 1
    sampler = balanced_sampler(train_samples, num_classes, spec.seed) if spec.balanced_sampler else None
    train_loader = DataLoader(
        ImageDataset(train_samples, augment.train_transform(spec.augmentation, size, mean, std, crop)),
        batch_size=spec.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(train_samples) > spec.batch_size,
        generator=torch.Generator().manual_seed(spec.seed),
        **common,
    )
    return train_loader, build_eval_loader(spec, val_samples, mean, std, device, persistent=True)


def build_eval_loader(
    spec: ExperimentSpec,
    samples: list[Sample],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int | None = None,
    persistent: bool = False,
) -> DataLoader:
    """Validation / inference loader: the spec's crop and size, no augmentation, in sample order.

    `persistent` keeps its worker processes between passes (validation runs once per epoch).
    """
    workers = spec.num_workers if spec.num_workers is not None else default_num_workers(device)
    crop = tuple(spec.center_crop) if spec.center_crop else None
    return DataLoader(
        ImageDataset(samples, augment.eval_transform(tuple(spec.resize), mean, std, crop)),
        batch_size=batch_size or spec.valid_batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
    )

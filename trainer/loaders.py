"""The one place that builds DataLoaders: images decoded to uint8 tensors, transformed per sample."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

from trainer import augment
from trainer.data import NUM_CLASSES, Sample, profile_group, scan_image_folder, scan_mask_dataset, split_by_profile
from trainer.spec import ExperimentSpec


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
    return scan_mask_dataset(spec.data_dir, spec.age_threshold), NUM_CLASSES


def split_samples(spec: ExperimentSpec, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """The spec's train/validation split: by profile, stratified by gender x age (or by class)."""
    stratify = profile_group if spec.dataset == "mask" else (lambda sample: sample.label)
    return split_by_profile(samples, spec.val_ratio, spec.seed, stratify)


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
    workers = spec.num_workers if spec.num_workers is not None else default_num_workers(device)
    common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    train_loader = DataLoader(
        ImageDataset(train_samples, augment.train_transform(spec.augmentation, size, mean, std)),
        batch_size=spec.batch_size,
        shuffle=True,
        drop_last=len(train_samples) > spec.batch_size,
        generator=torch.Generator().manual_seed(spec.seed),
        **common,
    )
    val_loader = DataLoader(
        ImageDataset(val_samples, augment.eval_transform(size, mean, std)),
        batch_size=spec.valid_batch_size,
        shuffle=False,
        **common,
    )
    return train_loader, val_loader

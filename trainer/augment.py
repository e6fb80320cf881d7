"""Augmentations by name, on uint8 CHW tensors, with fresh random parameters for every sample.

`imgaug` reproduces the seed's best recipe (it used the imgaug package, which no longer imports on
numpy 2) on torchvision.transforms.v2: rotate +-5 degrees, horizontal flip with p=0.5, Gaussian
blur with sigma in [0, 3], additive Gaussian noise with std in [0, 0.1 * 255], resize, ColorJitter
0.1 on brightness, contrast, saturation and hue. Blur and noise strengths are given in pixels of
the 384x512 originals and scaled to the resized image, so the recipe means the same at any size.

Every random op draws its parameters in `make_params` (torchvision's v2 protocol) once per call,
and the DataLoader calls the transform once per image: each sample gets its own parameters.
A spec's `center_crop` (source pixels) crops before resizing, in training and evaluation alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

REFERENCE_HEIGHT = 512  # the competition's photo height the seed's pixel ranges refer to


class RandomGaussianBlur(v2.Transform):
    """Gaussian blur with sigma drawn uniformly from [low, high] per call (sigma 0 = unchanged)."""

    def __init__(self, sigma: tuple[float, float]):
        super().__init__()
        self.sigma = sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": float(torch.empty(()).uniform_(*self.sigma))}

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        sigma = params["sigma"]
        if sigma < 0.05:  # a kernel this narrow changes no pixel
            return inpt
        kernel = 2 * round(3 * sigma) + 1
        return TF.gaussian_blur(inpt, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


class RandomGaussianNoise(v2.Transform):
    """Additive Gaussian noise on a uint8 image with std drawn uniformly from [low, high] (0-255 scale)."""

    def __init__(self, std: tuple[float, float]):
        super().__init__()
        self.std = std

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"std": float(torch.empty(()).uniform_(*self.std))}

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        noisy = inpt.to(torch.float32) + torch.randn(inpt.shape) * params["std"]
        return noisy.round_().clamp_(0, 255).to(torch.uint8)


class CenterCropPixels(v2.Transform):
    """Centre crop to HEIGHTxWIDTH source pixels; a side already smaller than that is kept whole."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = size

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        height, width = inpt.shape[-2:]
        return TF.center_crop(inpt, [min(height, self.size[0]), min(width, self.size[1])])


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[torch.nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _crop(crop: tuple[int, int] | None) -> list[torch.nn.Module]:
    return [CenterCropPixels(crop)] if crop else []


def base(
    size: tuple[int, int], mean: Sequence[float], std: Sequence[float], crop: tuple[int, int] | None = None
) -> v2.Compose:
    """(Centre crop,) resize and normalize: also the evaluation transform of every recipe."""
    return v2.Compose([*_crop(crop), v2.Resize(size, antialias=True), *_normalize(mean, std)])


def custom(
    size: tuple[int, int], mean: Sequence[float], std: Sequence[float], crop: tuple[int, int] | None = None
) -> v2.Compose:
    """The seed's CustomAugmentation: centre crop 320x256 (of 512x384), resize, ColorJitter 0.1, noise.

    A spec's `center_crop` replaces the seed's fixed crop.
    """
    return v2.Compose(
        [
            *(_crop(crop) or [CenterCropFraction(320 / 512, 256 / 384)]),
            v2.Resize(size, antialias=True),
            v2.ColorJitter(0.1, 0.1, 0.1, 0.1),
            RandomGaussianNoise((0.0, 0.1 * 255)),
            *_normalize(mean, std),
        ]
    )


def imgaug(
    size: tuple[int, int], mean: Sequence[float], std: Sequence[float], crop: tuple[int, int] | None = None
) -> v2.Compose:
    """The seed's best recipe (ImgaugAugmentation), per sample."""
    scale = size[0] / REFERENCE_HEIGHT
    return v2.Compose(
        [
            *_crop(crop),
            v2.Resize(size, antialias=True),
            v2.RandomRotation(5),
            v2.RandomHorizontalFlip(0.5),
            RandomGaussianBlur((0.0, 3.0 * scale)),
            RandomGaussianNoise((0.0, 0.1 * 255)),
            v2.ColorJitter(0.1, 0.1, 0.1, 0.1),
            *_normalize(mean, std),
        ]
    )


class CenterCropFraction(v2.Transform):
    """Centre crop to a fraction of the height and width, whatever the input size."""

    def __init__(self, height_fraction: float, width_fraction: float):
        super().__init__()
        self.fractions = (height_fraction, width_fraction)

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        height, width = inpt.shape[-2:]
        return TF.center_crop(inpt, [round(height * self.fractions[0]), round(width * self.fractions[1])])


AUGMENTATIONS: dict[str, Callable[..., v2.Compose]] = {
    "base": base,
    "custom": custom,
    "imgaug": imgaug,
}


def train_transform(
    name: str,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    crop: tuple[int, int] | None = None,
) -> v2.Compose:
    """The training transform the spec's `augmentation` names."""
    return AUGMENTATIONS[name](size, mean, std, crop)


def eval_transform(
    size: tuple[int, int], mean: Sequence[float], std: Sequence[float], crop: tuple[int, int] | None = None
) -> v2.Compose:
    """Validation and inference: the same crop and size as training, no randomness."""
    return base(size, mean, std, crop)

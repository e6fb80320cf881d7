"""Augmentations by name, on uint8 CHW tensors, with fresh random parameters for every sample.

`imgaug` reproduces the seed's best recipe (it used the imgaug package, which no longer imports on
numpy 2) on torchvision.transforms.v2: rotate +-5 degrees, horizontal flip with p=0.5, Gaussian
blur with sigma in [0, 3], additive Gaussian noise with std in [0, 0.1 * 255], resize, ColorJitter
0.1 on brightness, contrast, saturation and hue. Blur and noise strengths are given in pixels of
the 384x512 originals and scaled to the resized image, so the recipe means the same at any size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

REFERENCE_HEIGHT = 512  # the competition's photo height the seed's pixel ranges refer to


class RandomGaussianBlur(torch.nn.Module):
    """Gaussian blur with sigma drawn uniformly from [low, high] per call (sigma 0 = unchanged)."""

    def __init__(self, sigma: tuple[float, float]):
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        if sigma < 0.05:
            return image
        kernel = 2 * round(3 * sigma) + 1
        return TF.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


class RandomGaussianNoise(torch.nn.Module):
    """Additive Gaussian noise on a uint8 image with std drawn uniformly from [low, high] (0-255 scale)."""

    def __init__(self, std: tuple[float, float]):
        super().__init__()
        self.std = std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        std = float(torch.empty(()).uniform_(*self.std))
        noisy = image.to(torch.float32) + torch.randn(image.shape) * std
        return noisy.round_().clamp_(0, 255).to(torch.uint8)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[torch.nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def base(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize and normalize: also the evaluation transform of every recipe."""
    return v2.Compose([v2.Resize(size, antialias=True), *_normalize(mean, std)])


def custom(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The seed's CustomAugmentation: centre crop 320x256 (of 512x384), resize, ColorJitter 0.1, noise."""
    return v2.Compose(
        [
            CenterCropFraction(320 / 512, 256 / 384),
            v2.Resize(size, antialias=True),
            v2.ColorJitter(0.1, 0.1, 0.1, 0.1),
            RandomGaussianNoise((0.0, 0.1 * 255)),
            *_normalize(mean, std),
        ]
    )


def imgaug(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The seed's best recipe (ImgaugAugmentation), per sample."""
    scale = size[0] / REFERENCE_HEIGHT
    return v2.Compose(
        [
            v2.Resize(size, antialias=True),
            v2.RandomRotation(5),
            v2.RandomHorizontalFlip(0.5),
            RandomGaussianBlur((0.0, 3.0 * scale)),
            RandomGaussianNoise((0.0, 0.1 * 255)),
            v2.ColorJitter(0.1, 0.1, 0.1, 0.1),
            *_normalize(mean, std),
        ]
    )


class CenterCropFraction(torch.nn.Module):
    """Centre crop to a fraction of the height and width, whatever the input size."""

    def __init__(self, height_fraction: float, width_fraction: float):
        super().__init__()
        self.fractions = (height_fraction, width_fraction)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        return TF.center_crop(image, [round(height * self.fractions[0]), round(width * self.fractions[1])])


AUGMENTATIONS: dict[str, Callable[[tuple[int, int], Sequence[float], Sequence[float]], v2.Compose]] = {
    "base": base,
    "custom": custom,
    "imgaug": imgaug,
}


def train_transform(name: str, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The training transform the spec's `augmentation` names."""
    return AUGMENTATIONS[name](size, mean, std)


def eval_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return base(size, mean, std)

"""Augmentation recipes by name: a deterministic prefix per image, then a random suffix per batch.

A recipe has two halves:
- its `Prefix` (centre crop, resize) is deterministic, so its uint8 output is what the image cache
  keeps (trainer.image_cache): an image is decoded and resized once per job, not once per epoch;
- its random ops run on a whole uint8 batch at once, on whichever device the batch sits on (the GPU
  after the host-to-device copy, or a DataLoader worker on the CPU: see trainer.loaders), with
  fresh parameters for every image of the batch. torchvision's v2 transforms draw ONE parameter set
  per call, so they cannot be used on batches; these ops draw a tensor of parameters, one per image.

`imgaug` reproduces the seed's best recipe (it used the imgaug package, which no longer imports on
numpy 2): rotate +-5 degrees, horizontal flip with p=0.5, Gaussian blur with sigma in [0, 3],
additive Gaussian noise with std in [0, 0.1 * 255], resize, ColorJitter 0.1 on brightness,
contrast, saturation and hue. Blur and noise strengths are given in pixels of the 384x512
originals and scaled to the resized image, so the recipe means the same at any size. Rotation and
flip are one bilinear resampling (imgaug's default order), and ColorJitter applies its four
factors in a fixed order (brightness, contrast, saturation, hue) rather than a random one.
The ops work in float32 on 0..1 and round nothing in between; the recipe ends with normalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

REFERENCE_HEIGHT = 512  # the competition's photo height the seed's pixel ranges refer to
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
SEED_CUSTOM_CROP = (320 / 512, 256 / 384)  # the seed's CustomAugmentation: 320x256 of a 512x384 photo
# RGB -> YIQ (NTSC); its first row is luma, the other two span the colour plane hue turns in.
YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@dataclass(frozen=True)
class Prefix:
    """The deterministic start of a recipe: an optional centre crop, then an antialiased resize.

    `crop_pixels` is HEIGHTxWIDTH in source pixels (a side already smaller is kept whole);
    `crop_fraction` is a share of the height and width, whatever the photo's size.
    """

    size: tuple[int, int]
    crop_pixels: tuple[int, int] | None = None
    crop_fraction: tuple[float, float] | None = None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 [3, h, w] image -> uint8 [3, *size]."""
        height, width = image.shape[-2:]
        if self.crop_pixels is not None:
            image = TF.center_crop(image, [min(height, self.crop_pixels[0]), min(width, self.crop_pixels[1])])
        elif self.crop_fraction is not None:
            crop = [round(height * self.crop_fraction[0]), round(width * self.crop_fraction[1])]
            image = TF.center_crop(image, crop)
        return TF.resize(image, list(self.size), antialias=True)

    def describe(self) -> str:
        """A stable text of what this prefix computes (part of the disk cache's key)."""
        crop = (
            f"pixels:{self.crop_pixels[0]}x{self.crop_pixels[1]}"
            if self.crop_pixels
            else f"fraction:{self.crop_fraction[0]:.6f}x{self.crop_fraction[1]:.6f}"
            if self.crop_fraction
            else "none"
        )
        return f"crop={crop};resize={self.size[0]}x{self.size[1]};antialias"


class RandomOp:
    """A random op on a float batch [B, 3, H, W] in 0..1, with its own parameters for every image.

    `draw` takes the parameters from torch's global CPU generator (so a seed gives the same draws
    on any device, and a checkpoint's RNG state covers them); `apply` runs on the batch's device.
    """

    def draw(self, count: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        params = {name: value.to(images.device) for name, value in self.draw(len(images)).items()}
        return self.apply(images, params)


def _uniform(count: int, low: float, high: float) -> torch.Tensor:
    return torch.empty(count).uniform_(low, high)


class RandomRotateFlip(RandomOp):
    """Rotation by an angle drawn from [-degrees, degrees] (counter-clockwise positive, as
    torchvision's rotate) and a horizontal flip with probability `flip_p`, as one bilinear
    resampling about the centre (corners that come from outside are black)."""

    def __init__(self, degrees: float, flip_p: float):
        self.degrees = degrees
        self.flip_p = flip_p

    def draw(self, count: int) -> dict[str, torch.Tensor]:
        return {"angle": _uniform(count, -self.degrees, self.degrees), "flip": torch.rand(count) < self.flip_p}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        count, _, height, width = images.shape
        radians = params["angle"].to(images.dtype) * (math.pi / 180)
        cos, sin = radians.cos(), radians.sin()
        mirror = 1 - 2 * params["flip"].to(images.dtype)  # -1 mirrors x
        # For each output pixel, where to read in the input (normalised coordinates, which stretch
        # x and y differently when the image is not square): rotate back, then mirror.
        theta = torch.zeros(count, 2, 3, dtype=images.dtype, device=images.device)
        theta[:, 0, 0] = cos * mirror
        theta[:, 0, 1] = -sin * (height / width)
        theta[:, 1, 0] = sin * (width / height) * mirror
        theta[:, 1, 1] = cos
        grid = F.affine_grid(theta, [count, 3, height, width], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class RandomGaussianBlur(RandomOp):
    """Gaussian blur with sigma drawn uniformly from [low, high] per image (sigma near 0 = unchanged).

    Every image gets a kernel as wide as the largest sigma needs (3 sigma each side); narrower
    sigmas put next to no weight on its outer taps. Separable, with reflected borders.
    """

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma
        self.radius = max(1, round(3 * sigma[1]))

    def draw(self, count: int) -> dict[str, torch.Tensor]:
        return {"sigma": _uniform(count, *self.sigma)}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=images.dtype, device=images.device)
        sigma = params["sigma"].to(images.dtype).clamp(min=1e-3)[:, None]
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, taps]
        images = _convolve(images, kernel, dim=-1, radius=self.radius)
        return _convolve(images, kernel, dim=-2, radius=self.radius)


def _convolve(images: torch.Tensor, kernel: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """Each image convolved along `dim` with its own 1-D kernel (a weighted sum of shifted copies:
    much faster than a grouped convolution with one group per image and channel on the CPU)."""
    padding = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
    padded = F.pad(images, padding, mode="reflect")
    length = images.shape[dim]
    result = torch.zeros_like(images)
    for tap in range(kernel.shape[1]):
        result.addcmul_(padded.narrow(dim, tap, length), kernel[:, tap, None, None, None])
    return result


class RandomGaussianNoise(RandomOp):
    """Additive Gaussian noise with std drawn uniformly from [low, high] per image (on the 0-255 scale)."""

    def __init__(self, std: tuple[float, float]):
        self.std = std

    def draw(self, count: int) -> dict[str, torch.Tensor]:
        return {"std": _uniform(count, *self.std)}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        std = (params["std"].to(images.dtype) / 255)[:, None, None, None]
        noise = torch.randn(images.shape, dtype=images.dtype, device=images.device)
        return images.add_(noise.mul_(std)).clamp_(0, 1)


class ColorJitter(RandomOp):
    """Brightness, contrast and saturation factors from [1 - x, 1 + x] and a hue rotation from
    [-hue, hue] (a share of the colour wheel), drawn per image.

    torchvision's ColorJitter applies four ops with a clamp after each, and shifts hue in HSV. Here
    the four are one affine colour map per image (a 3x3 matrix and an offset, clamped once): the
    brightness, contrast and saturation formulas are torchvision's, and hue turns colours about
    the grey axis in YIQ space, which keeps each pixel's luma. About 15x cheaper on a CPU batch.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.ranges = {
            "brightness_factor": (1 - brightness, 1 + brightness),
            "contrast_factor": (1 - contrast, 1 + contrast),
            "saturation_factor": (1 - saturation, 1 + saturation),
            "hue_factor": (-hue, hue),
        }

    def draw(self, count: int) -> dict[str, torch.Tensor]:
        return {name: _uniform(count, low, high) for name, (low, high) in self.ranges.items()}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype, device = images.dtype, images.device
        brightness, contrast, saturation, hue = (
            params[name].to(dtype)
            for name in ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        )
        eye = torch.eye(3, dtype=dtype, device=device)
        grey_rows = torch.tensor(GREY_WEIGHTS, dtype=dtype, device=device).expand(3, 3)  # x -> (luma, luma, luma)
        # brightness then contrast: c * b * x + (1 - c) * mean luma of (b * x)
        scale = (contrast * brightness)[:, None, None]
        mean_luma = grey(images).mean(dim=(-3, -2, -1)) * brightness
        offset = ((1 - contrast) * mean_luma)[:, None].expand(-1, 3)
        # saturation: s * x + (1 - s) * luma(x), for the scaled image and its offset alike
        saturate = saturation[:, None, None] * eye + (1 - saturation)[:, None, None] * grey_rows
        matrix = hue_rotation(hue) @ saturate * scale
        offset = (hue_rotation(hue) @ saturate @ offset[:, :, None])[:, :, 0]
        count, channels, height, width = images.shape
        mapped = torch.baddbmm(offset[:, :, None], matrix, images.reshape(count, channels, height * width))
        return mapped.clamp_(0, 1).view(count, channels, height, width)


def hue_rotation(turns: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] RGB matrices that turn hue by `turns` of the colour wheel about the grey axis (YIQ)."""
    to_yiq = torch.tensor(YIQ, dtype=turns.dtype, device=turns.device)
    angle = turns * (2 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(turns), 3, 3, dtype=turns.dtype, device=turns.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    return torch.linalg.inv(to_yiq) @ rotation @ to_yiq


def grey(images: torch.Tensor) -> torch.Tensor:
    """Luma of a [B, 3, H, W] batch as [B, 1, H, W]."""
    red, green, blue = images.unbind(dim=1)
    return (GREY_WEIGHTS[0] * red + GREY_WEIGHTS[1] * green + GREY_WEIGHTS[2] * blue).unsqueeze(1)


class Recipe:
    """A recipe: its deterministic `prefix` (cached per image) and random `ops` run on uint8 batches.

    Calling it on a uint8 batch [B, 3, H, W] of prefixed images (on any device) returns the
    augmented, normalised float32 batch.
    """

    def __init__(self, prefix: Prefix, ops: Sequence[RandomOp], mean: Sequence[float], std: Sequence[float]):
        self.prefix = prefix
        self.ops = list(ops)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.to(torch.float32).div_(255)
        for op in self.ops:
            batch = op(batch)
        mean = torch.tensor(self.mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std)


def _prefix(size: tuple[int, int], crop: tuple[int, int] | None, default_fraction=None) -> Prefix:
    return Prefix(
        tuple(size), crop_pixels=tuple(crop) if crop else None, crop_fraction=None if crop else default_fraction
    )


def base(size: tuple[int, int], crop: tuple[int, int] | None = None) -> tuple[Prefix, list[RandomOp]]:
    """(Centre crop,) resize, nothing random: also the evaluation recipe of every recipe."""
    return _prefix(size, crop), []


def custom(size: tuple[int, int], crop: tuple[int, int] | None = None) -> tuple[Prefix, list[RandomOp]]:
    """The seed's CustomAugmentation: centre crop 320x256 (of 512x384), resize, ColorJitter 0.1, noise.

    A spec's `center_crop` replaces the seed's fixed crop.
    """
    return _prefix(size, crop, SEED_CUSTOM_CROP), [ColorJitter(0.1, 0.1, 0.1, 0.1), RandomGaussianNoise((0, 25.5))]


def imgaug(size: tuple[int, int], crop: tuple[int, int] | None = None) -> tuple[Prefix, list[RandomOp]]:
    """The seed's best recipe (ImgaugAugmentation)."""
    scale = size[0] / REFERENCE_HEIGHT
    return _prefix(size, crop), [
        RandomRotateFlip(5.0, 0.5),
        RandomGaussianBlur((0.0, 3.0 * scale)),
        RandomGaussianNoise((0.0, 0.1 * 255)),
        ColorJitter(0.1, 0.1, 0.1, 0.1),
    ]


AUGMENTATIONS: dict[str, Callable[..., tuple[Prefix, list[RandomOp]]]] = {
    "base": base,
    "custom": custom,
    "imgaug": imgaug,
}


def train_recipe(
    name: str,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    crop: tuple[int, int] | None = None,
) -> Recipe:
    """The training recipe the spec's `augmentation` names."""
    prefix, ops = AUGMENTATIONS[name](size, crop)
    return Recipe(prefix, ops, mean, std)


def eval_recipe(
    size: tuple[int, int], mean: Sequence[float], std: Sequence[float], crop: tuple[int, int] | None = None
) -> Recipe:
    """Validation and inference: the spec's crop and size, no randomness."""
    prefix, ops = base(size, crop)
    return Recipe(prefix, ops, mean, std)

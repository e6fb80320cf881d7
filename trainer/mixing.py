"""Mixup and CutMix on a training batch, for any loss and any head type.

Instead of soft targets, the loss is mixed: lam x loss(labels) + (1 - lam) x loss(partner labels).
That works unchanged for focal, F1, weighted sums and multi-head losses. One lam per batch
(drawn from Beta(alpha, alpha)), a random partner per image; with both on, each batch uses one
of the two with equal chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class MixedBatch:
    """A mixed batch: images, each image's own label, its partner's label and the share lam of its own."""

    images: torch.Tensor
    labels: torch.Tensor
    partner_labels: torch.Tensor
    lam: float

    def loss(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor):
        """The mixed loss: lam x criterion(labels) + (1 - lam) x criterion(partner labels)."""
        return self.lam * criterion(logits, self.labels) + (1 - self.lam) * criterion(logits, self.partner_labels)

    @property
    def dominant_labels(self) -> torch.Tensor:
        """The label that makes up most of each image (for training accuracy)."""
        return self.labels if self.lam >= 0.5 else self.partner_labels


class BatchMixer:
    """Draws mixup or cutmix for each batch; `mixup_alpha` / `cutmix_alpha` of 0 turn one off."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float):
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> MixedBatch:
        partner = torch.randperm(len(images), device=images.device)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or bool(torch.rand(()) < 0.5))
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if use_cutmix:
            mixed, lam = cutmix(images, images[partner], lam)
        else:
            mixed = lam * images + (1 - lam) * images[partner]
        return MixedBatch(mixed, labels, labels[partner], lam)


def cutmix(images: torch.Tensor, partners: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Paste a box of area ~(1 - lam) from `partners` into `images`; returns the exact lam of the pasted box."""
    height, width = images.shape[-2:]
    cut = math.sqrt(1 - lam)
    box_h, box_w = round(height * cut), round(width * cut)
    center_y = int(torch.randint(height, ()))
    center_x = int(torch.randint(width, ()))
    top, bottom = max(center_y - box_h // 2, 0), min(center_y + box_h - box_h // 2, height)
    left, right = max(center_x - box_w // 2, 0), min(center_x + box_w - box_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (height * width)

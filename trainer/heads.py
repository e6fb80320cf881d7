"""Multi-head models: one timm backbone, three heads (mask 3, gender 2, age 3), decoded to 18 classes.

The seed's `category_train` trained the mask, gender and age tasks as separate heads. Here the
heads share a backbone (`timm.create_model(name, num_classes=0)` returns pooled features for any
timm architecture), the model returns the three heads' logits side by side ([batch, 8]), and
`class_probabilities` turns them into the competition's 18-class probabilities as the product
P(mask) x P(gender) x P(age), so metrics, pictures and inference all see 18 classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import decode_label

HEADS: tuple[tuple[str, int], ...] = (("mask", 3), ("gender", 2), ("age", 3))
HEAD_SIZES = [size for _, size in HEADS]


class MultiHeadModel(nn.Module):
    """A feature backbone with one linear head per task; forward returns the heads' logits concatenated."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        # Models with a pre-logits layer (e.g. MobileNetV3) return head_hidden_size features.
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.heads = nn.ModuleDict({name: nn.Linear(features, size) for name, size in HEADS})
        # timm.data.resolve_model_data_config reads the mean/std and input size from here.
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return torch.cat([self.heads[name](features) for name, _ in HEADS], dim=1)


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[batch, 8] -> (mask [batch, 3], gender [batch, 2], age [batch, 3])."""
    return torch.split(logits, HEAD_SIZES, dim=1)


def head_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """18-class labels -> (mask, gender, age) labels; label = mask * 6 + gender * 3 + age."""
    return labels // 6, (labels // 3) % 2, labels % 3


def class_probabilities(logits: torch.Tensor, heads: str) -> torch.Tensor:
    """Model outputs -> [batch, classes] probabilities (softmax, or the product of the three heads')."""
    if heads == "single":
        return F.softmax(logits.float(), dim=1)
    mask, gender, age = (F.softmax(part.float(), dim=1) for part in split_logits(logits))
    joint = mask[:, :, None, None] * gender[:, None, :, None] * age[:, None, None, :]
    return joint.reshape(len(logits), -1)  # C order: index mask * 6 + gender * 3 + age


def predict_classes(logits: torch.Tensor, heads: str) -> torch.Tensor:
    """The predicted class per sample (for multi heads: each head's argmax, combined)."""
    if heads == "single":
        return logits.argmax(dim=1)
    mask, gender, age = (part.argmax(dim=1) for part in split_logits(logits))
    return mask * 6 + gender * 3 + age


def head_class_counts(counts: Sequence[int]) -> list[list[int]]:
    """18-class counts -> [mask counts (3), gender counts (2), age counts (3)]."""
    per_head = [[0] * size for size in HEAD_SIZES]
    for label, count in enumerate(counts):
        for head, value in enumerate(decode_label(label)):
            per_head[head][value] += count
    return per_head


class MultiHeadLoss(nn.Module):
    """sum over heads of weight x loss(head logits, head labels)."""

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.weights = list(weights)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = zip(self.weights, self.losses, split_logits(logits), head_targets(targets), strict=True)
        return sum(weight * loss(head_logits, head_labels) for weight, loss, head_logits, head_labels in parts)

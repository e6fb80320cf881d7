"""Losses by name, as the spec's `loss` field spells them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Cross entropy scaled by (1 - p_true) ** gamma, so easy examples count less."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=-1)
        log_p_true = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        return (-((1 - log_p_true.exp()) ** self.gamma) * log_p_true).mean()


class F1Loss(nn.Module):
    """1 - macro soft-F1 of the softmax probabilities: optimises the competition's score directly."""

    def __init__(self, num_classes: int, epsilon: float = 1e-7):
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=-1)
        truth = F.one_hot(targets, self.num_classes).to(probs.dtype)
        true_positive = (probs * truth).sum(dim=0)
        false_positive = (probs * (1 - truth)).sum(dim=0)
        false_negative = ((1 - probs) * truth).sum(dim=0)
        f1 = 2 * true_positive / (2 * true_positive + false_positive + false_negative + self.epsilon)
        return 1 - f1.mean()


LOSS_FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "cross_entropy": lambda num_classes: nn.CrossEntropyLoss(),
    "focal": lambda num_classes: FocalLoss(gamma=2.0),
    "label_smoothing": lambda num_classes: nn.CrossEntropyLoss(label_smoothing=0.1),
    "f1": lambda num_classes: F1Loss(num_classes),
}


def create_loss(name: str, num_classes: int) -> nn.Module:
    """The loss the spec names; the spec has already checked the name."""
    return LOSS_FACTORIES[name](num_classes)

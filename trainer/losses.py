"""Losses by name, as the spec's `loss` field spells them, and weighted sums of them.

`create_loss("0.6*focal+0.4*f1", ...)` is 0.6 x focal + 0.4 x F1; `create_criterion(spec, ...)`
is what the trainer uses: one loss for a single head, or per-head losses summed with the spec's
head weights for `heads: multi`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from contracts.loss_formula import parse_loss
from contracts.spec import ExperimentSpec
from trainer.heads import HEADS, MultiHeadLoss, head_class_counts


class FocalLoss(nn.Module):
    """Cross entropy scaled by (1 - p_true) ** gamma, so easy examples count less.

    With class weights, each sample counts with its class's weight (a weighted mean, like
    nn.CrossEntropyLoss), so gamma=0 gives exactly weighted cross entropy.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_p_true = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        losses = -((1 - log_p_true.exp()) ** self.gamma) * log_p_true
        if self.weight is None:
            return losses.mean()
        sample_weights = self.weight[targets]
        return (losses * sample_weights).sum() / sample_weights.sum()


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


class WeightedSum(nn.Module):
    """sum(weight x loss) over the terms of a loss formula such as 0.6*focal+0.4*f1."""

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [weight for weight, _ in terms]
        self.losses = nn.ModuleList([loss for _, loss in terms])

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(weight * loss(logits, targets) for weight, loss in zip(self.weights, self.losses, strict=True))


@dataclass(frozen=True)
class LossOptions:
    """The spec's knobs of the named losses; `class_weights` is one weight per class or None."""

    focal_gamma: float = 2.0
    label_smoothing: float = 0.1
    class_weights: torch.Tensor | None = None


LOSS_FACTORIES: dict[str, Callable[[int, LossOptions], nn.Module]] = {
    "cross_entropy": lambda num_classes, options: nn.CrossEntropyLoss(weight=options.class_weights),
    "focal": lambda num_classes, options: FocalLoss(options.focal_gamma, options.class_weights),
    "label_smoothing": lambda num_classes, options: nn.CrossEntropyLoss(
        weight=options.class_weights, label_smoothing=options.label_smoothing
    ),
    # Macro F1 already weighs every class equally, so class weights do not apply to it.
    "f1": lambda num_classes, options: F1Loss(num_classes),
}


def create_loss(name: str, num_classes: int, options: LossOptions | None = None) -> nn.Module:
    """The loss a spec's `loss` names: one name, or a weighted sum such as 0.6*focal+0.4*f1."""
    options = options or LossOptions()
    terms = parse_loss(name, lambda part: part)
    if len(terms) == 1 and terms[0][0] == 1.0:
        return LOSS_FACTORIES[terms[0][1]](num_classes, options)
    return WeightedSum([(weight, LOSS_FACTORIES[part](num_classes, options)) for weight, part in terms])


def inverse_frequency_weights(counts: Sequence[int]) -> torch.Tensor:
    """N / (classes x count) per class: 1 for every class when balanced; absent classes get 0."""
    counts_tensor = torch.tensor(counts, dtype=torch.float32)
    present = counts_tensor > 0
    weights = torch.zeros_like(counts_tensor)
    weights[present] = counts_tensor.sum() / (int(present.sum()) * counts_tensor[present])
    return weights


def _options(spec: ExperimentSpec, counts: Sequence[int]) -> LossOptions:
    weights = inverse_frequency_weights(counts) if spec.class_weights == "inverse_frequency" else None
    return LossOptions(spec.focal_gamma, spec.label_smoothing, weights)


def create_criterion(spec: ExperimentSpec, num_classes: int, counts: Sequence[int]) -> nn.Module:
    """What the trainer minimises: the spec's loss on one head, or on each of the multi heads.

    `counts` are the training split's images per class (for class weights).
    """
    if spec.heads == "single":
        return create_loss(spec.loss, num_classes, _options(spec, counts))
    per_head_counts = head_class_counts(counts)
    losses = [
        create_loss(spec.loss, size, _options(spec, head_counts))
        for (_name, size), head_counts in zip(HEADS, per_head_counts, strict=True)
    ]
    weights = [getattr(spec.head_weights, name) for name, _ in HEADS]
    return MultiHeadLoss(losses, weights)

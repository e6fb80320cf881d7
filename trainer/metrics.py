"""Classification metrics from a confusion matrix: accuracy and macro F1 (the competition's score)."""

from __future__ import annotations

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """matrix[true, predicted] counts, int64."""
    index = targets.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(matrix: torch.Tensor) -> float:
    total = int(matrix.sum())
    return float(matrix.diagonal().sum()) / total if total else 0.0


def per_class_f1(matrix: torch.Tensor) -> torch.Tensor:
    """F1 of each class, 2TP / (2TP + FP + FN); 0 where a class is neither true nor predicted."""
    true_positive = matrix.diagonal().to(torch.float64)
    false_positive = matrix.sum(dim=0) - true_positive
    false_negative = matrix.sum(dim=1) - true_positive
    denominator = 2 * true_positive + false_positive + false_negative
    return torch.where(denominator > 0, 2 * true_positive / denominator.clamp(min=1), torch.zeros_like(denominator))


def macro_f1(matrix: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in the targets or the predictions.

    Same value as sklearn.metrics.f1_score(y_true, y_pred, average="macro").
    """
    present = (matrix.sum(dim=0) + matrix.sum(dim=1)) > 0
    if not bool(present.any()):
        return 0.0
    return float(per_class_f1(matrix)[present].mean())

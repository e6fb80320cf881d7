"""Macro F1 is the competition's score: it must agree with scikit-learn exactly."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from trainer.metrics import accuracy, confusion_matrix, macro_f1


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_equals_sklearn_on_random_predictions(seed):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 18, (300,), generator=generator)
    predictions = torch.where(
        torch.rand(300, generator=generator) < 0.6, targets, torch.randint(0, 18, (300,), generator=generator)
    )
    matrix = confusion_matrix(predictions, targets, 18)
    assert macro_f1(matrix) == pytest.approx(f1_score(targets, predictions, average="macro"), abs=1e-12)
    assert accuracy(matrix) == pytest.approx(accuracy_score(targets, predictions), abs=1e-12)


def test_macro_f1_counts_only_classes_seen_in_targets_or_predictions():
    # Class 2 is predicted but never true, classes 3..17 never appear: sklearn averages over {0, 1, 2}.
    targets = torch.tensor([0, 0, 1, 1, 1])
    predictions = torch.tensor([0, 2, 1, 1, 0])
    matrix = confusion_matrix(predictions, targets, 18)
    assert macro_f1(matrix) == pytest.approx(f1_score(targets, predictions, average="macro"), abs=1e-12)


def test_perfect_and_empty_predictions():
    labels = torch.arange(18)
    assert macro_f1(confusion_matrix(labels, labels, 18)) == 1.0
    assert macro_f1(torch.zeros(18, 18, dtype=torch.int64)) == 0.0

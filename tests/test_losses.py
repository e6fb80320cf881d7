"""Losses by name and by formula, class weights, and the multi-head decoding to 18 classes."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from contracts.spec import SpecError, load_spec
from trainer.heads import (
    MultiHeadModel,
    class_probabilities,
    head_class_counts,
    head_targets,
    predict_classes,
    split_logits,
)
from trainer.losses import (
    F1Loss,
    FocalLoss,
    LossOptions,
    WeightedSum,
    create_criterion,
    create_loss,
    inverse_frequency_weights,
)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(32, 18), torch.randint(0, 18, (32,))


@pytest.mark.parametrize(
    "written, canonical",
    [
        ("0.6*focal+0.4*f1", "0.6*focal+0.4*f1"),
        ("0.6 * Focal + 0.4 * F1", "0.6*focal+0.4*f1"),
        ("focal + f1", "1*focal+1*f1"),
        ("1*cross_entropy", "cross_entropy"),
        ("CE", "cross_entropy"),
        ("0.5*ce+0.5*label_smoothing", "0.5*cross_entropy+0.5*label_smoothing"),
    ],
)
def test_loss_formulas_are_stored_in_one_canonical_spelling(written, canonical):
    assert load_spec({"loss": written}).loss == canonical


@pytest.mark.parametrize(
    "formula, words",
    [
        ("0.6*focal+0.4*hinge", "unknown loss 'hinge'"),
        ("x*focal", "'x' is not a number"),
        ("-1*focal", "positive"),
        ("focal+", "empty term"),
        ("focal+0.5*focal", "names focal twice"),
    ],
)
def test_bad_loss_formulas_name_the_term_and_the_fix(formula, words):
    with pytest.raises(SpecError, match=r"^loss: ") as raised:
        load_spec({"loss": formula})
    assert words in str(raised.value)


def test_a_formula_is_the_weighted_sum_of_its_losses(batch):
    logits, targets = batch
    combined = create_loss("0.6*focal+0.4*f1", 18)
    assert isinstance(combined, WeightedSum)
    expected = 0.6 * FocalLoss(2.0)(logits, targets) + 0.4 * F1Loss(18)(logits, targets)
    assert torch.allclose(combined(logits, targets), expected)


def test_focal_with_gamma_zero_is_cross_entropy_with_or_without_class_weights(batch):
    logits, targets = batch
    weights = torch.rand(18) + 0.1
    assert torch.allclose(FocalLoss(0.0)(logits, targets), F.cross_entropy(logits, targets))
    assert torch.allclose(FocalLoss(0.0, weights)(logits, targets), F.cross_entropy(logits, targets, weight=weights))
    # gamma > 0 shrinks the loss of confident predictions most
    assert FocalLoss(2.0)(logits, targets) < FocalLoss(0.0)(logits, targets)


def test_spec_knobs_reach_the_losses(batch):
    logits, targets = batch
    spec = load_spec({"loss": "label_smoothing", "label_smoothing": 0.3})
    loss = create_criterion(spec, 18, [1] * 18)
    assert torch.allclose(loss(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.3))
    focal = create_criterion(load_spec({"loss": "focal", "focal_gamma": 0.5}), 18, [1] * 18)
    assert torch.allclose(focal(logits, targets), FocalLoss(0.5)(logits, targets))


def test_f1_loss_is_near_zero_for_confident_right_answers_and_high_for_wrong_ones():
    targets = torch.arange(18).repeat(2)
    right = F.one_hot(targets, 18).float() * 50
    wrong = F.one_hot((targets + 1) % 18, 18).float() * 50
    assert float(F1Loss(18)(right, targets)) < 1e-3
    assert float(F1Loss(18)(wrong, targets)) > 0.99


def test_inverse_frequency_weights_balance_the_classes():
    weights = inverse_frequency_weights([10, 30, 0, 60])
    assert weights.tolist() == pytest.approx([100 / 30, 100 / 90, 0.0, 100 / 180])
    # every present class then carries the same total weight
    assert 10 * weights[0] == pytest.approx(30 * weights[1]) == pytest.approx(60 * weights[3])
    spec = load_spec({"loss": "cross_entropy", "class_weights": "inverse_frequency"})
    counts = list(range(1, 19))
    logits, targets = torch.randn(40, 18), torch.randint(0, 18, (40,))
    expected = F.cross_entropy(logits, targets, weight=inverse_frequency_weights(counts))
    assert torch.allclose(create_criterion(spec, 18, counts)(logits, targets), expected)


def test_multi_head_labels_decode_the_18_classes():
    labels = torch.arange(18)
    mask, gender, age = head_targets(labels)
    assert torch.equal(mask * 6 + gender * 3 + age, labels)
    assert head_class_counts([1] * 18) == [[6, 6, 6], [9, 9], [6, 6, 6]]


def test_multi_head_probabilities_are_the_product_of_the_heads_and_agree_with_the_prediction():
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    probabilities = class_probabilities(logits, "multi")
    assert probabilities.shape == (64, 18)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(64, dtype=probabilities.dtype))
    mask, gender, age = (F.softmax(part, dim=1) for part in split_logits(logits))
    label = 2 * 6 + 1 * 3 + 0  # not wear / female / <30
    assert torch.allclose(probabilities[:, label], mask[:, 2] * gender[:, 1] * age[:, 0])
    assert torch.equal(probabilities.argmax(dim=1), predict_classes(logits, "multi"))


def test_multi_head_loss_is_the_weighted_sum_of_the_three_head_losses():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 8), torch.randint(0, 18, (16,))
    spec = load_spec({"heads": "multi", "loss": "cross_entropy", "head_weights": {"mask": 2, "gender": 1, "age": 0.5}})
    loss = create_criterion(spec, 18, [1] * 18)
    mask, gender, age = split_logits(logits)
    mask_t, gender_t, age_t = head_targets(labels)
    expected = 2 * F.cross_entropy(mask, mask_t) + F.cross_entropy(gender, gender_t) + 0.5 * F.cross_entropy(age, age_t)
    assert torch.allclose(loss(logits, labels), expected)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet", "test_vit", "mobilenetv3_small_050"])
def test_multi_head_model_works_on_any_timm_backbone(backbone):
    model = MultiHeadModel(timm.create_model(backbone, pretrained=False, num_classes=0)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 48))
    assert logits.shape == (2, 8)
    assert model.pretrained_cfg["mean"] == timm.create_model(backbone, pretrained=False).pretrained_cfg["mean"]


def test_multi_heads_and_relabel_need_the_mask_dataset():
    with pytest.raises(SpecError, match="heads: multi needs the mask dataset"):
        load_spec({"heads": "multi", "dataset": "image_folder"})
    with pytest.raises(SpecError, match="relabel corrects mask-dataset profiles"):
        load_spec({"relabel": "default", "dataset": "image_folder"})


def test_loss_options_default_to_the_seeds_values():
    assert LossOptions().focal_gamma == load_spec({}).focal_gamma == 2.0
    assert LossOptions().label_smoothing == load_spec({}).label_smoothing == 0.1

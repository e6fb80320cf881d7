"""The spec: the seed's defaults, bounded fields, a stable hash, names a user can read."""

from __future__ import annotations

from datetime import datetime

import pytest

from contracts.spec import ExperimentSpec, SpecError, load_spec, timm_model_names


def test_defaults_are_the_seed_pipelines():
    spec = ExperimentSpec()
    assert (spec.model, spec.optimizer, spec.lr, spec.batch_size) == ("efficientnet_b2", "adam", 1e-3, 64)
    assert (spec.scheduler, spec.lr_decay_step, spec.lr_gamma) == ("step", 20, 0.5)
    assert spec.resize == (260, 260)
    assert (spec.val_ratio, spec.seed, spec.augmentation, spec.pretrained) == (0.2, 42, "imgaug", True)


def test_seed_names_are_accepted_and_normalised():
    spec = load_spec(
        {"optimizer": "AdamW", "augmentation": "ImgaugAugmentation", "dataset": "MaskSplitByProfileDataset"}
    )
    assert (spec.optimizer, spec.augmentation, spec.dataset) == ("adamw", "imgaug", "mask")
    assert load_spec({"loss": "CE"}).loss == "cross_entropy"


@pytest.mark.parametrize(
    "size, expected", [("128x96", (128, 96)), ("260", (260, 260)), (64, (64, 64)), ([32, 48], (32, 48))]
)
def test_resize_accepts_the_usual_spellings(size, expected):
    assert load_spec({"resize": size}).resize == expected


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"model": "efficientnet_b9"}, "model", "did you mean"),
        ({"loss": "hinge"}, "loss", "cross_entropy, focal, label_smoothing, f1"),
        ({"lr": -0.1}, "lr", "greater than 0"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"epochs": 10_000}, "epochs", "less than or equal to 1000"),
        ({"val_ratio": 1.5}, "val_ratio", "less than 1"),
        ({"resize": "big"}, "resize", "HEIGHTxWIDTH"),
        ({"lrr": 0.1}, "lrr", "did you mean lr"),
        ({"queue": "my queue!"}, "queue", "pattern"),
        ({"wandb": {"project": "p", "api_key": "x"}}, "wandb", "secret"),
    ],
)
def test_invalid_fields_name_the_field_and_the_fix(bad, field, words):
    with pytest.raises(SpecError) as raised:
        load_spec(bad)
    message = str(raised.value)
    assert message.startswith(field) or field in message
    assert words in message


def test_a_secret_looking_field_is_refused_at_top_level():
    with pytest.raises(SpecError, match="wandb_api_key: looks like a secret") as raised:
        load_spec({"wandb_api_key": "abc"})
    assert "abc" not in str(raised.value)


def test_hash_is_stable_and_ignores_where_a_run_goes():
    spec = load_spec({"model": "resnet50", "lr": 3e-4})
    moved = load_spec({"model": "resnet50", "lr": 3e-4, "queue": "a100", "priority": "high", "run_name": "x"})
    assert spec.spec_hash() == moved.spec_hash()
    assert spec.spec_hash() == load_spec(spec.to_payload()).spec_hash()
    assert spec.spec_hash() != load_spec({"model": "resnet50", "lr": 1e-4}).spec_hash()
    assert len(spec.spec_hash()) == 12


def test_default_run_name_follows_the_seed_format():
    spec = load_spec({"model": "efficientnet_b2", "optimizer": "Adam", "loss": "f1", "epochs": 30})
    name = spec.default_run_name(when=datetime(2026, 11, 27, 9, 5), user="jin")
    assert name == "2611270905_jin_efficientnet_b2_adam_f1_64_imgaug_30"


def test_payload_round_trips_through_json():
    spec = load_spec({"resize": "128x96", "wandb": {"tags": "a,b"}})
    assert load_spec(spec.to_payload()) == spec
    assert spec.wandb.tags == ["a", "b"]


def test_shipped_timm_names_match_the_installed_timm():
    timm = pytest.importorskip("timm")
    assert timm_model_names() == frozenset(timm.list_models()), (
        "contracts/timm_models.txt is stale: run `python -m trainer.models --write-names`"
    )

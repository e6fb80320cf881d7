"""Each augmentation, loss and head type trains a tiny timm model on the demo data; the options work.

Trainings are one or two epochs of test_efficientnet at 32x32 on 252 demo images (about a second
each); W&B is off except where the test reads what was logged.
"""

from __future__ import annotations

import csv
import math
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from contracts.spec import load_spec
from tests.helpers import make_image_folder, tiny_spec
from tests.wandb_records import find_run_file, read_records
from trainer.data import decode_label
from trainer.heads import MultiHeadModel
from trainer.losses import F1Loss, FocalLoss, WeightedSum
from trainer.train import Trainer, train


@pytest.fixture(autouse=True)
def quiet_env(tmp_path, monkeypatch):
    """Runs under this test's tmp dir, W&B off unless a test turns it back on; one torch thread,
    since tiny models on a shared 2-core box train many times slower with two."""
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick_spec(demo_data: Path, **overrides):
    """tiny_spec without the pictures (a few seconds of matplotlib), which one test checks on its own."""
    return load_spec(tiny_spec(demo_data, **({"pictures": False} | overrides)))


def make_trainer(demo_data: Path, **overrides) -> Trainer:
    return Trainer(quick_spec(demo_data, **overrides))


def metric_rows(run_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(run_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


RECIPES = {
    "base-cross_entropy-single": {"augmentation": "base", "loss": "cross_entropy"},
    "custom-focal-multi": {"augmentation": "custom", "loss": "focal", "heads": "multi"},
    "imgaug-label_smoothing-single": {"augmentation": "imgaug", "loss": "label_smoothing"},
    "base-f1-multi": {"loss": "f1", "heads": "multi", "head_weights": {"mask": 1, "gender": 1, "age": 2}},
    "imgaug-0.6focal+0.4f1-class_weights": {
        "augmentation": "imgaug",
        "loss": "0.6*focal+0.4*f1",
        "class_weights": "inverse_frequency",
    },
    "base-mixup-cutmix-multi": {"mixup": 0.4, "cutmix": 1.0, "heads": "multi"},
}
AUGMENTATION_OPS = {"base": [], "custom": ["ColorJitter", "RandomGaussianNoise"], "imgaug": ["RandomRotateFlip"]}
LOSS_TYPES = {
    "cross_entropy": torch.nn.CrossEntropyLoss,
    "label_smoothing": torch.nn.CrossEntropyLoss,
    "focal": FocalLoss,
    "f1": F1Loss,
}


@pytest.mark.parametrize("overrides", RECIPES.values(), ids=RECIPES.keys())
def test_each_augmentation_loss_and_head_type_trains_one_epoch(demo_data, overrides):
    trainer = make_trainer(demo_data, **overrides)
    spec = trainer.spec
    ops = [type(op).__name__ for op in trainer.train_loader.collate_fn.recipe.ops]
    assert ops[: len(AUGMENTATION_OPS[spec.augmentation])] == AUGMENTATION_OPS[spec.augmentation]
    multi = spec.heads == "multi"
    assert isinstance(trainer.model, MultiHeadModel) == multi
    losses = list(trainer.loss_fn.losses) if multi else [trainer.loss_fn]
    for loss in losses:
        if "+" in spec.loss:
            assert isinstance(loss, WeightedSum) and [type(part) for part in loss.losses] == [FocalLoss, F1Loss]
        else:
            assert isinstance(loss, LOSS_TYPES[spec.loss])
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}

    result = trainer.fit()

    assert result["epochs_completed"] == 1
    [row] = metric_rows(result["run_dir"])
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))
    assert 0.0 <= result["best"]["val_f1"] <= 1.0
    saved = torch.load(Path(result["run_dir"]) / "checkpoints" / "best.pt", weights_only=True)
    assert any(not torch.equal(before[name], saved["model"][name]) for name in before), "no weight was trained"
    assert ("heads.age.weight" in saved["model"]) == multi
    assert saved["num_classes"] == 18 and len(saved["class_counts"]) == 18


def test_ema_clipping_warmup_cosine_balanced_sampler_and_center_crop_train_together(demo_data):
    trainer = make_trainer(
        demo_data,
        epochs=4,
        scheduler="cosine",
        warmup_epochs=2,
        ema_decay=0.9,
        grad_clip=1.0,
        balanced_sampler=True,
        center_crop="56x40",
        augmentation="imgaug",
    )
    assert isinstance(trainer.train_loader.sampler, WeightedRandomSampler)
    result = trainer.fit()
    rows = metric_rows(result["run_dir"])
    lrs = [float(row["lr"]) for row in rows]
    assert lrs == pytest.approx([1e-3, 2e-3, 3e-3, 1.5e-3])  # linear warmup to lr 3e-3, then cosine
    saved = torch.load(Path(result["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    assert saved["steps"] > 0
    assert any(not torch.equal(saved["ema"][key], saved["model"][key]) for key in saved["model"])
    assert trainer.val_loader.dataset.prefix.crop_pixels == (56, 40)


def test_balanced_sampler_draws_every_class_about_equally(demo_data):
    trainer = make_trainer(demo_data, balanced_sampler=True)
    samples = trainer.train_loader.dataset.samples
    drawn = [samples[index].label for _ in range(10) for index in trainer.train_loader.sampler]
    natural_wear = sum(decode_label(sample.label)[0] == 0 for sample in samples) / len(samples)
    drawn_wear = sum(decode_label(label)[0] == 0 for label in drawn) / len(drawn)
    assert natural_wear == pytest.approx(5 / 7)  # five of seven photos wear a mask
    assert drawn_wear == pytest.approx(1 / 3, abs=0.05)  # six of the 18 classes
    assert len(Counter(drawn)) == 18


def test_gradient_clipping_bounds_the_gradient_norm(demo_data):
    trainer = make_trainer(demo_data, grad_clip=0.01)
    images, labels = next(iter(trainer.train_loader))
    trainer.loss_fn(trainer.model(images), labels).backward()
    trainer._clip_gradients()
    norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters() if p.grad is not None])
    assert float(norm) == pytest.approx(0.01, rel=1e-3)


def test_same_spec_gives_the_same_metrics(demo_data):
    spec = {"epochs": 2, "augmentation": "imgaug", "mixup": 0.4, "cutmix": 1.0, "deterministic": True}
    first = train(quick_spec(demo_data, run_name="first", **spec))
    second = train(quick_spec(demo_data, run_name="second", **spec))
    drop_time = [{k: v for k, v in row.items() if k != "seconds"} for row in metric_rows(first["run_dir"])]
    assert drop_time == [{k: v for k, v in row.items() if k != "seconds"} for row in metric_rows(second["run_dir"])]
    other_seed = train(quick_spec(demo_data, run_name="third", seed=7, **spec))
    assert metric_rows(other_seed["run_dir"])[0]["train_loss"] != metric_rows(first["run_dir"])[0]["train_loss"]


def test_early_stopping_ends_the_run_when_val_f1_stops_improving(demo_data):
    # lr 1e-9 on a model without batch norm: the weights, and so the val F1, do not move after epoch 1
    result = train(load_spec(tiny_spec(demo_data, model="test_vit", lr=1e-9, epochs=6, early_stopping_patience=2)))
    assert result["epochs_completed"] == 3 and result["best"]["epoch"] == 1
    assert result["stopped_early"] is True and result["stop_reason"] == "early_stopping"
    assert "early stopping" in (Path(result["run_dir"]) / "train.log").read_text()


def logged_history(run_file: Path, until: tuple[str, ...], wait_s: float = 30.0) -> dict[tuple[str, ...], str]:
    """{(key, sub key): json} of every history row of an offline W&B run.

    wandb-core writes the transaction log from its own process and may still be flushing it
    when finish() returns, so the file is read again until the key `until` is in it (or wait_s passes).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = read_records(run_file)
        except Exception:  # a record half written
            records = []
        logged = {}
        for record in records:
            if record.WhichOneof("record_type") == "history":
                logged |= {tuple(item.nested_key) or (item.key,): item.value_json for item in record.history.item}
        if until in logged or time.monotonic() > deadline:
            return logged
        time.sleep(0.2)


def test_run_saves_the_pictures_and_logs_them_to_wandb(demo_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = train(load_spec(tiny_spec(demo_data, epochs=2, heads="multi")))
    pictures = result["pictures"]
    assert set(pictures) == {"confusion_matrix", "per_class_f1", "val_predictions"}
    for path in pictures.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(path).parent.name == "pictures"
    logged = logged_history(find_run_file(result["run_dir"]), until=("pictures/val_predictions", "_type"))
    for name in pictures:
        assert logged[(f"pictures/{name}", "_type")] == '"image-file"'
        assert logged[(f"pictures/{name}", "path")].startswith('"media/images/pictures/')
    media = list(Path(result["run_dir"]).glob("wandb/offline-run-*/files/media/images/pictures/*.png"))
    assert len(media) == 3


def test_image_folder_with_three_classes_trains(tmp_path, demo_data):
    folders = make_image_folder(demo_data, tmp_path / "folders")  # one folder per mask state
    trainer = Trainer(load_spec(tiny_spec(demo_data) | {"dataset": "ImageFolder", "data_dir": str(folders)}))
    assert trainer.num_classes == 3 and trainer.class_names == ["incorrect", "not_wear", "wear"]
    result = trainer.fit()
    assert result["epochs_completed"] == 1 and result["images"]["train"] + result["images"]["val"] == 3 * 36
    assert Path(result["pictures"]["confusion_matrix"]).is_file()

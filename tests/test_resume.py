"""Checkpoints that resume exactly: a run stopped after any epoch ends where an uninterrupted one does."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from contracts.spec import load_spec
from tests.helpers import tiny_spec
from trainer.checkpoint import checkpoint_path, load_checkpoint
from trainer.interrupt import SHUTDOWN, TrainingInterrupted
from trainer.train import Trainer, train

EPOCHS = 2


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path / "runs"


def stop_in_epoch(epoch: int):
    """A should_stop that asks to shut down a few steps into `epoch` (the trainer asks once at its
    set-up's end, once per epoch start and once per optimizer step: 6 steps of 32 images per epoch
    of the demo data)."""
    calls = {"count": 0}
    steps_per_epoch = 6

    def should_stop(**_where):
        calls["count"] += 1
        return SHUTDOWN if calls["count"] == 1 + (epoch - 1) * (steps_per_epoch + 1) + 3 else None

    return should_stop


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


RECIPES = {
    "plain": {},
    # Everything with state or randomness of its own: EMA weights and steps, a warmup schedule,
    # mixup/cutmix draws, two heads.
    "ema-warmup-mixing-heads": {
        "ema_decay": 0.9,
        "warmup_epochs": 1,
        "scheduler": "cosine",
        "mixup": 0.4,
        "cutmix": 0.4,
        "heads": "multi",
    },
    # Random augmentation run in a DataLoader worker process, with the image cache.
    "imgaug-in-a-loader-worker": {"augmentation": "imgaug", "num_workers": 1},
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_run_stopped_mid_epoch_and_resumed_matches_an_uninterrupted_run_exactly(runs, demo_data, recipe):
    extra = RECIPES[recipe]
    train(load_spec(tiny_spec(demo_data, epochs=EPOCHS, run_name="straight", **extra)))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(load_spec(tiny_spec(demo_data, epochs=EPOCHS, run_name="stopped", **extra)), should_stop=stop_in_epoch(2))
    assert stopped.value.reason == SHUTDOWN and stopped.value.epoch == 1  # epoch 2 was cut short
    assert [int(row["epoch"]) for row in metrics(runs / "stopped")] == [1]

    resumes = []
    result = train(
        load_spec(tiny_spec(demo_data, epochs=EPOCHS, run_name="stopped", **extra)),
        resume=True,
        on_resume=resumes.append,
    )

    [info] = resumes
    assert info.start_epoch == 1 and [report.epoch for report in info.history] == [1]
    assert result["resumed_from_epoch"] == 1 and result["epochs_completed"] == EPOCHS
    straight = load_checkpoint(checkpoint_path(runs / "straight"))
    resumed = load_checkpoint(checkpoint_path(runs / "stopped"))
    for part in ("model", "ema") if "ema_decay" in extra else ("model",):
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name}"  # same data, draws and weights
    straight_rows, resumed_rows = metrics(runs / "straight"), metrics(runs / "stopped")
    assert [row["epoch"] for row in resumed_rows] == ["1", "2"]
    assert [row["val_f1"] for row in resumed_rows] == [row["val_f1"] for row in straight_rows]


def test_a_checkpoint_holds_every_state_a_resume_needs_and_loads_as_data_only(runs, demo_data):
    train(load_spec(tiny_spec(demo_data, epochs=1, run_name="one")))
    state = torch.load(checkpoint_path(runs / "one"), weights_only=True)  # no pickled code accepted
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best", "rng", "history", "spec"} <= set(state)
    assert {"python", "numpy", "torch", "loader"} <= set(state["rng"])
    assert state["epoch"] == 1 and state["history"][0]["epoch"] == 1
    assert state["optimizer"]["state"], "the optimizer's moments are saved, not just its settings"


def test_ema_weights_and_their_step_count_are_restored_when_the_spec_asks_for_ema(runs, demo_data):
    spec = load_spec(tiny_spec(demo_data, epochs=1, ema_decay=0.9, run_name="ema"))
    trainer = Trainer(spec)
    trainer.fit()
    again = Trainer(spec)
    again.resume()
    assert again.progress.steps == trainer.progress.steps > 0  # the EMA's decay warm-up continues where it was
    for name, tensor in trainer.ema.module.state_dict().items():
        assert torch.equal(tensor, again.ema.module.state_dict()[name]), name
    assert not torch.equal(next(iter(again.ema.module.parameters())), next(iter(again.model.parameters())))


def test_without_a_checkpoint_a_resumed_run_starts_from_epoch_zero(runs, demo_data):
    trainer = Trainer(load_spec(tiny_spec(demo_data, run_name="fresh")))
    info = trainer.resume()
    assert (info.start_epoch, info.history, info.checkpoint) == (0, [], None)
    assert trainer.progress.start_epoch == 0 and trainer.progress.best["epoch"] == 0


def test_gradient_accumulation_steps_the_optimizer_once_per_group_of_batches(runs, demo_data):
    trainer = Trainer(load_spec(tiny_spec(demo_data, batch_size=16, grad_accum_steps=3, run_name="accumulate")))
    steps = []
    trainer.should_stop = lambda **_where: steps.append(1)  # asked after every optimizer step
    trainer.train_one_epoch()
    batches = len(trainer.train_loader)  # 210 images / 16 = 13 batches
    assert len(steps) == batches // 3  # the short trailing group is skipped, as drop_last does


def test_a_stop_asked_before_the_first_epoch_trains_nothing_and_keeps_no_checkpoint(runs, demo_data):
    trainer = Trainer(load_spec(tiny_spec(demo_data, run_name="before-epoch")))
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit(should_stop=lambda **_where: SHUTDOWN)  # the epoch boundary asks before any batch
    assert (stopped.value.reason, stopped.value.epoch) == (SHUTDOWN, 0)
    assert trainer.progress.steps == 0 and trainer.progress.history == []
    assert not checkpoint_path(runs / "before-epoch").exists()
    assert metrics(runs / "before-epoch") == []  # the header only

"""Decode once: cached and uncached pipelines give the same tensors; the disk cache is keyed and shared.

Real files, real DataLoader worker processes, two real processes racing for the disk cache.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from contracts.spec import load_spec
from tests.helpers import tiny_spec, wait_for
from trainer import image_cache
from trainer.augment import Prefix
from trainer.image_cache import ImageStore, open_disk_store, open_store
from trainer.loaders import build_loaders, load_samples

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PREFIX = Prefix((32, 24))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def epochs_of_batches(demo_data, epochs: int = 2, **overrides):
    """Every training and validation batch of `epochs` epochs, the same seed each time."""
    spec = load_spec(tiny_spec(demo_data, resize="32x24", num_workers=0) | overrides)
    samples, _ = load_samples(spec)
    train_loader, val_loader = build_loaders(spec, samples, MEAN, STD, torch.device("cpu"))
    torch.manual_seed(0)
    batches = []
    for _ in range(epochs):
        batches += [images for images, _ in train_loader] + [images for images, _ in val_loader]
    return batches, train_loader


@pytest.mark.parametrize("augmentation", ["base", "imgaug"])
def test_cached_and_uncached_pipelines_give_identical_tensors_for_the_same_seed(demo_data, augmentation):
    uncached, _ = epochs_of_batches(demo_data, augmentation=augmentation, image_cache="none")
    for mode in ("memory", "disk"):
        cached, loader = epochs_of_batches(demo_data, augmentation=augmentation, image_cache=mode)
        store = loader.dataset.store
        assert store is not None and bool(store.filled.all() if mode == "disk" else store.filled.any())
        assert len(cached) == len(uncached)
        for first, second in zip(uncached, cached, strict=True):
            assert torch.equal(first, second), mode


def test_the_memory_cache_is_filled_once_and_later_epochs_never_decode(demo_data, monkeypatch):
    decoded = []
    original = image_cache.decode
    monkeypatch.setattr(image_cache, "decode", lambda path: decoded.append(path) or original(path))
    spec = load_spec(tiny_spec(demo_data, resize="32x24", num_workers=0))
    samples, _ = load_samples(spec)
    train_loader, val_loader = build_loaders(spec, samples, MEAN, STD, torch.device("cpu"))
    assert train_loader.dataset.store is val_loader.dataset.store  # one store: train and val share the prefix
    for _ in range(3):
        list(train_loader), list(val_loader)
    assert sorted(decoded) == sorted(sample.path for sample in samples)  # each image once, in epoch 1


def test_loader_workers_fill_the_memory_cache_the_training_process_sees(demo_data, monkeypatch):
    decoded_here = []
    original = image_cache.decode
    monkeypatch.setattr(image_cache, "decode", lambda path: decoded_here.append(path) or original(path))
    spec = load_spec(tiny_spec(demo_data, resize="32x24", num_workers=1))
    samples, _ = load_samples(spec)
    train_loader, _ = build_loaders(spec, samples, MEAN, STD, torch.device("cpu"))
    store = train_loader.dataset.store
    # Filled before training, in a forked worker: its pages are the ones this process reads.
    assert bool(store.filled.all()) and decoded_here == []
    some = len(store.paths) // 2
    assert torch.equal(store.images[some], train_loader.dataset.prefix(original(store.paths[some])))


def test_a_memory_cache_larger_than_the_budget_falls_back_to_decoding_with_a_warning(demo_data, caplog):
    paths = [str(path) for path in sorted((demo_data / "train" / "images").rglob("*.jpg"))]
    with caplog.at_level(logging.WARNING, logger="runyard.trainer"):
        assert open_store("memory", paths, PREFIX, {}, Path("unused"), workers=0, memory_budget=1000) is None
    assert "image_cache: disk" in caplog.text
    assert isinstance(open_store("memory", paths, PREFIX, {}, Path("unused"), 0, memory_budget=10**9), ImageStore)


def test_the_disk_cache_is_rebuilt_when_the_relabel_file_the_size_or_an_image_changes(demo_data, tmp_path):
    spec = tiny_spec(demo_data, image_cache="disk", resize="32x24", num_workers=0)
    relabel = tmp_path / "fixes.csv"
    relabel.write_text("id,gender,age,swap,reason\n")
    root = tmp_path / "home" / "cache" / "images"

    def open_cache(**overrides) -> Path:
        trainer_spec = load_spec(spec | overrides)
        samples, _ = load_samples(trainer_spec)
        train_loader, _ = build_loaders(trainer_spec, samples, MEAN, STD, torch.device("cpu"))
        return train_loader.dataset.store.file.parent

    def built() -> dict[Path, float]:
        return {path.parent: json.loads(path.read_text())["built_at"] for path in root.glob("*/manifest.json")}

    first = open_cache(relabel=str(relabel))
    assert open_cache(relabel=str(relabel)) == first and len(built()) == 1  # reused, not rebuilt

    relabel.write_text("id,gender,age,swap,reason\n000001,female,,,a fix\n")
    after_relabel = open_cache(relabel=str(relabel))
    after_resize = open_cache(relabel=str(relabel), resize="24x24")
    image = Path(load_samples(load_spec(spec))[0][0].path)
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))  # a replaced photo
    after_touch = open_cache(relabel=str(relabel), resize="24x24")
    assert len({first, after_relabel, after_resize, after_touch}) == 4 and len(built()) == 4
    manifest = json.loads((after_resize / "manifest.json").read_text())
    assert manifest["shape"] == [3, 24, 24] and manifest["images"] == len(load_samples(load_spec(spec))[0])
    assert not list(root.glob("*/*.tmp"))


RACER = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from trainer.augment import Prefix
    from trainer.image_cache import open_disk_store
    paths = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).touch()  # ready
    while not Path(sys.argv[3]).exists():
        time.sleep(0.005)
    store, built = open_disk_store(paths, Prefix((96, 72)), {{"data_dir": "demo"}}, Path(sys.argv[4]), workers=0)
    print(json.dumps({{"built": built, "file": str(store.file), "sum": int(store.images.sum()),
                      "filled": bool(store.filled.all())}}))
    """
)


def test_two_processes_asking_at_once_share_one_disk_cache_built_once(demo_data, tmp_path):
    paths = [str(path) for path in sorted((demo_data / "train" / "images").rglob("*.jpg"))]
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    script = tmp_path / "racer.py"
    script.write_text(RACER.format(root=str(ROOT)))
    go, root = tmp_path / "go", tmp_path / "cache"
    racers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(tmp_path / "paths.json"),
                str(tmp_path / f"ready{index}"),
                str(go),
                str(root),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    wait_for(lambda: all((tmp_path / f"ready{index}").exists() for index in range(2)), 120, "both racers ready")
    go.touch()
    outputs = [racer.communicate(timeout=120) for racer in racers]
    results = [json.loads(stdout) for stdout, _ in outputs]
    assert sorted(result["built"] for result in results) == [False, True]  # one built, the other waited
    assert results[0]["file"] == results[1]["file"] and results[0]["sum"] == results[1]["sum"] > 0
    assert all(result["filled"] for result in results)
    logs = "".join(stderr for _, stderr in outputs)
    assert logs.count("decoding 252 images") == 1
    assert [path.name for path in Path(results[0]["file"]).parent.iterdir() if path.suffix == ".tmp"] == []


def test_a_store_pickled_for_a_spawned_process_maps_the_disk_file_or_starts_an_empty_memory_copy(demo_data, tmp_path):
    import pickle

    paths = [str(path) for path in sorted((demo_data / "train" / "images").rglob("*.jpg"))][:5]
    disk, _ = open_disk_store(paths, PREFIX, {}, tmp_path / "cache", workers=0)
    again = pickle.loads(pickle.dumps(disk))
    assert again.file == disk.file and torch.equal(again.images, disk.images)
    memory = ImageStore.in_memory(paths, PREFIX)
    memory.load(0)
    copy = pickle.loads(pickle.dumps(memory))
    assert copy.file is None and not bool(copy.filled.any())

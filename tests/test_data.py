"""Demo data in the competition's layout, labels, and a split that never leaks a person."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from trainer.data import (
    NUM_CLASSES,
    DataError,
    age_class,
    decode_label,
    mask_label,
    scan_mask_dataset,
    split_by_profile,
)
from trainer.demo_data import make_demo_dataset


def test_demo_data_has_the_competition_layout(demo_data):
    profiles = sorted((demo_data / "train" / "images").iterdir())
    assert len(profiles) == 36
    first = profiles[0]
    identifier, gender, race, age = first.name.split("_")
    assert len(identifier) == 6 and gender in ("male", "female") and age.isdigit() and race
    assert sorted(path.name for path in first.iterdir()) == sorted(
        [f"mask{index}.jpg" for index in range(1, 6)] + ["incorrect_mask.jpg", "normal.jpg"]
    )
    with open(demo_data / "train" / "train.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 36 and rows[0]["path"] == profiles[0].name
    with open(demo_data / "eval" / "info.csv") as handle:
        info = list(csv.DictReader(handle))
    assert info and set(info[0]) == {"ImageID", "ans"}
    assert all((demo_data / "eval" / "images" / row["ImageID"]).exists() for row in info)


def test_demo_loader_yields_all_18_classes(demo_data):
    samples = scan_mask_dataset(demo_data / "train")
    counts = Counter(sample.label for sample in samples)
    assert sorted(counts) == list(range(NUM_CLASSES))
    # Each profile has 5 worn-mask photos, one incorrect, one without.
    assert sum(counts[label] for label in range(6)) == 5 * 36


def test_profile_split_never_puts_one_person_on_both_sides(demo_data):
    samples = scan_mask_dataset(demo_data / "train")
    for seed in range(5):
        train, val = split_by_profile(samples, 0.2, seed)
        assert {sample.profile for sample in train}.isdisjoint({sample.profile for sample in val})
        assert len(train) + len(val) == len(samples)
        # every gender x age group is on both sides
        assert {sample.label % 6 for sample in val} == set(range(6))
        assert {sample.label % 6 for sample in train} == set(range(6))


def test_split_is_deterministic_per_seed(demo_data):
    samples = scan_mask_dataset(demo_data / "train")
    assert split_by_profile(samples, 0.2, 7) == split_by_profile(samples, 0.2, 7)
    assert split_by_profile(samples, 0.2, 7)[1] != split_by_profile(samples, 0.2, 8)[1]


def test_labels_follow_mask_gender_age():
    assert mask_label(0, 0, 0) == 0 and mask_label(2, 1, 2) == 17 and mask_label(1, 1, 0) == 9
    assert all(mask_label(*decode_label(label)) == label for label in range(18))
    assert [age_class(age) for age in (18, 29, 30, 59, 60)] == [0, 0, 1, 1, 2]
    assert age_class(58, threshold=58) == 2


def test_demo_data_is_deterministic(tmp_path):
    make_demo_dataset(tmp_path / "a", profiles=6, eval_profiles=1, image_size=(48, 36), seed=3)
    make_demo_dataset(tmp_path / "b", profiles=6, eval_profiles=1, image_size=(48, 36), seed=3)
    files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*.jpg"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_missing_or_misnamed_data_gets_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="make-demo-data"):
        scan_mask_dataset(tmp_path)
    (tmp_path / "images" / "not-a-profile").mkdir(parents=True)
    with pytest.raises(DataError, match="<id>_<gender>_<race>_<age>"):
        scan_mask_dataset(tmp_path)


def test_profile_folders_with_dashes_keep_their_id(tmp_path):
    folder: Path = tmp_path / "images" / "001498-1_female_Asian_23"
    folder.mkdir(parents=True)
    (folder / "normal.jpg").write_bytes(b"")
    [sample] = scan_mask_dataset(tmp_path)
    assert sample.profile == "001498-1" and decode_label(sample.label) == (2, 1, 0)

"""Stratified k-fold grouped by profile: no person in two folds, every group in every fold."""

from __future__ import annotations

from collections import Counter

import pytest

from contracts.spec import SpecError, load_spec
from trainer.data import DataError, profile_group, scan_image_folder, scan_mask_dataset
from trainer.folds import fold_assignments, kfold_split
from trainer.loaders import split_samples


@pytest.fixture(scope="module")
def samples(demo_data):
    return scan_mask_dataset(demo_data / "train")


@pytest.mark.parametrize("k", [2, 3, 5])
def test_group_kfold_never_puts_one_person_in_two_folds(samples, k):
    folds = fold_assignments(samples, k, seed=42)
    val_profiles = []
    for fold in range(k):
        train, val = kfold_split(samples, k, fold, seed=42)
        train_people, val_people = {s.profile for s in train}, {s.profile for s in val}
        assert train_people.isdisjoint(val_people)
        assert len(train) + len(val) == len(samples)
        assert {folds[person] for person in val_people} == {fold}
        val_profiles.extend(val_people)
    # every person is validated exactly once across the folds
    assert Counter(val_profiles) == Counter({s.profile for s in samples})


def test_folds_are_stratified_and_balanced(samples):
    k = 3  # 36 profiles = 6 per gender x age group, 2 per group per fold
    for fold in range(k):
        _, val = kfold_split(samples, k, fold, seed=7)
        groups = Counter(profile_group(s) for s in {s.profile: s for s in val}.values())
        assert groups == Counter({group: 2 for group in range(6)})
    sizes = Counter(fold_assignments(samples, 5, seed=7).values())
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_fold_assignment_depends_only_on_the_seed(samples):
    assert fold_assignments(samples, 5, seed=1) == fold_assignments(list(reversed(samples)), 5, seed=1)
    assert fold_assignments(samples, 5, seed=1) != fold_assignments(samples, 5, seed=2)


def test_spec_kfold_picks_the_fold_as_validation(demo_data, samples):
    spec = load_spec({"data_dir": str(demo_data / "train"), "kfold": {"k": 4, "fold": 2}})
    train, val = split_samples(spec, samples)
    assert (train, val) == kfold_split(samples, 4, 2, spec.seed)
    _, plain_val = split_samples(load_spec({"data_dir": str(demo_data / "train")}), samples)
    assert plain_val != val


def test_kfold_on_an_image_folder_stratifies_by_class(tmp_path, demo_data):
    for index, photo in enumerate(sorted((demo_data / "train" / "images").glob("*/normal.jpg"))[:12]):
        target = tmp_path / f"class{index % 3}" / f"{index}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(photo.read_bytes())
    images, _ = scan_image_folder(tmp_path)
    spec = load_spec({"dataset": "image_folder", "data_dir": str(tmp_path), "kfold": {"k": 2, "fold": 0}})
    _, val = split_samples(spec, images)
    assert Counter(sample.label for sample in val) == Counter({0: 2, 1: 2, 2: 2})


def test_more_folds_than_people_and_missing_folds_are_refused(samples):
    with pytest.raises(DataError, match=r"kfold\.k=20 needs at least 20 profiles; the dataset has 10"):
        fold_assignments(samples[:70], 20, seed=0)  # 10 people
    with pytest.raises(SpecError, match="fold 5 does not exist with k=5"):
        load_spec({"kfold": {"k": 5, "fold": 5}})


def test_the_seeds_mask_base_dataset_name_gets_the_profile_split(demo_data, samples):
    # The seed's MaskBaseDataset split by image; here the name maps to the mask layout split by profile.
    spec = load_spec({"data_dir": str(demo_data / "train"), "dataset": "MaskBaseDataset"})
    assert spec.dataset == "mask"
    train, val = split_samples(spec, samples)
    assert {s.profile for s in train}.isdisjoint({s.profile for s in val})

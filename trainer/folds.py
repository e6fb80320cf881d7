"""Stratified k-fold grouped by profile: every person sits in exactly one fold.

Profiles are grouped by stratum (gender x age for the mask layout, the class for image_folder),
shuffled with the spec's seed and dealt round-robin across the folds, continuing the deal from
one stratum to the next so fold sizes differ by at most one profile. Fold runs of one
cross-validation must share the seed: the seed decides which fold a profile lands in.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from trainer.data import DataError, Sample, profile_group, profiles_by_stratum


def fold_assignments(
    samples: Sequence[Sample], k: int, seed: int, stratify_by: Callable[[Sample], int] = profile_group
) -> dict[str, int]:
    """Profile -> fold index in 0..k-1."""
    strata = profiles_by_stratum(samples, stratify_by)
    profiles_seen = sum(len(profiles) for profiles in strata.values())
    if profiles_seen < k:
        raise DataError(f"kfold.k={k} needs at least {k} profiles; the dataset has {profiles_seen}")
    rng = random.Random(seed)
    folds: dict[str, int] = {}
    position = 0
    for _, profiles in sorted(strata.items()):
        profiles = sorted(profiles)
        rng.shuffle(profiles)
        for profile in profiles:
            folds[profile] = position % k
            position += 1
    return folds


def kfold_split(
    samples: Sequence[Sample],
    k: int,
    fold: int,
    seed: int,
    stratify_by: Callable[[Sample], int] = profile_group,
) -> tuple[list[Sample], list[Sample]]:
    """(train, val) for fold `fold` of k: val is that fold's profiles, train all the others."""
    folds = fold_assignments(samples, k, seed, stratify_by)
    train = [sample for sample in samples if folds[sample.profile] != fold]
    val = [sample for sample in samples if folds[sample.profile] == fold]
    return train, val

"""Datasets: the mask-status layout (18 classes) and a generic ImageFolder, split by profile.

Mask layout (the competition's):
    <data_dir>/images/<id>_<gender>_<race>_<age>/{mask1..mask5,incorrect_mask,normal}.<ext>
Label = mask * 6 + gender * 3 + age_class with mask {wear 0, incorrect 1, not worn 2},
gender {male 0, female 1}, age_class {<30: 0, 30..threshold-1: 1, >=threshold: 2}.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.image_files import IMAGE_SUFFIXES

NUM_CLASSES = 18
MASK_STATES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDERS = {"male": 0, "female": 1}
MASK_NAMES = ("wear", "incorrect", "not wear")
GENDER_NAMES = ("male", "female")
AGE_NAMES = ("<30", "30-59", ">=60")


class DataError(ValueError):
    """The dataset is missing or malformed; the message names the path and what was expected."""

    def __init__(self, message: str = ""):
        super().__init__(_without_worker_traceback(message, type(self)))


class UnreadableImage(DataError):
    """An image file that cannot be decoded (truncated, empty, not an image); the message names it."""


def _without_worker_traceback(message: str, kind: type) -> str:
    # A DataLoader worker's exception reaches the training process rebuilt from one string:
    # "Caught X in DataLoader worker process N. Original Traceback ...: trainer.data.X: <message>".
    # The user needs the message, which names the file, not the worker's stack.
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    if message.startswith(f"Caught {kind.__name__} ") and marker in message:
        return message[message.rindex(marker) + len(marker) :].rstrip()
    return message


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    profile: str  # who is in the picture: a split never puts one profile on both sides


@dataclass(frozen=True)
class Correction:
    """What to change for one profile (read by trainer.relabel); None keeps the folder's value."""

    gender: str | None = None
    age: int | None = None
    swap: tuple[str, str] | None = None

    def mask_state(self, stem: str) -> int:
        """The mask state of the photo `stem` after the swap (if any)."""
        if self.swap and stem in self.swap:
            stem = self.swap[1] if stem == self.swap[0] else self.swap[0]
        return MASK_STATES[stem]


def age_class(age: int, threshold: int = 60) -> int:
    return 0 if age < 30 else (1 if age < threshold else 2)


def mask_label(mask: int, gender: int, age: int) -> int:
    """The 18-class label of a (mask state, gender, age class) triple."""
    return mask * 6 + gender * 3 + age


def decode_label(label: int) -> tuple[int, int, int]:
    """18-class label -> (mask state, gender, age class)."""
    return label // 6, (label // 3) % 2, label % 3


def class_name(label: int) -> str:
    mask, gender, age = decode_label(label)
    return f"{MASK_NAMES[mask]}/{GENDER_NAMES[gender]}/{AGE_NAMES[age]}"


def scan_mask_dataset(
    data_dir: str | Path, age_threshold: int = 60, corrections: Mapping[str, Correction] | None = None
) -> list[Sample]:
    """Every image of the mask layout with its label; raises DataError naming what is wrong.

    `corrections` (profile id -> Correction, see trainer.relabel) fix labels as they are read.
    """
    corrections = corrections or {}
    images_dir = Path(data_dir) / "images"
    if not images_dir.is_dir():
        raise DataError(
            f"{images_dir} is not a directory: a mask dataset needs images/<id>_<gender>_<race>_<age>/ folders "
            "(make one with `runyard make-demo-data DIR`, then use DIR/train)"
        )
    samples = []
    for profile_dir in sorted(images_dir.iterdir()):
        if not profile_dir.is_dir() or profile_dir.name.startswith("."):
            continue
        parts = profile_dir.name.split("_")
        if len(parts) != 4 or parts[1] not in GENDERS or not parts[3].isdigit():
            raise DataError(f"{profile_dir} is not named <id>_<gender>_<race>_<age> (e.g. 000001_female_Asian_45)")
        profile, gender, _race, age = parts
        correction = corrections.get(profile)
        if correction is not None:
            gender = correction.gender or gender
            age = str(correction.age or age)
        age_label = age_class(int(age), age_threshold)
        for image in sorted(profile_dir.iterdir()):
            if image.name.startswith(".") or image.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if image.stem not in MASK_STATES:
                continue
            mask_state = correction.mask_state(image.stem) if correction else MASK_STATES[image.stem]
            label = mask_label(mask_state, GENDERS[gender], age_label)
            samples.append(Sample(str(image), label, profile))
    if not samples:
        raise DataError(f"no images found under {images_dir}")
    return samples


def scan_image_folder(data_dir: str | Path) -> tuple[list[Sample], list[str]]:
    """One sub-folder per class (sorted names -> labels 0..n-1); each image is its own profile."""
    root = Path(data_dir)
    classes = image_folder_classes(root)
    samples = []
    for label, name in enumerate(classes):
        for image in sorted((root / name).rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES and not image.name.startswith("."):
                samples.append(Sample(str(image), label, str(image.relative_to(root))))
    if not samples:
        raise DataError(f"no images found under {root}")
    return samples, classes


def image_folder_classes(data_dir: str | Path) -> list[str]:
    """The class names of an image_folder dataset: its sub-folders, sorted (label = index)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory: an image_folder dataset needs one folder per class")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s); an image_folder dataset needs at least 2")
    return classes


def profile_group(sample: Sample) -> int:
    """gender x age of a mask-layout sample: the same for every image of one profile."""
    return sample.label % 6


def profiles_by_stratum(samples: Sequence[Sample], stratify_by: Callable[[Sample], int]) -> dict[int, list[str]]:
    """Stratum -> its profiles in first-seen order, each profile filed by its first image."""
    strata: dict[int, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for sample in samples:
        if sample.profile not in seen:
            seen.add(sample.profile)
            strata[stratify_by(sample)].append(sample.profile)
    return strata


def split_by_profile(
    samples: Sequence[Sample],
    val_ratio: float,
    seed: int,
    stratify_by: Callable[[Sample], int] = profile_group,
) -> tuple[list[Sample], list[Sample]]:
    """Hold out val_ratio of the profiles, stratified by `stratify_by` of each profile's first image.

    No profile appears on both sides, and every stratum (gender x age for the mask layout) is
    spread over both.
    """
    strata = profiles_by_stratum(samples, stratify_by)
    rng = random.Random(seed)
    val_profiles: set[str] = set()
    for _, profiles in sorted(strata.items()):
        profiles = sorted(profiles)
        rng.shuffle(profiles)
        count = round(len(profiles) * val_ratio)
        if count == 0 and len(profiles) > 1 and rng.random() < len(profiles) * val_ratio:
            count = 1
        val_profiles.update(profiles[:count])
    train = [sample for sample in samples if sample.profile not in val_profiles]
    val = [sample for sample in samples if sample.profile in val_profiles]
    if not train or not val:
        raise DataError(
            f"val_ratio {val_ratio} leaves {len(train)} train and {len(val)} validation images; "
            "use more profiles or a val_ratio between 0.1 and 0.5"
        )
    return train, val

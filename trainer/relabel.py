"""Label corrections for the mask dataset, applied while scanning: the images are never copied.

A corrections file is a CSV with a header `id,gender,age,swap,reason` and one row per profile:
    006359,male,,,labelled female; the person is male
    000020,,,incorrect_mask<->normal,the two photos are swapped
`gender` (male/female) and `age` (years) replace what the profile's folder name says; `swap`
exchanges the mask states of two of its photos (file stems, e.g. incorrect_mask<->normal).
Empty cells keep the folder's value. `reason` is for people and is not read.

`relabel: default` uses relabel_default.csv shipped with runyard: the corrections competition
teams reported publicly (three swapped incorrect/normal pairs, nine wrong genders).
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

from trainer.data import GENDERS, MASK_STATES, Correction, DataError

DEFAULT_FILE = "relabel_default.csv"
COLUMNS = ("id", "gender", "age", "swap")


def corrections_file(relabel: str) -> Path | None:
    """The CSV the spec's `relabel` names: None for `none`, the shipped file for `default`."""
    if relabel == "none":
        return None
    if relabel == "default":
        return Path(str(resources.files("trainer").joinpath(DEFAULT_FILE)))
    return Path(relabel).expanduser()


def load_corrections(relabel: str) -> dict[str, Correction]:
    """Profile id -> Correction for the spec's `relabel` (empty for `none`); DataError if the file is bad."""
    path = corrections_file(relabel)
    return {} if path is None else read_corrections(path)


def read_corrections(path: Path) -> dict[str, Correction]:
    """Parse a corrections CSV; every problem is a DataError naming the file, line and fix."""
    if not path.is_file():
        raise DataError(f"relabel file {path} does not exist; use relabel: default, none, or an existing .csv")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: the header needs the columns {','.join(COLUMNS)} (missing {', '.join(missing)})")
        corrections: dict[str, Correction] = {}
        for line, row in enumerate(reader, start=2):
            profile = (row["id"] or "").strip()
            if not profile:
                raise DataError(f"{path} line {line}: the id is empty")
            if profile in corrections:
                raise DataError(f"{path} line {line}: profile {profile} is listed twice; merge its rows")
            corrections[profile] = Correction(
                gender=_gender(path, line, row["gender"]),
                age=_age(path, line, row["age"]),
                swap=_swap(path, line, row["swap"]),
            )
    return corrections


def _gender(path: Path, line: int, text: str | None) -> str | None:
    text = (text or "").strip().lower()
    if text and text not in GENDERS:
        raise DataError(f"{path} line {line}: gender {text!r} is not one of {', '.join(GENDERS)}")
    return text or None


def _age(path: Path, line: int, text: str | None) -> int | None:
    text = (text or "").strip()
    if text and not (text.isdigit() and 0 < int(text) < 130):
        raise DataError(f"{path} line {line}: age {text!r} is not a whole number of years")
    return int(text) if text else None


def _swap(path: Path, line: int, text: str | None) -> tuple[str, str] | None:
    text = (text or "").strip()
    if not text:
        return None
    stems = tuple(stem.strip() for stem in text.split("<->"))
    if len(stems) != 2 or not all(stem in MASK_STATES for stem in stems) or stems[0] == stems[1]:
        raise DataError(
            f"{path} line {line}: swap {text!r} should name two photos like incorrect_mask<->normal "
            f"(photos: {', '.join(MASK_STATES)})"
        )
    return stems  # type: ignore[return-value]

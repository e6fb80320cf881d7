"""Label corrections: applied while scanning, changing exactly the listed labels, never the files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from contracts.spec import SpecError, load_spec
from trainer.data import MASK_STATES, DataError, decode_label, scan_mask_dataset
from trainer.loaders import load_samples
from trainer.relabel import corrections_file, load_corrections, read_corrections

# The profiles of the shipped corrections, as the competition's folders label them, plus bystanders.
FOLDERS = [
    "000020_female_Asian_45",
    "004418_male_Asian_25",
    "005227_female_Asian_61",
    *(f"{number:06d}_female_Asian_20" for number in range(6359, 6365)),
    "001498-1_male_Asian_33",
    "004432_male_Asian_52",
    "001720_male_Asian_24",
    "000021_female_Asian_45",  # neighbours of listed ids: untouched
    "006358_female_Asian_20",
    "006365_female_Asian_20",
    "001498_male_Asian_33",
]
SWAPPED = {"000020", "004418", "005227"}
TO_MALE = {f"{number:06d}" for number in range(6359, 6365)}
TO_FEMALE = {"001498-1", "004432", "001720"}


@pytest.fixture
def competition_like(tmp_path, demo_data) -> Path:
    """A dataset whose folder names are the listed profiles (photos copied from the demo data)."""
    photo = next((demo_data / "train" / "images").iterdir()) / "mask1.jpg"
    for folder in FOLDERS:
        for stem in MASK_STATES:
            target = tmp_path / "train" / "images" / folder / f"{stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(photo.read_bytes())
    return tmp_path / "train"


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_default_corrections_change_exactly_the_listed_labels(competition_like):
    before_files = tree_digest(competition_like)
    plain = {sample.path: sample.label for sample in scan_mask_dataset(competition_like)}
    fixed = {
        sample.path: sample.label for sample in scan_mask_dataset(competition_like, 60, load_corrections("default"))
    }
    assert plain.keys() == fixed.keys()

    changed = {path for path in plain if plain[path] != fixed[path]}
    expected = set()
    for path in plain:
        profile, stem = Path(path).parent.name.split("_")[0], Path(path).stem
        mask, gender, age = decode_label(plain[path])
        new_mask, new_gender, new_age = decode_label(fixed[path])
        assert new_age == age
        if profile in SWAPPED and stem in ("incorrect_mask", "normal"):
            expected.add(path)
            assert {mask, new_mask} == {MASK_STATES["incorrect_mask"], MASK_STATES["normal"]}
            assert new_gender == gender
        elif profile in TO_MALE:
            expected.add(path)
            assert (gender, new_gender, new_mask) == (1, 0, mask)
        elif profile in TO_FEMALE:
            expected.add(path)
            assert (gender, new_gender, new_mask) == (0, 1, mask)
    assert changed == expected
    assert len(changed) == 3 * 2 + 9 * 7  # two photos of each swap, all seven of each gender fix
    assert tree_digest(competition_like) == before_files  # nothing copied, moved or rewritten


def test_spec_relabel_turns_the_corrections_on_and_off(competition_like):
    off, _ = load_samples(load_spec({"data_dir": str(competition_like)}))
    on, _ = load_samples(load_spec({"data_dir": str(competition_like), "relabel": "default"}))
    assert sum(a.label != b.label for a, b in zip(off, on, strict=True)) == 69


def test_a_custom_corrections_file_can_fix_ages_too(competition_like, tmp_path):
    corrections = tmp_path / "mine.csv"
    corrections.write_text("id,gender,age,swap,reason\n000021,,65,,older than the folder says\n")
    samples = scan_mask_dataset(competition_like, 60, read_corrections(corrections))
    ages = {decode_label(sample.label)[2] for sample in samples if "000021_" in sample.path}
    assert ages == {2}
    spec = load_spec({"data_dir": str(competition_like), "relabel": str(corrections)})
    assert corrections_file(spec.relabel) == corrections


@pytest.mark.parametrize(
    "content, words",
    [
        ("id,gender\n1,male\n", "needs the columns id,gender,age,swap"),
        ("id,gender,age,swap\n000001,man,,\n", "line 2: gender 'man'"),
        ("id,gender,age,swap\n000001,,old,\n", "line 2: age 'old'"),
        ("id,gender,age,swap\n000001,,,normal<->mask9\n", "line 2: swap 'normal<->mask9'"),
        ("id,gender,age,swap\n000001,male,,\n000001,,30,\n", "line 3: profile 000001 is listed twice"),
        ("id,gender,age,swap\n,male,,\n", "line 2: the id is empty"),
    ],
)
def test_a_bad_corrections_file_is_refused_with_its_line(tmp_path, content, words):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=str(path)) as raised:
        read_corrections(path)
    assert words in str(raised.value)


def test_relabel_values_are_checked_by_the_spec_and_the_file_when_loading(tmp_path):
    with pytest.raises(SpecError, match="relabel: use none, default"):
        load_spec({"relabel": "yes"})
    assert load_spec({"relabel": "DEFAULT"}).relabel == "default"
    with pytest.raises(DataError, match="does not exist"):
        load_corrections(str(tmp_path / "missing.csv"))


def test_the_shipped_corrections_are_the_publicly_reported_ones():
    shipped = load_corrections("default")
    assert {profile for profile, fix in shipped.items() if fix.swap} == SWAPPED
    assert {profile for profile, fix in shipped.items() if fix.gender == "male"} == TO_MALE
    assert {profile for profile, fix in shipped.items() if fix.gender == "female"} == TO_FEMALE

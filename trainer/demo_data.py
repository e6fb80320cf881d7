"""A synthetic mask-status dataset in the competition's exact layout, for the demo, tests and benchmarks.

Each profile is a drawn face whose cues a small model can learn:
- mask state: a mask over nose and mouth (wear), under the nose (incorrect), or none (not wear);
- gender: long hair down to the shoulders (female) or short hair (male);
- age: hair colour, dark below 30, grey from 30, white from 60, plus forehead lines from 60.
Skin tone, background, mask colour, face position and size vary per image. Deterministic per seed.
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from trainer.data import GENDER_NAMES, MASK_STATES

RACES = ("Asian", "Asian", "Asian", "White", "Black")
SKIN_TONES = ((241, 206, 178), (224, 182, 146), (198, 148, 108), (160, 112, 76), (114, 78, 52))
MASK_COLOURS = ((236, 236, 240), (120, 170, 225), (40, 40, 48), (235, 170, 190), (150, 200, 160))
DEFAULT_IMAGE_SIZE = (512, 384)  # height x width, as the competition's photos


@dataclass(frozen=True)
class Profile:
    id: str
    gender: str
    race: str
    age: int

    @property
    def folder(self) -> str:
        return f"{self.id}_{self.gender}_{self.race}_{self.age}"


def _age_for_group(group: int, rng: random.Random) -> int:
    return (rng.randint(18, 29), rng.randint(30, 59), rng.randint(60, 75))[group]


def make_profiles(count: int, seed: int, first_id: int = 1) -> list[Profile]:
    """`count` profiles cycling through the six gender x age groups, so every class is present."""
    rng = random.Random(seed)
    groups = [index % 6 for index in range(count)]
    rng.shuffle(groups)
    profiles = []
    for offset, group in enumerate(groups):
        gender = GENDER_NAMES[group // 3]
        profiles.append(Profile(f"{first_id + offset:06d}", gender, rng.choice(RACES), _age_for_group(group % 3, rng)))
    return profiles


def _hair_colour(age: int, rng: random.Random) -> tuple[int, int, int]:
    if age < 30:
        base = rng.randint(25, 60)
        return (base + 15, base + 5, base)
    if age < 60:
        base = rng.randint(115, 150)
        return (base, base, base + 5)
    base = rng.randint(215, 245)
    return (base, base, base)


@dataclass(frozen=True)
class FaceLayout:
    """Where one drawn face sits in its photo, and the sizes its features are drawn at."""

    unit: float  # the photo's scale: line widths and blur follow it
    cx: float
    cy: float
    face_w: float
    face_h: float

    @property
    def eye_y(self) -> float:
        return self.cy - self.face_h * 0.06

    @property
    def eye_r(self) -> float:
        return self.face_w * 0.06

    @property
    def nose_y(self) -> float:
        return self.cy + self.face_h * 0.1


@dataclass(frozen=True)
class FaceColours:
    skin: tuple[int, ...]
    hair: tuple[int, int, int]
    clothes: tuple[int, ...]


def _place_face(width: int, height: int, rng: random.Random) -> FaceLayout:
    """A face near the centre, its width about half the photo's."""
    unit = min(width, height / 1.33)
    cx = width / 2 + rng.uniform(-0.06, 0.06) * width
    cy = height * 0.46 + rng.uniform(-0.04, 0.04) * height
    face_w = unit * rng.uniform(0.46, 0.54)
    return FaceLayout(unit, cx, cy, face_w, face_w * 1.3)


def _pick_colours(profile: Profile, rng: random.Random) -> FaceColours:
    """Skin from the profile's race (jittered), hair from its age, clothes at random."""
    skin = SKIN_TONES[RACES.index(profile.race) % len(SKIN_TONES)]
    skin = tuple(max(0, min(255, channel + rng.randint(-12, 12))) for channel in skin)
    hair = _hair_colour(profile.age, rng)
    clothes = tuple(rng.randint(20, 200) for _ in range(3))
    return FaceColours(skin, hair, clothes)


def _draw_head(draw: ImageDraw.ImageDraw, face: FaceLayout, profile: Profile, colours: FaceColours) -> None:
    """Shoulders, long hair behind the head (female), the head, the hair on top, forehead lines (60+)."""
    cx, cy, face_w, face_h = face.cx, face.cy, face.face_w, face.face_h
    draw.ellipse((cx - face_w * 1.1, cy + face_h * 0.55, cx + face_w * 1.1, cy + face_h * 1.6), fill=colours.clothes)
    if profile.gender == "female":
        draw.rounded_rectangle(
            (cx - face_w * 0.72, cy - face_h * 0.55, cx + face_w * 0.72, cy + face_h * 0.75),
            radius=face_w * 0.3,
            fill=colours.hair,
        )
    draw.ellipse((cx - face_w / 2, cy - face_h / 2, cx + face_w / 2, cy + face_h / 2), fill=colours.skin)
    draw.chord(
        (cx - face_w * 0.55, cy - face_h * 0.62, cx + face_w * 0.55, cy + face_h * 0.05),
        start=180,
        end=360,
        fill=colours.hair,
    )
    if profile.age >= 60:
        for row in range(3):
            y = cy - face_h * (0.2 - row * 0.05)
            draw.line(
                (cx - face_w * 0.25, y, cx + face_w * 0.25, y), fill=(90, 60, 50), width=max(1, int(face.unit / 90))
            )


def _draw_features(draw: ImageDraw.ImageDraw, face: FaceLayout, skin: tuple[int, ...]) -> None:
    """Eyes, nose and mouth."""
    cx, cy, face_w, face_h, eye_y, eye_r = face.cx, face.cy, face.face_w, face.face_h, face.eye_y, face.eye_r
    for side in (-1, 1):
        ex = cx + side * face_w * 0.2
        draw.ellipse((ex - eye_r, eye_y - eye_r * 0.7, ex + eye_r, eye_y + eye_r * 0.7), fill=(30, 30, 30))
    draw.polygon(
        [(cx, eye_y + eye_r), (cx - face_w * 0.09, face.nose_y), (cx + face_w * 0.09, face.nose_y)],
        fill=tuple(max(0, channel - 70) for channel in skin),
    )
    mouth_y = cy + face_h * 0.25
    draw.chord(
        (cx - face_w * 0.16, mouth_y - face_h * 0.05, cx + face_w * 0.16, mouth_y + face_h * 0.05),
        start=0,
        end=180,
        fill=(170, 40, 50),
    )


def _draw_mask(draw: ImageDraw.ImageDraw, face: FaceLayout, mask_state: int, rng: random.Random) -> None:
    """The mask over nose and mouth (0), pulled down under the nose (1), or none (2)."""
    if mask_state not in (0, 1):
        return
    cx, face_w, face_h = face.cx, face.face_w, face.face_h
    colour = rng.choice(MASK_COLOURS)
    top = face.eye_y + face.eye_r * 1.6 if mask_state == 0 else face.nose_y + face_h * 0.06
    draw.rounded_rectangle(
        (cx - face_w * 0.47, top, cx + face_w * 0.47, face.cy + face_h * 0.47),
        radius=face_w * 0.12,
        fill=colour,
        outline=tuple(max(0, channel - 60) for channel in colour),
        width=max(1, int(face.unit / 80)),
    )
    for side in (-1, 1):  # ear loops
        x = cx + side * face_w * 0.47
        draw.line(
            (x, top + face_h * 0.05, x + side * face_w * 0.06, face.eye_y),
            fill=colour,
            width=max(1, int(face.unit / 70)),
        )


def draw_face(profile: Profile, mask_state: int, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One photo of `profile` with mask state 0 (wear), 1 (incorrect) or 2 (not wear)."""
    height, width = size
    # The draws from `rng` keep this order (background, place, colours, mask, blur): same seed, same photo.
    image = Image.new("RGB", (width, height), tuple(rng.randint(150, 250) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    face = _place_face(width, height, rng)
    colours = _pick_colours(profile, rng)
    _draw_head(draw, face, profile, colours)
    _draw_features(draw, face, colours.skin)
    _draw_mask(draw, face, mask_state, rng)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 1.2) * face.unit / 200))
    return image


def _write_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)


def make_demo_dataset(
    root: str | Path,
    profiles: int = 180,
    eval_profiles: int = 36,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> dict[str, int]:
    """Write train/ and eval/ in the competition's layout under `root`; return counts.

    eval/info.csv has the competition's `ImageID,ans` with ans = 0; the true labels of the demo's
    eval images are in eval/answers.csv so a submission can be scored.
    """
    root = Path(root)
    train_dir, eval_dir = root / "train", root / "eval"
    train_profiles = make_profiles(profiles, seed)
    with open(_fresh(train_dir / "train.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "gender", "race", "age", "path"])
        for number, profile in enumerate(train_profiles):
            writer.writerow([profile.id, profile.gender, profile.race, profile.age, profile.folder])
            rng = random.Random(seed * 1_000_003 + number)
            for stem, state in MASK_STATES.items():
                _write_image(
                    draw_face(profile, state, image_size, rng),
                    train_dir / "images" / profile.folder / f"{stem}.jpg",
                )

    from trainer.data import age_class, mask_label

    hidden = make_profiles(eval_profiles, seed + 1, first_id=profiles + 1)
    eval_rows = []
    for number, profile in enumerate(hidden):
        rng = random.Random((seed + 1) * 1_000_003 + number)
        for state in range(3):
            image_id = hashlib.sha1(f"{seed}-{profile.id}-{state}".encode()).hexdigest() + ".jpg"
            _write_image(draw_face(profile, state, image_size, rng), eval_dir / "images" / image_id)
            label = mask_label(state, GENDER_NAMES.index(profile.gender), age_class(profile.age))
            eval_rows.append((image_id, label))
    random.Random(seed).shuffle(eval_rows)
    with open(eval_dir / "info.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "ans"])
        writer.writerows((image_id, 0) for image_id, _ in eval_rows)
    with open(eval_dir / "answers.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "ans"])
        writer.writerows(eval_rows)
    return {"profiles": profiles, "train_images": profiles * len(MASK_STATES), "eval_images": len(eval_rows)}


def _fresh(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path

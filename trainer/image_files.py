"""Image files checked one by one, torch-free: which ones cannot be decoded, and how big they are.

`runyard doctor --data-dir` and `publish` use it (they never import torch); the trainer decodes
with torchvision (trainer.image_cache) and names a bad file the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

FIX = (
    "replace or delete the file, or set bad_images: skip to train without it "
    "(`runyard doctor --data-dir DIR` lists every bad file)"
)


def unreadable_reason(path: str | Path) -> str | None:
    """Why Pillow cannot decode the image at `path` (every pixel is read), or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        if Path(path).stat().st_size == 0:
            return "the file is empty (0 bytes)"
        with Image.open(path) as image:
            image.load()
    except UnidentifiedImageError:
        return "not an image file Pillow knows"
    except OSError as error:
        return str(error.strerror or error)
    except Exception as error:  # a malformed file can make a decoder raise nearly anything
        return f"{type(error).__name__}: {error}"
    return None


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the image's header, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:
        return None
    return height, width


def crop_problem(crop: tuple[int, int], paths: Iterable[str | Path], tries: int = 20) -> str | None:
    """Why `crop` (HEIGHTxWIDTH source pixels) does not fit the first readable image of `paths`, or None."""
    for path in itertools.islice(paths, tries):
        size = image_size(path)
        if size is not None:
            break
    else:
        return None
    if crop[0] <= size[0] and crop[1] <= size[1]:
        return None
    return (
        f"center_crop {crop[0]}x{crop[1]} does not fit the images ({path} is {size[0]}x{size[1]}; a side "
        f"larger than the image is not cropped at all): use a center_crop of at most {size[0]}x{size[1]}, or none"
    )


def image_files(root: str | Path) -> Iterator[Path]:
    """The image files under `root`, in directory order (not sorted: the first ones come at once)."""
    for path in Path(root).expanduser().rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            yield path

"""Decode once: each image's recipe prefix (decode, centre crop, resize) kept as uint8.

Where the decoded images live (the spec's `image_cache`):
- memory: one shared anonymous mapping per job, filled before training starts by DataLoader
  processes forked after the mapping exists (so they fill the pages the training process and its
  loader workers then read); epochs only read. It needs
  images x 3 x height x width bytes of RAM (3.8 GB for the 18,900 competition photos at 260x260);
  when that is more than half of this worker's share of the box's free memory, the job decodes
  every time instead and says so.
- disk: a file under $RUNYARD_HOME/cache/images/<key>/, mapped into memory: every job on the box
  with the same dataset files, prefix and relabel file shares one copy through the page cache.
  It is built once, completely, by the first job that asks, under a file lock (the others wait);
  any change of the key's parts (file list, sizes, mtimes, crop and size, relabel file) gives a
  new key, so a stale cache is never read. Delete the folder to reclaim the space.
- none: decode every time.

A file that cannot be decoded (truncated, empty, not an image) is an UnreadableImage naming it:
filling a store collects every such file (a disk store's manifest keeps the list), and the
loaders fail the job or skip them as the spec's `bad_images` says.

Images are decoded with torchvision.io.decode_image (libjpeg-turbo), measured at 2.4x PIL's
speed for 512x384 JPEGs on cpu-2 (BENCHMARKS.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

from trainer.augment import Prefix
from trainer.data import UnreadableImage
from trainer.image_files import FIX

log = logging.getLogger("runyard.trainer")

FORMAT_VERSION = 1


def decode(path: str) -> torch.Tensor:
    """An image file as uint8 RGB [3, height, width]; UnreadableImage naming the file if it cannot be."""
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which runyard does not
    # install yet; they remain the fastest decoder here, so the warning (one per call) is muted.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise UnreadableImage(f"{path}: cannot decode this image ({_decode_reason(error)}); {FIX}") from None


def _decode_reason(error: Exception) -> str:
    """torchvision's message without its C++ source location: 'decode_jpeg, .../x.cpp:171, Image is truncated'."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1] if ".cpp:" in text else text
    return text.split(". ", 1)[0]  # "Unsupported image file. Only jpeg, png, ..." -> its first sentence


class ImageStore:
    """`len(paths)` prefixed images of one shape over one buffer, with a filled flag per image.

    `file` is the backing file of a disk store (None: an anonymous mapping, private to this job
    and the processes it forks).
    """

    def __init__(self, paths: Sequence[str], prefix: Prefix, buffer: mmap.mmap, file: Path | None = None):
        self.paths = list(paths)
        self.prefix = prefix
        self.buffer = buffer
        self.file = file
        count, height, width = len(self.paths), *prefix.size
        flat = torch.frombuffer(buffer, dtype=torch.uint8)
        self.images = flat[: count * 3 * height * width].view(count, 3, height, width)
        self.filled = flat[count * 3 * height * width : count * 3 * height * width + count]
        self.positions = {path: position for position, path in enumerate(self.paths)}
        self.unreadable: dict[str, str] = {}  # path -> why it cannot be decoded, found by `fill`

    @staticmethod
    def nbytes(count: int, prefix: Prefix) -> int:
        return count * (3 * prefix.size[0] * prefix.size[1] + 1)

    @classmethod
    def in_memory(cls, paths: Sequence[str], prefix: Prefix) -> ImageStore:
        """An empty store in anonymous shared memory (MAP_SHARED: forked processes see every write)."""
        return cls(paths, prefix, mmap.mmap(-1, max(1, cls.nbytes(len(paths), prefix))))

    @classmethod
    def from_file(cls, paths: Sequence[str], prefix: Prefix, file: Path, writable: bool = False) -> ImageStore:
        """Map a store file: shared and writable while it is built, copy-on-write once it is read."""
        with open(file, "r+b" if writable else "rb") as handle:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY
            return cls(paths, prefix, mmap.mmap(handle.fileno(), 0, access=access), file)

    def __reduce__(self):
        # A process started by spawn or forkserver cannot inherit a mapping: a disk store maps its
        # file again; a memory store starts empty there (that process then fills its own copy).
        if self.file is not None:
            return (ImageStore.from_file, (self.paths, self.prefix, self.file, False))
        return (ImageStore.in_memory, (self.paths, self.prefix))

    def load(self, position: int) -> torch.Tensor:
        """Image `position` as uint8 [3, H, W]: from the store, or decoded (and kept) the first time."""
        if self.filled[position]:
            return self.images[position]
        image = self.prefix(decode(self.paths[position]))
        self.images[position].copy_(image)
        self.filled[position] = 1  # after the pixels: a reader that sees the flag sees the image
        return image

    def fill(self, workers: int, progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
        """Decode every image not yet in the store, with `workers` DataLoader processes.

        Returns (and keeps in `unreadable`) the files that cannot be decoded, with the reason.
        """
        missing = [position for position in range(len(self.paths)) if not self.filled[position]]
        self.unreadable.update(_decode_all([self.paths[position] for position in missing], workers, self, progress))
        return self.unreadable


def find_unreadable(
    paths: Sequence[str], workers: int, progress: Callable[[int, int], None] | None = None
) -> dict[str, str]:
    """Decode every file of `paths` once, keeping nothing: path -> reason for those that fail."""
    return _decode_all(list(paths), workers, None, progress)


def _decode_all(
    paths: list[str], workers: int, store: ImageStore | None, progress: Callable[[int, int], None] | None
) -> dict[str, str]:
    loader = DataLoader(
        _Decoder(paths, store),
        batch_size=32,
        num_workers=workers,
        collate_fn=_failures_of_batch,
        multiprocessing_context=fork_context() if workers else None,
    )
    unreadable: dict[str, str] = {}
    done = 0
    for count, failures in loader:
        done += count
        unreadable.update(failures)
        if progress is not None:
            progress(done, len(paths))
    return unreadable


def _failures_of_batch(items: list[tuple[str, str] | None]) -> tuple[int, dict[str, str]]:
    return len(items), dict(item for item in items if item is not None)


class _Decoder(Dataset):
    """Decodes `paths` (into `store`, when given); an item is (path, reason) for a file that fails, else None."""

    def __init__(self, paths: list[str], store: ImageStore | None):
        self.paths = paths
        self.store = store

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, str] | None:
        path = self.paths[index]
        try:
            if self.store is not None:
                self.store.load(self.store.positions[path])
            else:
                decode(path)
        except UnreadableImage as error:
            return path, str(error)
        return None


def fork_context() -> str | None:
    """'fork' where the OS has it: DataLoader workers then share a memory store's pages."""
    import multiprocessing

    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def available_memory() -> int:
    """Bytes of memory the box can still give (MemAvailable), or total RAM where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_key(paths: Sequence[str], prefix: Prefix, identity: dict[str, Any]) -> str:
    """The disk cache's key: every file's path, size and mtime, the prefix, and `identity`
    (the dataset folder and the relabel file's hash)."""
    digest = hashlib.sha256()
    header = {"version": FORMAT_VERSION, "prefix": prefix.describe(), **identity}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\n{path}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def open_disk_store(
    paths: Sequence[str],
    prefix: Prefix,
    identity: dict[str, Any],
    root: Path,
    workers: int,
) -> tuple[ImageStore, bool]:
    """The disk store for these images and prefix, built now if no process built it yet.

    Returns the store and whether this call built it. Concurrent callers wait on a file lock
    while one of them builds; a builder that dies leaves only a temporary file behind.
    """
    key = cache_key(paths, prefix, identity)
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    data, manifest = folder / "images.u8", folder / "manifest.json"
    built = False
    with open(folder / ".lock", "w") as lock:
        if not manifest.exists():
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("image cache %s: another process is building it; waiting", folder)
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not manifest.exists():
                _build(paths, prefix, identity, folder, workers)
                built = True
            fcntl.flock(lock, fcntl.LOCK_UN)
    store = ImageStore.from_file(paths, prefix, data)
    store.unreadable = json.loads(manifest.read_text()).get("unreadable", {})
    if not built:
        log.info("image cache %s: %d images of %dx%d, built earlier", folder, len(paths), *prefix.size)
    return store, built


def _build(paths: Sequence[str], prefix: Prefix, identity: dict[str, Any], folder: Path, workers: int) -> None:
    started = time.perf_counter()
    temporary = folder / f"images.u8.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.truncate(max(1, ImageStore.nbytes(len(paths), prefix)))
    store = ImageStore.from_file(paths, prefix, temporary, writable=True)
    log.info(
        "image cache %s: decoding %d images to %dx%d with %d worker(s), once for every job on this box",
        folder,
        len(paths),
        *prefix.size,
        workers,
    )
    step = max(1, len(paths) // 10)
    reported = [0]

    def progress(done: int, total: int) -> None:
        if done - reported[0] >= step or done == total:
            reported[0] = done
            rate = done / max(time.perf_counter() - started, 1e-9)
            log.info("image cache: %d/%d images decoded (%.0f img/s)", done, total, rate)

    unreadable = store.fill(workers, progress)
    store.buffer.flush()
    store.buffer.close()
    os.replace(temporary, folder / "images.u8")
    record = {
        "version": FORMAT_VERSION,
        "images": len(paths),
        "shape": [3, *prefix.size],
        "prefix": prefix.describe(),
        **identity,
        "built_by": {"host": socket.gethostname(), "pid": os.getpid()},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 3),
        "unreadable": unreadable,  # later jobs learn the bad files without decoding them again
    }
    manifest_temporary = folder / f"manifest.json.{os.getpid()}.tmp"
    manifest_temporary.write_text(json.dumps(record, indent=2))
    os.replace(manifest_temporary, folder / "manifest.json")  # the manifest says: complete


def open_store(
    mode: str,
    paths: Sequence[str],
    prefix: Prefix,
    identity: dict[str, Any],
    root: Path,
    workers: int,
    memory_budget: int | None = None,
) -> ImageStore | None:
    """The store the spec's `image_cache` asks for (None: decode every time).

    A memory store larger than `memory_budget` bytes is refused with a log line naming the fix.
    """
    if mode == "none" or not paths:
        return None
    if mode == "disk":
        return open_disk_store(paths, prefix, identity, root, workers)[0]
    needed = ImageStore.nbytes(len(paths), prefix)
    if memory_budget is not None and needed > memory_budget:
        log.warning(
            "image cache: %d images at %dx%d need %.1f GiB, more than this worker's share of free memory "
            "(%.1f GiB); decoding every epoch instead (image_cache: disk keeps one copy per box on disk)",
            len(paths),
            *prefix.size,
            needed / 2**30,
            memory_budget / 2**30,
        )
        return None
    store = ImageStore.in_memory(paths, prefix)
    # Filled now rather than as epoch 1 reads it: a bad file is found before training starts, even
    # one that epoch 1 never reads (the dropped last partial batch).
    store.fill(workers)
    return store

"""The run store: where every box reads and writes runs (RUNYARD_STORE, an fsspec URL).

RUNYARD_STORE is a local or shared path (`/mnt/shared/runyard`), `s3://bucket/prefix` (any
S3-compatible server through the standard AWS_* variables, AWS_ENDPOINT_URL included, via s3fs),
or any other fsspec URL whose backend is installed. Unset, the store is the runs dir
($RUNYARD_HOME/runs or the spec's output_dir) and nothing is copied anywhere: today's single box.

A run in the store is `<store>/<run_name>/` with the run dir's files under their own names, its
checkpoints under names that are never reused (`checkpoints/last-e0003.pt`) and `manifest.json`,
written last, naming the current checkpoints with their size and sha256. Readers go through the
manifest, so a checkpoint being uploaded, or cut off by a kill, is never what they load.
Credentials only ever come from the box's environment; `display_url` is what logs and results show.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from trainer.paths import runs_root

STORE_ENV = "RUNYARD_STORE"
MANIFEST = "manifest.json"
CHECKPOINT_KINDS = ("last", "previous", "best")
OBJECT_STORE_OPTIONS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}}
FIX = "set RUNYARD_STORE to a path every box reaches or to s3://BUCKET/PREFIX (unset: $RUNYARD_HOME/runs)"


class StoreError(RuntimeError):
    """The run store cannot be used; the message names the store (without secrets) and the fix."""


class RunNotInStore(StoreError):
    """The store has no run of that name."""


def display_url(url: str) -> str:
    """The URL without user, password or query string: what a log line or a result may show."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a path (or a Windows drive letter)
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a local file: what the manifest records and readers check."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def matches(path: Path, entry: dict[str, Any]) -> bool:
    """Whether a local file is the one a manifest entry names (size first, then hash)."""
    return path.is_file() and path.stat().st_size == entry["size"] and file_digest(path)["sha256"] == entry["sha256"]


class RunStore:
    """One store root on one filesystem; `remote` is False when it is this box's runs dir itself."""

    def __init__(self, url: str, filesystem: Any, root: str, remote: bool):
        self.url = url
        self.fs = filesystem
        self.root = root.rstrip("/")
        self.remote = remote
        self.local = getattr(filesystem, "protocol", None) in ("file", ("file", "local"))

    def __repr__(self) -> str:
        return f"RunStore({display_url(self.url)})"

    def path(self, run_name: str, relative: str = "") -> str:
        return f"{self.root}/{run_name}/{relative}" if relative else f"{self.root}/{run_name}"

    def run_url(self, run_name: str) -> str:
        """Where the run lives, as a log line or a result may show it."""
        return f"{display_url(self.url).rstrip('/')}/{run_name}"

    def put(self, local: Path, run_name: str, relative: str) -> None:
        """Upload a file so that readers see the old one or the whole new one, never a part."""
        target = self.path(run_name, relative)
        if self.local:  # a rename is atomic on a local or shared filesystem; an S3 PUT is atomic already
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            temporary = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.put_file(str(local), temporary)
            self.fs.mv(temporary, target)
        else:
            self.fs.put_file(str(local), target)

    def get(self, run_name: str, relative: str, local: Path, expected: dict[str, Any] | None = None) -> Path:
        """Download into `local` (renamed into place only once complete and, with `expected`, verified)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        temporary = local.with_name(f".{local.name}.{os.getpid()}.download")
        self.fs.get_file(self.path(run_name, relative), str(temporary))
        if expected is not None:
            found = file_digest(temporary)
            if found != {"size": expected["size"], "sha256": expected["sha256"]}:
                temporary.unlink()
                raise StoreError(
                    f"{self.run_url(run_name)}/{relative}: size {found['size']} / sha256 {found['sha256'][:12]} "
                    f"differ from its manifest's ({expected['size']} / {expected['sha256'][:12]})"
                )
        os.replace(temporary, local)
        return local

    def read_manifest(self, run_name: str) -> dict[str, Any] | None:
        """The run's manifest, or None when the store has no such run."""
        self.fs.invalidate_cache()  # another box may have written it since this process last looked
        try:
            return json.loads(self.fs.cat_file(self.path(run_name, MANIFEST)))
        except FileNotFoundError:
            return None

    def write_manifest(self, run_name: str, manifest: dict[str, Any]) -> None:
        """Publish the manifest in one atomic step (after every file it names is in place)."""
        target = self.path(run_name, MANIFEST)
        data = json.dumps(manifest, indent=2).encode()
        if self.local:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            temporary = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.pipe_file(temporary, data)
            self.fs.mv(temporary, target)
        else:
            self.fs.pipe_file(target, data)

    def delete(self, run_name: str, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(run_name, relative))

    def run_names(self) -> list[str]:
        """The runs in the store (directories with a manifest or, in a plain runs dir, a spec)."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = [entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory"]
        return sorted(name for name in names if not name.startswith("."))

    def run_size(self, run_name: str) -> int:
        try:
            return int(self.fs.du(self.path(run_name)))
        except FileNotFoundError:
            return 0

    def pull(self, run_name: str, destination: Path, kinds: tuple[str, ...] | None = None, files: bool = True) -> Path:
        """Copy a run from the store into `destination` (a local cache): its checkpoints (`kinds`, all
        by default) and, with `files`, its other files. A file already there with the manifest's size
        and sha256 is not downloaded again; every download is checked against them."""
        manifest = self.read_manifest(run_name)
        if manifest is None:
            raise RunNotInStore(f"run {run_name} is not in the store {display_url(self.url)} (see `runyard runs`)")
        for kind, entry in (manifest.get("checkpoints") or {}).items():
            if kinds is None or kind in kinds:
                target = destination / "checkpoints" / f"{kind}.pt"
                if not matches(target, entry):
                    self.get(run_name, entry["path"], target, expected=entry)
        for relative, entry in (manifest.get("files") or {}).items() if files else ():
            if not matches(destination / relative, entry):
                self.get(run_name, relative, destination / relative, expected=entry)
        return destination

    def describe(self, run_name: str) -> dict[str, Any] | None:
        """The run's manifest; for a runs dir without one (this box's own), one built from its files."""
        manifest = self.read_manifest(run_name)
        if manifest is not None:
            return manifest | {"has_manifest": True}
        folder = self.path(run_name)
        if not self.fs.exists(f"{folder}/spec.json"):
            return None
        described: dict[str, Any] = {"run_name": run_name, "status": "incomplete", "files": {}, "has_manifest": False}
        described["checkpoints"] = {
            kind: {"path": f"checkpoints/{kind}.pt", "size": self.fs.size(f"{folder}/checkpoints/{kind}.pt")}
            for kind in CHECKPOINT_KINDS
            if self.fs.exists(f"{folder}/checkpoints/{kind}.pt")
        }
        if self.fs.exists(f"{folder}/result.json"):
            result = json.loads(self.fs.cat_file(f"{folder}/result.json"))
            described |= {"status": "finished", "best": result.get("best"), "epoch": result.get("epochs_completed")}
        if self.fs.exists(f"{folder}/context.json"):
            context = json.loads(self.fs.cat_file(f"{folder}/context.json"))
            described |= {"box": (context.get("worker") or {}).get("host"), "search": context.get("search")}
        return described

    def check(self) -> str:
        """Write, read back and delete a probe file; raises StoreError naming the cause and the fix."""
        probe = f"{self.root}/.runyard-probe-{socket.gethostname()}-{os.getpid()}"
        payload = f"{time.time()}".encode()
        try:
            if self.local and self.remote:  # a new store dir, but in a parent that exists (a typo is no store)
                if not Path(self.root).parent.is_dir():
                    raise FileNotFoundError(f"{Path(self.root).parent} does not exist")
                Path(self.root).mkdir(exist_ok=True)
            elif self.local:  # this box's own runs dir, created as it always was
                Path(self.root).mkdir(parents=True, exist_ok=True)
            self.fs.pipe_file(probe, payload)
            if self.fs.cat_file(probe) != payload:
                raise StoreError(f"store {display_url(self.url)}: a probe file read back different bytes")
            self.fs.rm_file(probe)
        except StoreError:
            raise
        except Exception as error:
            raise StoreError(explain(self.url, error)) from None
        return f"store {display_url(self.url)} is reachable and writable"


def explain(url: str, error: BaseException) -> str:
    """One line for a store operation that failed: which store, what went wrong, what to do."""
    shown = display_url(url)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return f"store {shown}: permission denied ({text}); give this box's credentials (AWS_* variables) write access"
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in text:
        return f"store {shown}: the bucket or directory does not exist ({text}); create it or fix RUNYARD_STORE"
    return f"store {shown}: unreachable ({type(error).__name__}: {text}); check the network, AWS_ENDPOINT_URL or {FIX}"


def open_store(output_dir: str | None = None) -> RunStore:
    """The store this box uses: RUNYARD_STORE, else the runs dir (raises StoreError for a bad URL)."""
    url = (os.environ.get(STORE_ENV) or "").strip()
    if not url:
        import fsspec

        root = runs_root(output_dir)
        return RunStore(str(root), fsspec.filesystem("file"), str(root), remote=False)
    try:
        import fsspec.core

        # Object stores: fail over in seconds, not minutes; the run's uploads retry on their own.
        options = OBJECT_STORE_OPTIONS if urlsplit(url).scheme in ("s3", "s3a") else {}
        options = options | {"skip_instance_cache": True}  # credentials and endpoint as the environment says now
        filesystem, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        scheme = urlsplit(url).scheme
        raise StoreError(
            f"{STORE_ENV}={display_url(url)}: the {scheme}:// backend is not installed ({error}); "
            f"pip install {'s3fs' if scheme in ('s3', 's3a') else 'its fsspec package'}"
        ) from None
    except (ValueError, TypeError) as error:
        raise StoreError(f"{STORE_ENV}={display_url(url)}: {error}; {FIX}") from None
    if getattr(filesystem, "protocol", None) in ("file", ("file", "local")):
        root = str(Path(root).expanduser())
        same = Path(root).resolve() == runs_root(output_dir).resolve()
        return RunStore(url, filesystem, root, remote=not same)
    if urlsplit(url).scheme in ("s3", "s3a", "gs", "gcs") and not root.strip("/"):
        raise StoreError(f"{STORE_ENV}={display_url(url)}: no bucket named; use s3://BUCKET/PREFIX")
    return RunStore(url, filesystem, root, remote=True)


def box_name() -> str:
    return socket.gethostname()

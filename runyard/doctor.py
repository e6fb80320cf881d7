"""`runyard doctor`: is this box ready to publish and train? One line per check, with the fix.

Checks Redis (reachable, version, AOF), the workers registered there (per box), the GPUs NVML
sees here, the W&B mode a worker started here would use, and a dataset's layout with its image
count per class, decoding every image (Pillow) to list the ones a job could not read. Nothing
here imports torch or wandb, and nothing is started or changed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import redis
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rq import Worker
from rq.serializers import JSONSerializer

from contracts.spec import DATASETS, ExperimentSpec
from runyard.cli.common import CONTEXT, console
from trainer.tracking import wandb_mode
from worker.connection import RedisUnavailable, connect, embedded_server, mask_url, redis_url
from worker.heartbeat import RUNYARD_MARK, is_alive, known_workers

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass
class Check:
    """One line of the report: what was checked, how it went, and (unless ok) what to do."""

    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def check_redis() -> tuple[Check, redis.Redis | None]:
    """Reachable, authenticated, and which version; the connection for the checks that need it."""
    from_env = bool(os.environ.get("REDIS_URL"))
    if not from_env and not embedded_server().is_running():
        url = embedded_server().url
        return Check(
            "redis",
            WARN,
            f"no REDIS_URL and the embedded Redis at {url} is not running: `runyard redis start` starts it "
            "(any command that needs it does too), or set REDIS_URL to the team's server",
        ), None
    try:
        url = redis_url(start_embedded=False)
        connection = connect(url)
        version = connection.info("server").get("redis_version", "?")
    except RedisUnavailable as error:
        return Check("redis", FAIL, str(error)), None
    except redis.RedisError as error:  # something answered, but not as Redis does (a proxy, another service)
        return Check(
            "redis",
            FAIL,
            f"{mask_url(url)} answered, but not as Redis ({error}): check the host and port in REDIS_URL",
        ), None
    origin = "REDIS_URL" if from_env else "embedded"
    return Check("redis", OK, f"Redis {version} at {mask_url(url)} ({origin})", {"version": version}), connection


def check_persistence(connection: redis.Redis) -> Check:
    """AOF on: without it a Redis restart loses every queued job written since the last snapshot."""
    info = connection.info("persistence")
    if int(info.get("aof_enabled", 0)):
        try:
            fsync = connection.config_get("appendfsync").get("appendfsync", "?")
        except redis.RedisError:  # CONFIG is often renamed or denied on managed servers
            fsync = "?"
        return Check("aof", OK, f"append-only file on (appendfsync {fsync})", {"appendfsync": fsync})
    return Check(
        "aof",
        WARN,
        "append-only file off: a Redis restart loses queued jobs; run redis-server with "
        "--appendonly yes --appendfsync everysec (docker-compose.yml does)",
    )


def check_workers(connection: redis.Redis) -> Check:
    """Registered workers grouped by box, with how many are busy; a runyard worker without a heartbeat is dead.

    RQ keeps a killed worker's registration for minutes, with a heartbeat it refreshes only every
    few minutes when idle: runyard's own heartbeat (worker.heartbeat, a 15 s TTL) decides.
    """
    boxes: dict[str, Counter] = defaultdict(Counter)
    heartbeat_age: dict[str, float] = {}
    dead: list[str] = []
    ours = known_workers(connection)
    now = time.time()
    for worker in Worker.all(connection=connection, serializer=JSONSerializer):
        host = worker.hostname or "?"
        age = now - worker.last_heartbeat.timestamp() if worker.last_heartbeat else None
        runyard_worker = worker.name in ours or connection.hexists(worker.key, RUNYARD_MARK)
        if runyard_worker and not is_alive(connection, worker.name):
            dead.append(f"{worker.name} ({f'last heartbeat {age:.0f}s ago' if age is not None else 'no heartbeat'})")
            continue
        boxes[host][str(worker.get_state())] += 1
        if age is not None:
            heartbeat_age[host] = max(heartbeat_age.get(host, 0.0), age)
    gone = (
        f"{len(dead)} dead (registered, but no runyard heartbeat): {', '.join(dead)}; their jobs are requeued "
        "by any worker's janitor, or by `runyard janitor --once`"
        if dead
        else ""
    )
    if not boxes:
        return Check(
            "workers",
            WARN,
            f"{'no live workers' if dead else 'no workers registered'}: start one on each GPU box with "
            "`worker --gpus all` (or `worker --cpu`)" + (f"; {gone}" if gone else ""),
            {"dead": dead},
        )
    parts = []
    for host, states in sorted(boxes.items()):
        counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        parts.append(f"{host}: {sum(states.values())} ({counts}; last heartbeat {heartbeat_age.get(host, 0):.0f}s ago)")
    total = sum(sum(states.values()) for states in boxes.values())
    data = {"boxes": {host: dict(states) for host, states in boxes.items()}, "dead": dead}
    message = f"{total} alive on {len(boxes)} box(es): " + "; ".join(parts)
    return Check("workers", WARN if dead else OK, message + (f"; {gone}" if gone else ""), data)


def check_gpus() -> Check:
    """GPUs the NVIDIA driver reports on this box (through NVML: CUDA is never initialised)."""
    try:
        import pynvml
    except ImportError:
        return Check(
            "gpus", WARN, "nvidia-ml-py is not installed: `pip install nvidia-ml-py` to see GPUs (workers use it)"
        )
    try:
        pynvml.nvmlInit()
    except Exception as error:
        return Check(
            "gpus",
            WARN,
            f"no GPU seen (NVML: {error}): workers on this box would train on the CPU; "
            "a GPU box needs the NVIDIA driver (check with nvidia-smi)",
        )
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"index": index, "name": str(name), "memory_gib": round(memory.total / 2**30, 1)})
    finally:
        pynvml.nvmlShutdown()
    if not gpus:
        return Check("gpus", WARN, f"NVML (driver {driver}) sees no GPU: workers on this box would train on the CPU")
    names = Counter(f"{gpu['name']} {gpu['memory_gib']:g} GiB" for gpu in gpus)
    listed = ", ".join(f"{count} x {name}" for name, count in names.items())
    return Check("gpus", OK, f"{len(gpus)} GPU(s): {listed} (driver {driver})", {"gpus": gpus})


def check_wandb() -> Check:
    """The W&B mode a worker started in this environment would use."""
    mode = wandb_mode()
    project = os.environ.get("WANDB_PROJECT") or "the spec's wandb.project (default runyard)"
    installed = importlib.util.find_spec("wandb") is not None
    if not installed:
        return Check(
            "wandb",
            WARN,
            "wandb is not installed here: workers need it (`pip install 'runyard[train]'`)",
            {"mode": mode},
        )
    if mode == "online":
        return Check("wandb", OK, f"online, project {project} (WANDB_API_KEY is set)", {"mode": mode})
    if mode == "disabled":
        return Check("wandb", OK, "disabled (WANDB_MODE=disabled): runs log to their run dirs only", {"mode": mode})
    reason = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no WANDB_API_KEY"
    return Check(
        "wandb",
        OK,
        f"offline ({reason}): runs are saved in their run dirs; `runyard status` prints the `wandb sync` "
        "commands that upload them",
        {"mode": mode},
    )


def check_data(
    data_dir: Path | None,
    dataset: str,
    sample: int | None = None,
    progress: Callable[[Sequence[str]], Iterable[str]] | None = None,
) -> Check:
    """The dataset's layout, with images per class, and every image decoded (or `sample` of them).

    A broken layout is one line naming the fix; undecodable images are listed by path.
    `progress` wraps the paths being decoded (a progress bar).
    """
    from trainer.data import DataError, class_name, scan_image_folder, scan_mask_dataset

    if data_dir is None:
        default = Path(ExperimentSpec.model_fields["data_dir"].default)
        if not default.exists():
            return Check("data", SKIP, f"no dataset checked: pass --data-dir DIR ({default} does not exist here)")
        data_dir = default
    if not data_dir.is_dir():
        return Check("data", FAIL, f"{data_dir} is not a directory: pass the dataset's directory with --data-dir")
    try:
        if dataset == "image_folder":
            samples, class_names = scan_image_folder(data_dir)
        else:
            samples = scan_mask_dataset(data_dir)
            class_names = [class_name(label) for label in range(18)]
    except DataError as error:
        message = str(error)
        if "make-demo-data" not in message:
            message += " (expected layout: see `runyard make-demo-data --help`)"
        return Check("data", FAIL, f"{message}")
    except OSError as error:
        return Check("data", FAIL, f"cannot read {data_dir} ({error.strerror}): check the path and its permissions")
    counts = Counter(item.label for item in samples)
    per_class = {name: counts.get(label, 0) for label, name in enumerate(class_names)}
    profiles = len({item.profile for item in samples})
    empty = [name for name, count in per_class.items() if count == 0]
    data = {"data_dir": str(data_dir), "dataset": dataset, "images": len(samples), "per_class": per_class}
    summary = f"{data_dir} ({dataset}): {len(samples)} images, {profiles} profiles, {len(per_class) - len(empty)}/"
    summary += f"{len(per_class)} classes with images"
    decoded = decode_check([item.path for item in samples], sample, progress)
    if decoded is None:
        return Check("data", WARN, f"{summary}; images not decoded: Pillow is missing (pip install 'runyard[train]')")
    checked, unreadable = decoded
    data |= {"decoded": checked, "unreadable": unreadable}
    summary += f", {checked} decoded" + (f" (--sample {sample})" if checked < len(samples) else "")
    if unreadable:
        shown = [f"{path} ({reason})" for path, reason in list(unreadable.items())[:10]]
        more = f"; and {len(unreadable) - len(shown)} more" if len(unreadable) > len(shown) else ""
        return Check(
            "data",
            FAIL,
            f"{summary}; {len(unreadable)} cannot be decoded: {'; '.join(shown)}{more}. Replace or delete them, "
            "or train with bad_images: skip (each is then logged and counted in the result)",
            data,
        )
    if empty:
        return Check("data", WARN, f"{summary}; none for {', '.join(empty)}: macro F1 counts those classes", data)
    return Check("data", OK, summary, data)


def decode_check(
    paths: list[str], sample: int | None, progress: Callable[[Sequence[str]], Iterable[str]] | None = None
) -> tuple[int, dict[str, str]] | None:
    """(images decoded, path -> reason for those that fail); None where Pillow is not installed."""
    if importlib.util.find_spec("PIL") is None:
        return None
    from trainer.image_files import unreadable_reason

    chosen = sorted(random.Random(0).sample(paths, sample)) if sample is not None and sample < len(paths) else paths
    unreadable = {}
    for path in progress(chosen) if progress is not None else chosen:
        reason = unreadable_reason(path)
        if reason is not None:
            unreadable[path] = reason
    return len(chosen), unreadable


def run_checks(
    data_dir: Path | None,
    dataset: str,
    sample: int | None = None,
    progress: Callable[[Sequence[str]], Iterable[str]] | None = None,
) -> list[Check]:
    """Every check, in the order a user would fix them."""
    redis_check, connection = check_redis()
    checks = [redis_check]
    if connection is None:
        checks += [Check(name, SKIP, "needs Redis") for name in ("aof", "workers")]
    else:
        checks += [check_persistence(connection), check_workers(connection)]
    return [*checks, check_store(), check_gpus(), check_wandb(), check_data(data_dir, dataset, sample, progress)]


def check_store() -> Check:
    """The run store (RUNYARD_STORE) is reachable and writable from this box (a probe file, deleted)."""
    from trainer.store import STORE_ENV, StoreError, display_url, open_store

    try:
        store = open_store()
        if not store.remote:  # nothing to probe (and nothing is created): the runs dir of this box
            message = (
                f"runs stay on this box in {store.root}: set {STORE_ENV} (a shared path or s3://BUCKET/PREFIX) "
                "on every box for runs any box can resume and read"
            )
            return Check("store", OK, message, {"url": display_url(store.url), "remote": False})
        message = store.check()
    except StoreError as error:
        return Check("store", FAIL, str(error))
    return Check("store", OK, message, {"url": display_url(store.url), "remote": True})


def per_class_table(per_class: dict[str, int]) -> Table:
    """Images per class: the mask layout's 18 classes as a mask x (gender, age) grid, else a list."""
    names = list(per_class)
    if all(name.count("/") == 2 for name in names):
        rows = list(dict.fromkeys(name.split("/", 1)[0] for name in names))
        columns = list(dict.fromkeys(name.split("/", 1)[1] for name in names))
        table = Table(title="images per class")
        table.add_column("mask")
        for column in columns:
            table.add_column(escape(column), justify="right")
        for row in rows:
            table.add_row(row, *(_count(per_class.get(f"{row}/{column}", 0)) for column in columns))
        return table
    table = Table(title="images per class")
    table.add_column("class")
    table.add_column("images", justify="right")
    for name, count in per_class.items():
        table.add_row(escape(name), _count(count))
    return table


def _count(count: int) -> str:
    return str(count) if count else "[red]0"


def decoding_progress(paths: Sequence[str]) -> Iterable[str]:
    """`paths`, with a progress bar on stderr while they are decoded."""
    with Progress(
        TextColumn("decoding images"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        yield from bar.track(paths, total=len(paths))


STYLES = {OK: "green", WARN: "yellow", FAIL: "red", SKIP: "bright_black"}


@click.command("doctor", context_settings=CONTEXT)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Dataset to check (the spec's data_dir).  [default: ./data/train if it exists]",
)
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    default=ExperimentSpec.model_fields["dataset"].default,
    show_default=True,
    help="Layout of --data-dir.",
)
@click.option(
    "--sample",
    type=click.IntRange(1, None),
    help="Decode only this many of the dataset's images, picked at random, for a quick look.  [default: all]",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def doctor_command(data_dir, dataset, sample, as_json):
    """Check this box: Redis, AOF, workers per box, the run store, GPUs, W&B mode, a dataset's layout and images.

    Each check prints one line; anything not ok says what to do. Exit code 1 when a check
    fails (warnings do not fail).

    \b
    Examples:
      runyard doctor --data-dir /data/mask/train
      runyard doctor --data-dir /data/mask/train --sample 500    # decode 500 images, not all
      REDIS_URL=redis://:PASSWORD@redis-box:6379/0 runyard doctor --json
    """
    checks = run_checks(data_dir, dataset, sample, None if as_json else decoding_progress)
    failed = any(check.status == FAIL for check in checks)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [asdict(check) for check in checks]}, indent=2))
    else:
        out = console()
        for check in checks:
            label = f"[{STYLES[check.status]}]{check.status:<5}[/]"
            out.print(f"{label} {check.name:<8} {escape(check.detail)}", soft_wrap=True, highlight=False)
        data = checks[-1]
        if data.data.get("per_class"):
            out.print(per_class_table(data.data["per_class"]))
        problems = sum(check.status == FAIL for check in checks)
        warnings = sum(check.status == WARN for check in checks)
        out.print(f"{problems} problem(s), {warnings} warning(s)" if problems or warnings else "all good")
    sys.exit(1 if failed else 0)

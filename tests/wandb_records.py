"""Read a W&B transaction log (run-<id>.wandb) back with wandb's own protobuf schema.

wandb 0.31 ships no Python reader for offline runs (its reader moved into wandb-core), but the
file format is stable: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-log style
32 KiB blocks of chunks (crc32, length, type) whose payloads are `wandb_internal_pb2.Record`s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER_SIZE = 7
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    records, pending, offset = [], b"", HEADER_SIZE
    while offset + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + CHUNK_HEADER])
        payload = data[offset + CHUNK_HEADER : offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def summarize_run(path: str | Path) -> dict[str, Any]:
    """config, history rows, summary, artifacts and run metadata of one offline run file."""
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    run: dict[str, Any] = {}
    artifacts: list[dict[str, Any]] = []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {
                "id": record.run.run_id,
                "name": record.run.display_name,
                "project": record.run.project,
                "entity": record.run.entity,
                "group": record.run.run_group,
                "job_type": record.run.job_type,
                "tags": list(record.run.tags),
            }
            for item in record.run.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            artifacts.append(
                {
                    "name": record.artifact.name,
                    "type": record.artifact.type,
                    "aliases": list(record.artifact.aliases),
                    "metadata": json.loads(record.artifact.metadata or "{}"),
                    "files": {entry.path: entry.size for entry in record.artifact.manifest.contents},
                }
            )
    return {"run": run, "config": config, "history": history, "summary": summary, "artifacts": artifacts}


def find_run_file(directory: str | Path) -> Path:
    files = sorted(Path(directory).glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {directory}/wandb")
    return files[-1]


def find_run_files(directory: str | Path) -> list[Path]:
    """Every offline run file under a run dir, oldest first (a resumed job writes one per attempt)."""
    return sorted(Path(directory).glob("wandb/offline-run-*/run-*.wandb"))


def synced_history(directory: str | Path) -> list[dict[str, Any]]:
    """The history W&B ends up with once every offline attempt of a run is synced, in order.

    Each attempt of a resumed job writes its own offline file under the same run id; W&B keeps a
    run's steps increasing, so a row whose step is not past the last kept one is dropped.
    """
    kept: list[dict[str, Any]] = []
    for path in find_run_files(directory):
        for row in summarize_run(path)["history"]:
            if not kept or row["_step"] > kept[-1]["_step"]:
                kept.append(row)
    return kept

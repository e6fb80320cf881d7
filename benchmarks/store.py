"""The run store's cost: epoch time with RUNYARD_STORE (a shared dir, S3) over epoch time without.

Trains efficientnet_b2 (pretrained: false) with Adam, whose checkpoint is about 110 MB (weights
plus two Adam moments), on generated mask-status data; each epoch's checkpoint (and, when the
validation F1 improved, best.pt) is uploaded by the run store's background thread while the next
epoch trains. Goal: ratio <= 1.03. The S3 store is moto's standalone server (the only S3 server
installable here) in its own process on 127.0.0.1, reached through s3fs.

    python benchmarks/store.py --epochs 4 --profiles 30 --resize 96x96
    python benchmarks/store.py --stores none,s3 --s3-url s3://team-runs/bench   # a real bucket

The first epoch (model warm-up, and no upload of its own to overlap) is left out of the mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.demo_data import make_demo_dataset  # noqa: E402
from trainer.spec import load_spec  # noqa: E402
from trainer.train import train  # noqa: E402

MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """moto's S3 server in its own process (its CPU is not the trainer's); yields its endpoint."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(10)


def epoch_seconds(spec: dict, home: Path, store_env: dict[str, str]) -> dict:
    """Train `spec` with these store variables; the epochs' seconds and the checkpoint's size."""
    saved = {key: os.environ.get(key) for key in ("RUNYARD_HOME", "RUNYARD_STORE", *MOTO_KEYS, "AWS_ENDPOINT_URL")}
    os.environ["RUNYARD_HOME"] = str(home)
    os.environ.pop("RUNYARD_STORE", None)
    os.environ.update(store_env)
    seconds = []
    try:
        started = time.perf_counter()
        result = train(load_spec(spec), on_epoch=lambda report: seconds.append(report.seconds))
        total = time.perf_counter() - started
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    checkpoint = Path(result["run_dir"]) / "checkpoints" / "last.pt"
    return {
        "epochs_s": [round(value, 2) for value in seconds],
        "mean_s": statistics.fmean(seconds[1:]),
        "total_s": round(total, 2),
        "checkpoint_mb": round(checkpoint.stat().st_size / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--profiles", type=int, default=30)
    parser.add_argument("--resize", default="96x96")
    parser.add_argument("--model", default="efficientnet_b2")
    parser.add_argument("--stores", default="none,shared-dir,s3")
    parser.add_argument(
        "--s3-url",
        help="A real bucket (s3://BUCKET/PREFIX, with this shell's AWS_* variables) instead of a local moto server.",
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="runyard-store-bench-"))
    make_demo_dataset(work / "data", profiles=args.profiles, eval_profiles=2, image_size=(128, 96), seed=0)
    spec = {
        "model": args.model,
        "pretrained": False,
        "optimizer": "adam",
        "data_dir": str(work / "data" / "train"),
        "resize": args.resize,
        "epochs": args.epochs,
        "batch_size": 32,
        "augmentation": "base",
        "pictures": False,
    }
    results = {}
    for kind in args.stores.split(","):
        home = work / f"home-{kind}"
        run = spec | {"run_name": f"bench-{kind}"}
        if kind == "none":
            results[kind] = epoch_seconds(run, home, {})
        elif kind == "shared-dir":
            (work / "shared").mkdir(exist_ok=True)
            results[kind] = epoch_seconds(run, home, {"RUNYARD_STORE": str(work / "shared" / "runyard")})
        elif args.s3_url:
            results[kind] = epoch_seconds(run, home, {"RUNYARD_STORE": args.s3_url})
        else:
            with moto_server() as endpoint:
                import boto3

                boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    aws_access_key_id="bench",
                    aws_secret_access_key="bench",
                    region_name="us-east-1",
                ).create_bucket(Bucket="bench")
                env = {"RUNYARD_STORE": "s3://bench/runs", "AWS_ENDPOINT_URL": endpoint} | MOTO_KEYS
                results[kind] = epoch_seconds(run, home, env)
        print(kind, json.dumps(results[kind]), flush=True)
    baseline = results.get("none", {}).get("mean_s")
    for kind, figures in results.items():
        if baseline and kind != "none":
            figures["ratio"] = round(figures["mean_s"] / baseline, 3)
    load = os.getloadavg()
    print(json.dumps({"results": results, "load_average": [round(value, 2) for value in load]}, indent=2))


if __name__ == "__main__":
    main()

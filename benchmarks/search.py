"""schedule-search benchmarks, measured side by side in one run.

1. Publishing a 1,000-point grid (goal: under 2 s): load + validate + claim + pipelined enqueue,
   in-process and as the `python -m schedule_search` command, against one `publish_experiment`
   call per point (what a loop over `publish` would do).
2. The same grid (loss x lr, 12 points) run to the end and with each early-stopping setting in
   VARIANTS (`hyperband` is W&B's meaning: checks at min_iter * eta**k; `hyperband_brackets` is
   Optuna's bracketed Hyperband), on demo data by one CPU worker: total epochs trained and the
   best validation F1 each found (goal: within 0.01 of the grid's best F1 with <= 50% of its
   epochs; asha, which pauses and promotes instead of stopping: <= 40%). Training is seeded and
   an ASHA run resumes bit-exactly, so a point trains the same in every search until it stops.
3. `--grid folder`: a second grid, fixed before any tuning: lr x weight_decay on a 3-class
   `image_folder` dataset (made from demo photos of another size, 40x40 input) instead of the
   18-class demo layout.

    PYTHONPATH=. python benchmarks/search.py                            # all of it
    PYTHONPATH=. python benchmarks/search.py --publish-only             # part 1 only (seconds)
    PYTHONPATH=. python benchmarks/search.py --variants hyperband_eta2  # part 2, one setting
    PYTHONPATH=. python benchmarks/search.py --no-publish --grid folder --variants grid,hyperband,asha

Everything runs against a private embedded Redis and RUNYARD_HOME in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def publish_benchmark(home: Path, connection, repeats: int) -> dict[str, float]:
    """Seconds to publish a fresh 1,000-point grid, three ways (median of `repeats`)."""
    from publisher.queue import publish_experiment
    from schedule_search.publish import publish_search
    from schedule_search.search import load_search

    path = home / "grid1000.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "grid1000",
                "method": "grid",
                "fixed": {"model": "test_efficientnet", "pretrained": False, "data_dir": str(home), "epochs": 1},
                "parameters": {
                    "lr": {"values": [round(0.0001 * step, 4) for step in range(1, 11)]},
                    "batch_size": {"values": [8, 16, 24, 32, 48, 64, 96, 128, 192, 256]},
                    "seed": {"values": list(range(10))},
                },
            }
        )
    )
    timings: dict[str, list[float]] = {"in_process": [], "republish": [], "command": [], "one_by_one": []}
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    for _ in range(repeats):
        connection.flushall()
        started = time.perf_counter()
        search = load_search(path)
        report = publish_search(connection, search, context={})
        timings["in_process"].append(time.perf_counter() - started)
        assert report.enqueued == 1000, report.counts()
        started = time.perf_counter()
        assert publish_search(connection, load_search(path), context={}).enqueued == 0
        timings["republish"].append(time.perf_counter() - started)

        connection.flushall()
        started = time.perf_counter()
        command = [sys.executable, "-m", "schedule_search", str(path), "--json"]
        printed = json.loads(subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout)
        timings["command"].append(time.perf_counter() - started)
        assert printed["enqueued"] == 1000

        connection.flushall()
        specs = [point.spec for point in load_search(path).points]
        started = time.perf_counter()
        for spec in specs:
            publish_experiment(connection, spec, context={})
        timings["one_by_one"].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def run_search(home: Path, env: dict[str, str], name: str, document: dict) -> dict:
    """Publish a search, run it with one burst CPU worker, and sum up its runs."""
    from worker.connection import connect
    from worker.results import get_run, leaderboard

    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document | {"name": name}, sort_keys=False))
    subprocess.run([sys.executable, "-m", "schedule_search", str(path)], env=env, check=True, capture_output=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "worker", "--cpu", "--burst"], env=env, check=True, capture_output=True, timeout=7200
    )
    seconds = time.perf_counter() - started
    rows = leaderboard(connect(), limit=10_000, search=name)
    records = [get_run(connect(), row["run_name"]) for row in rows]
    return {
        "points": len(records),
        "epochs": sum(record["epochs_completed"] for record in records),
        "best_f1": max(record["best"]["val_f1"] for record in records),
        "best_run": rows[0]["params"],
        "pruned": sum(record.get("status") == "pruned" for record in records),
        "paused": sum(record.get("status") == "paused" for record in records),
        "seconds": seconds,
    }


# Early-stopping settings compared with the full grid. eta 3 is W&B's default; eta 2 keeps half
# of the runs at each check instead of a third.
VARIANTS = {
    "hyperband": {"type": "hyperband", "min_iter": 1, "eta": 3},
    "hyperband_brackets": {"type": "hyperband_brackets", "min_iter": 1, "eta": 3},
    "hyperband_eta2": {"type": "hyperband", "min_iter": 1, "eta": 2},
    "asha": {"type": "asha", "min_iter": 1, "eta": 3},
    "asha_eta2": {"type": "asha", "min_iter": 1, "eta": 2},
}
GOAL_SHARE = {"asha": 0.4, "asha_eta2": 0.4}  # of the grid's epochs; 0.5 for the others


def folder_grid(home: Path, epochs: int, profiles: int) -> dict:
    """The second grid: lr x weight_decay on a 3-class ImageFolder (wear / incorrect / not_wear)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import make_image_folder
    from trainer.demo_data import make_demo_dataset

    demo = home / "demo-80x60"
    make_demo_dataset(demo, profiles=profiles, eval_profiles=6, image_size=(80, 60), seed=1)
    folder = make_image_folder(demo, home / "folder")
    return {
        "method": "grid",
        "fixed": {
            "model": "test_efficientnet",
            "pretrained": False,
            "dataset": "image_folder",
            "data_dir": str(folder),
            "resize": "40x40",
            "epochs": epochs,
            "batch_size": 16,
            "valid_batch_size": 256,
            "augmentation": "base",
            "scheduler": "cosine",
        },
        "parameters": {
            "lr": {"values": [1e-3, 3e-3, 1e-2]},
            "weight_decay": {"values": [0.0, 1e-3, 1e-1]},
        },
    }


def pruning_benchmark(
    home: Path, env: dict[str, str], epochs: int, profiles: int, variants: list[str], grid_name: str = "demo"
) -> dict[str, dict]:
    from trainer.demo_data import make_demo_dataset

    if grid_name == "folder":
        grid = folder_grid(home, epochs, profiles)
        return {
            variant: run_search(
                home,
                env,
                f"folder-{variant.replace('_', '-')}",
                grid if variant == "grid" else grid | {"early_terminate": VARIANTS[variant]},
            )
            for variant in variants
        }

    data = home / "demo"
    make_demo_dataset(data, profiles=profiles, eval_profiles=6, image_size=(64, 48), seed=0)
    grid = {
        "method": "grid",
        "fixed": {
            "model": "test_efficientnet",
            "pretrained": False,
            "data_dir": str(data / "train"),
            "resize": "32x32",
            "epochs": epochs,
            "batch_size": 32,
            "valid_batch_size": 256,
            "augmentation": "base",
            "scheduler": "cosine",
        },
        "parameters": {
            "loss": {"values": ["cross_entropy", "focal"]},  # the outer loop: points 1-6 are cross_entropy
            "lr": {"values": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.3]},
        },
    }
    results = {}
    for variant in variants:
        document = grid if variant == "grid" else grid | {"early_terminate": VARIANTS[variant]}
        results[variant] = run_search(home, env, f"bench-{variant.replace('_', '-')}", document)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--publish-only", action="store_true", help="only time the 1,000-point publish")
    parser.add_argument("--no-publish", action="store_true", help="skip the 1,000-point publish timings")
    parser.add_argument("--grid", choices=("demo", "folder"), default="demo", help="which grid to search")
    parser.add_argument("--repeats", type=int, default=3, help="publish timings: median of this many")
    parser.add_argument("--epochs", type=int, default=9, help="epochs per grid point")
    parser.add_argument("--profiles", type=int, default=48, help="demo data profiles (7 images each)")
    parser.add_argument(
        "--variants",
        default="grid," + ",".join(VARIANTS),
        help="comma list of: grid, " + ", ".join(VARIANTS),
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="runyard-bench-") as directory:
        home = Path(directory)
        os.environ.pop("REDIS_URL", None)
        os.environ["RUNYARD_HOME"] = str(home)
        os.environ["WANDB_MODE"] = "disabled"  # W&B's cost is the same with and without pruning
        from worker.connection import connect, embedded_server

        server = embedded_server()
        os.environ["REDIS_URL"] = server.ensure_running(announce=False)
        try:
            connection = connect()
            timings = {} if args.no_publish else publish_benchmark(home, connection, args.repeats)
            if timings:
                print(f"1,000-point grid publish (median of {args.repeats}):")
                print(f"  in-process load+validate+claim+enqueue: {timings['in_process']:.3f} s")
                print(f"  `python -m schedule_search` wall time:  {timings['command']:.3f} s")
                print(f"  publishing it again (0 enqueued):       {timings['republish']:.3f} s")
                print(
                    f"  one publish_experiment per point:       {timings['one_by_one']:.3f} s "
                    f"({timings['one_by_one'] / timings['in_process']:.1f}x the search's time)"
                )
            if args.publish_only:
                return 0
            connection.flushall()
            env = os.environ | {"PYTHONPATH": str(ROOT)}
            variants = [variant.strip() for variant in args.variants.split(",") if variant.strip()]
            results = pruning_benchmark(home, env, args.epochs, args.profiles, variants, args.grid)
        finally:
            server.stop()
    points = 9 if args.grid == "folder" else 12
    grid = results.get("grid") or {"points": points, "epochs": points * args.epochs, "best_f1": float("nan")}
    print(f"\n{args.grid} grid ({grid['points']} points x {args.epochs} epochs, {args.profiles} profiles), one worker:")
    print(
        f"  {'search':<20} {'epochs':>7} {'share':>7} {'best F1':>8} {'vs grid':>8} {'pruned':>7} {'paused':>7}"
        f" {'wall s':>7}"
    )
    for name, result in results.items():
        share = result["epochs"] / grid["epochs"]
        delta = result["best_f1"] - grid["best_f1"]
        print(
            f"  {name:<20} {result['epochs']:>7} {share:>7.0%} {result['best_f1']:>8.4f} {delta:>+8.4f}"
            f" {result['pruned']:>7} {result['paused']:>7} {result['seconds']:>7.0f}"
        )
    if "grid" not in results:
        print("  (no grid in this run: compare with a run that has one; training is seeded, so points train the same)")
        return 0
    for name in [variant for variant in results if variant != "grid"]:
        result = results[name]
        share = GOAL_SHARE.get(name, 0.5)
        met = result["epochs"] <= grid["epochs"] * share and result["best_f1"] >= grid["best_f1"] - 0.01
        verdict = "met" if met else "NOT met"
        print(f"  {name}: goal (within 0.01 of the grid's best F1 with <= {share:.0%} of its epochs) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

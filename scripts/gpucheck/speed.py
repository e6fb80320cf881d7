"""Speed on the device: throughput.py's --preset gpu, AMP dtypes, torch.compile."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from typing import Any

from gpucheck.context import ROOT, Context, log, tiny_spec
from gpucheck.processes import child_env, tail


def check_throughput(ctx: Context) -> dict[str, Any]:
    """benchmarks/throughput.py as it is documented (--preset gpu), its JSON kept whole."""
    quick = ["--epochs", "2", "--model-steps", "2", "--seed-batches", "2", "--decode-images", "5"]
    preset = ["--preset", "cpu", *quick] if ctx.quick or not ctx.cuda else ["--preset", "gpu"]
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), *preset]
    answer = subprocess.run(
        [*command, "--data-dir", str(ctx.data_dir), "--json"], capture_output=True, text=True, env=child_env()
    )
    sys.stderr.write(answer.stderr)
    if answer.returncode != 0:
        raise RuntimeError(f"throughput.py exited {answer.returncode}: {tail(answer.stderr)}")
    results = json.loads(answer.stdout)
    (ctx.work / "throughput.json").write_text(json.dumps(results, indent=2))
    ratio = results["ratio_c2_over_a"]
    judged = ctx.cuda and not ctx.quick  # two timed steps of a tiny model on a busy CPU prove nothing
    met = ratio >= 0.9 or not judged
    return {
        "passed": met,
        "detail": "" if met else f"trainer/model-bound {ratio:.3f} < 0.9",
        "headline": f"model-bound {results['a_model_bound_img_s']} img/s, trainer epochs 2+ "
        f"{results['c_epoch_2_plus_img_s']} ({ratio:.2f}), seed-style {results['b_seed_pipeline_img_s']} img/s",
        "figures": {
            key: results[key]
            for key in (
                "setup",
                "machine",
                "a_model_bound_img_s",
                "c_epoch_2_plus_img_s",
                "ratio_c2_over_a",
                "b_seed_pipeline_img_s",
                "ratio_c2_over_b",
            )
        },
    }


def measure_variants(ctx: Context, variants: dict[str, Any], steps: int) -> dict[str, dict[str, Any]]:
    """Model-bound img/s (throughput.py's measure) and trainer img/s of epoch 2, per compute plan."""
    import gc
    import math

    import torch

    throughput = load_throughput_module()
    from contracts.spec import load_spec
    from trainer.train import Trainer

    preset = throughput.PRESETS["cpu" if ctx.quick or not ctx.cuda else "gpu"]
    spec = load_spec(
        tiny_spec(ctx, "variant", epochs=2, image_cache="memory")
        | ({key: value for key, value in preset.items() if key != "device"} if not ctx.quick else {})
    )
    measured: dict[str, dict[str, Any]] = {}
    for name, plan in variants.items():
        trainer = None
        try:
            trainer = Trainer(spec.model_copy(update={"run_name": f"variant-{name}"}), compute_plan=plan)
            started = time.perf_counter()
            model_bound = throughput.measure_model_bound(trainer, steps)
            first_steps = time.perf_counter() - started
            trainer.fit()
            last = trainer.progress.history[-1]
            measured[name] = {
                "model_bound_img_s": round(model_bound, 1),
                "trainer_epoch_2_img_s": round(throughput.usable_images(trainer) / last.train_seconds, 1),
                "train_loss": round(last.train_loss, 4),
                "finite_loss": math.isfinite(last.train_loss),
                "model_bound_seconds_incl_warmup": round(first_steps, 1),
                "grad_scaler": trainer.autocast.scaler.is_enabled(),
            }
        except Exception as error:  # one variant's failure (no triton, no fp16 on this CPU) is a figure too
            measured[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        trainer = None  # the next variant starts with the GPU (and the loader workers) free
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log(f"    {name}: {json.dumps(measured[name])}")
        ctx.save_partial(measured)  # what a section stopped on its budget still reports
    return measured


def check_amp(ctx: Context) -> dict[str, Any]:
    """bf16 against fp16 (GradScaler) against fp32, channels_last on CUDA."""
    import torch

    from trainer.compute import ComputePlan

    variants = {
        dtype: ComputePlan(channels_last=ctx.cuda, amp_dtype=value, cudnn_benchmark=ctx.cuda)
        for dtype, value in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None))
    }
    measured = measure_variants(ctx, variants, 2 if ctx.quick else 20)
    failed = [name for name, figures in measured.items() if not figures.get("finite_loss")]
    return {
        "passed": not failed,
        "detail": f"failed or not finite: {', '.join(failed)}" if failed else "",
        "headline": ", ".join(
            f"{name} {figures.get('model_bound_img_s', 'error')}/{figures.get('trainer_epoch_2_img_s', '-')}"
            for name, figures in measured.items()
        )
        + " img/s (model-bound/trainer)",
        "figures": measured,
    }


def check_compile(ctx: Context) -> dict[str, Any]:
    """torch.compile off against on, with the run's own compute plan otherwise."""
    import torch

    from trainer.compute import ComputePlan, cuda_amp_dtype

    dtype = cuda_amp_dtype() if ctx.cuda else None
    variants = {
        label: ComputePlan(channels_last=ctx.cuda, amp_dtype=dtype, compile=flag, cudnn_benchmark=ctx.cuda)
        for label, flag in (("off", False), ("on", True))
    }
    measured = measure_variants(ctx, variants, 2 if ctx.quick else 20)
    off, on = measured["off"], measured["on"]
    passed = all(figures.get("finite_loss") for figures in measured.values())
    speedup = (
        round(on["model_bound_img_s"] / off["model_bound_img_s"], 2) if passed and off["model_bound_img_s"] else None
    )
    return {
        "passed": passed,
        "detail": "" if passed else on.get("error", off.get("error", "")),
        "headline": f"off {off.get('model_bound_img_s', 'error')}, on {on.get('model_bound_img_s', 'error')} img/s "
        f"model-bound (x{speedup}); compile + warm-up {on.get('model_bound_seconds_incl_warmup', '-')} s",
        "figures": measured | {"speedup": speedup, "torch": torch.__version__},
    }


def load_throughput_module():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Correctness on the device: augmentation, resume, and checkpoints read on the CPU."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from typing import Any

from gpucheck.context import MEAN, STD, Context, tiny_spec
from gpucheck.processes import run_cli, tail


def check_augment(ctx: Context) -> dict[str, Any]:
    """Each random op, and the recipe, on the device against the CPU with the same draws."""
    import torch

    from trainer import augment
    from trainer.image_cache import decode

    size = (64, 48) if ctx.quick else (260, 260)
    recipe = augment.train_recipe("imgaug", size, MEAN, STD)
    paths = sorted((ctx.data_dir / "train" / "images").glob("*/*.jpg"))[:32]
    raw = torch.stack([recipe.prefix(decode(str(path))) for path in paths])
    device = torch.device(ctx.device)
    batch = raw.float().div(255)
    ops: dict[str, float] = {}
    for op in recipe.ops:
        torch.manual_seed(1)
        params = op.draw(len(batch))
        on_device_params = {key: value.to(device) for key, value in params.items()}
        if isinstance(op, augment.RandomGaussianNoise):
            # The noise itself comes from the device's generator: compare its per-image strength
            # (on mid-grey, where clamping to 0..1 cuts nothing off).
            added = op.apply(torch.full_like(batch, 0.5).to(device), on_device_params).cpu() - 0.5
            drawn = params["std"]
            strong = drawn > 2
            error = ((added.flatten(1).std(dim=1) * 255 - drawn).abs() / drawn)[strong]
            ops["noise_std_relative_error"] = float(error.max())
            continue
        on_cpu = op.apply(batch.clone(), params)
        on_device = op.apply(batch.to(device), on_device_params).cpu()
        ops[f"{type(op).__name__}_max_abs_diff"] = float((on_cpu - on_device).abs().max())
    # The whole recipe (noise aside) as the trainer runs it, drawing from the same seed on each side.
    without_noise = augment.Recipe(
        recipe.prefix, [op for op in recipe.ops if not isinstance(op, augment.RandomGaussianNoise)], MEAN, STD
    )
    draws: list[list[Any]] = []
    outputs = []
    for where in ("cpu", device):
        recorded: list[Any] = []
        for op in without_noise.ops:
            op.draw = recording(op.draw, recorded)
        torch.manual_seed(7)
        outputs.append(without_noise(raw.to(where)).cpu())
        for op in without_noise.ops:
            del op.draw
        draws.append(recorded)
    ops["recipe_without_noise_max_abs_diff"] = float((outputs[0] - outputs[1]).abs().max())
    ops["same_draws_for_the_same_seed"] = draws[0] == draws[1]
    exact = [key for key in ops if key.endswith("_max_abs_diff")]
    failures = [key for key in exact if ops[key] > 1e-3]
    if ops["noise_std_relative_error"] > 0.05:
        failures.append("noise_std_relative_error")
    if not ops["same_draws_for_the_same_seed"]:
        failures.append("same_draws_for_the_same_seed")
    worst = max(ops[key] for key in exact)
    return {
        "passed": not failures,
        "detail": f"failed: {', '.join(failures)}" if failures else "",
        "headline": f"{len(paths)} images at {size[0]}x{size[1]}: max |cpu - {ctx.device}| {worst:.1e}, "
        f"noise strength within {ops['noise_std_relative_error']:.1%}",
        "figures": ops,
    }


def recording(draw: Callable[[int], dict[str, Any]], into: list[Any]) -> Callable[[int], dict[str, Any]]:
    """`draw`, also appending what it drew to `into`."""

    def draw_and_record(count: int) -> dict[str, Any]:
        params = draw(count)
        into.append({key: value.tolist() for key, value in params.items()})
        return params

    return draw_and_record


def check_resume(ctx: Context) -> dict[str, Any]:
    """Deterministic mode: a run stopped in epoch 2 and resumed ends as an uninterrupted run does."""
    import torch

    from contracts.spec import load_spec
    from trainer.checkpoint import checkpoint_path, load_checkpoint
    from trainer.interrupt import SHUTDOWN, TrainingInterrupted
    from trainer.train import train

    def spec(name: str):
        return load_spec(tiny_spec(ctx, name, epochs=2, deterministic=True))

    straight = train(spec("straight"))
    finished = {"epochs": 0, "asked": 0}

    def stop_in_epoch_2(**_where) -> str | None:
        if finished["epochs"] >= 1:
            finished["asked"] += 1
            return SHUTDOWN if finished["asked"] == 3 else None
        return None

    def count_epochs(report) -> None:
        finished["epochs"] = report.epoch

    try:
        train(spec("stopped"), on_epoch=count_epochs, should_stop=stop_in_epoch_2)
        interrupted = False
    except TrainingInterrupted:
        interrupted = True
    resumed = train(spec("stopped"), resume=True)
    runs = ctx.work / "runs"

    def val_f1(name: str) -> list[str]:
        with open(runs / name / "metrics.csv") as handle:
            return [row["val_f1"] for row in csv.DictReader(handle)]

    a, b = load_checkpoint(checkpoint_path(runs / "straight")), load_checkpoint(checkpoint_path(runs / "stopped"))
    differing = [name for name, tensor in a["model"].items() if not torch.equal(tensor, b["model"][name])]
    largest = max(
        (float((a["model"][name].float() - b["model"][name].float()).abs().max()) for name in differing), default=0.0
    )
    same_history = val_f1("straight") == val_f1("stopped")
    passed = interrupted and resumed["resumed_from_epoch"] == 1 and same_history and not differing
    return {
        "passed": passed,
        "detail": ""
        if passed
        else f"interrupted={interrupted}, same history={same_history}, "
        f"{len(differing)} tensors differ (max {largest:.2e})",
        "headline": f"val F1 by epoch {shorten(val_f1('straight'))} straight, {shorten(val_f1('stopped'))} "
        f"resumed; {len(differing)} weight tensors differ",
        "figures": {
            "interrupted_in_epoch_2": interrupted,
            "resumed_from_epoch": resumed["resumed_from_epoch"],
            "straight_val_f1": val_f1("straight"),
            "resumed_val_f1": val_f1("stopped"),
            "weight_tensors_differing": len(differing),
            "largest_weight_difference": largest,
            "device": straight["device"],
        },
    }


def shorten(values: list[str]) -> str:
    return "/".join(f"{float(value):.4f}" for value in values)


def check_checkpoint(ctx: Context) -> dict[str, Any]:
    """Train on the device (AMP, channels_last on CUDA), then `runyard infer` with CUDA hidden."""
    from contracts.spec import load_spec
    from trainer.train import train

    result = train(load_spec(tiny_spec(ctx, "written-on-device", epochs=1)))
    figures: dict[str, Any] = {"trained_on": result["device"]}
    submissions = {}
    for where in ("cpu", "cuda") if ctx.cuda else ("cpu",):
        output = ctx.work / f"submission-{where}.csv"
        env = {"CUDA_VISIBLE_DEVICES": ""} if where == "cpu" else {}
        answer = run_cli(
            "runyard",
            "infer",
            result["run_dir"],
            "--eval-dir",
            str(ctx.data_dir / "eval"),
            "--device",
            where,
            "-o",
            str(output),
            "--json",
            env=env,
            timeout=120,
        )
        if answer.returncode != 0:
            raise RuntimeError(f"runyard infer --device {where} exited {answer.returncode}: {tail(answer.stderr)}")
        figures[f"infer_{where}"] = json.loads(answer.stdout)
        with open(output) as handle:
            submissions[where] = [row["ans"] for row in csv.DictReader(handle)]
    headline = f"trained on {result['device']}, inferred on the CPU: {len(submissions['cpu'])} predictions"
    if "cuda" in submissions:
        agree = sum(a == b for a, b in zip(submissions["cpu"], submissions["cuda"], strict=True))
        figures["cpu_cuda_agreement"] = round(agree / len(submissions["cpu"]), 4)
        headline += f", {figures['cpu_cuda_agreement']:.1%} the same as on CUDA"
    passed = bool(submissions["cpu"]) and figures.get("cpu_cuda_agreement", 1.0) >= 0.98
    return {
        "passed": passed,
        "detail": "" if passed else "CPU and CUDA predictions disagree",
        "headline": headline,
        "figures": figures,
    }

"""Throughput: does the model wait for data? Same model, batch, image size and data, side by side.

Measured in one run, in this order:
  (a) model-bound img/s: runyard's train step (its compute plan: channels_last and AMP on CUDA)
      fed random tensors already on the device: the limit no input pipeline can pass (measured
      before (c) and after each of its epochs; the median is the limit);
  (b) the seed's pipeline img/s: PIL decode, per-image augmentation of the full photo on the CPU
      (torchvision v2, one call per image), fp32 model, the same DataLoader workers (a reference
      loop written here, as the seed trained);
  (c) runyard's trainer (trainer.train.Trainer.fit, image cache in memory): img/s of the training
      pass in epoch 1 (images decoded as they are first read) and epochs 2+ (read from the cache),
      and how long the loop waited for batches in each;
  (d) the data pipeline alone, in one process: seconds to load (decode, or read the cache) and to
      augment one epoch's batches, epoch 1 against epoch 2;
  (e) decoding alone: PIL against torchvision's decode_image (libjpeg-turbo), each with the resize.
  (f) drift: a small batch (test_resnet at 64x48, batch 4, no image cache, one torch thread) for
      8+ epochs: the last epoch's img/s over the second's. Denormal floats made CPU training slow
      down epoch after epoch (issue 16); `--denormals keep` turns the trainer's flush off to show it.
Goals (issue 6): c/a >= 0.9 from epoch 2 on; c/b >= 3; epoch-2 data time >= 5x less than epoch 1.
Goal (issue 16): last epoch / second epoch >= 0.95 for (c) and (f).

    python benchmarks/throughput.py --data-dir /tmp/demo-512 --json         # CPU: test_efficientnet
    python benchmarks/throughput.py --preset gpu --data-dir /tmp/demo-512   # CUDA: efficientnet_b2
    python benchmarks/throughput.py --only-drift --drift-batch 1 --data-dir /tmp/demo-512   # (f) alone

The data dir is generated (`runyard make-demo-data DIR --image-size 512x384`) when it has no
train/train.csv. W&B is off; runs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS: dict[str, dict[str, Any]] = {
    # A tiny timm model at the demo's 4:3 size: on a CPU even it is compute-bound at ~100 img/s.
    "cpu": {"model": "test_efficientnet", "resize": (128, 96), "batch_size": 32, "amp": False, "device": "cpu"},
    "gpu": {"model": "efficientnet_b2", "resize": (260, 260), "batch_size": 64, "amp": True, "device": "cuda"},
}
SEED_BLUR_KERNEL = 19  # covers sigma 3 (3 sigma each side), as imgaug's blur at the seed's largest sigma


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model, size, batch, AMP, device")
    parser.add_argument("--data-dir", type=Path, help="demo data at 512x384 (generated when missing)")
    parser.add_argument("--epochs", type=int, default=8, help="trainer epochs for (c), at least 2")
    parser.add_argument("--drift-epochs", type=int, default=8, help="epochs of the small-batch run (f), at least 2")
    parser.add_argument("--drift-batch", type=int, default=4, help="batch size of (f)")
    parser.add_argument("--denormals", choices=["flush", "keep"], default="flush", help="keep: undo the flush in (f)")
    parser.add_argument("--only-drift", action="store_true", help="run (f) alone")
    parser.add_argument("--model-steps", type=int, default=20, help="timed steps for (a)")
    parser.add_argument("--seed-batches", type=int, default=12, help="timed batches for (b)")
    parser.add_argument("--decode-images", type=int, default=150, help="images timed for (e)")
    parser.add_argument("--augmentation", default="imgaug", help="runyard recipe; (b) always runs the seed's")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.epochs < 2 or args.drift_epochs < 2:
        parser.error("--epochs and --drift-epochs must be at least 2 (epoch 2+ is what reads the cache)")

    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from contracts.spec import load_spec
    from trainer.demo_data import make_demo_dataset
    from trainer.train import Trainer

    preset = PRESETS[args.preset]
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--preset gpu needs a CUDA device; none is visible")
    work = Path(tempfile.mkdtemp(prefix="runyard-throughput-"))
    data_dir = args.data_dir or work / "demo-data"
    if not (data_dir / "train" / "train.csv").exists():
        log(f"generating demo data at 512x384 into {data_dir} ...")
        make_demo_dataset(data_dir, image_size=(512, 384))
    spec = load_spec(
        {
            **preset,
            "pretrained": False,
            "data_dir": str(data_dir / "train"),
            "epochs": args.epochs,
            "valid_batch_size": 256,
            "lr": 1e-3,
            "augmentation": args.augmentation,
            "image_cache": "memory",
            "pictures": False,
            "output_dir": str(work / "runs"),
        }
    )
    os.environ["RUNYARD_HOME"] = str(work / "home")
    if args.only_drift:
        drift = measure_drift(spec, args, torch)
        print(json.dumps(drift, indent=2) if args.json else drift_text(drift))
        return 0

    trainer = Trainer(spec.model_copy(update={"run_name": "throughput"}))
    setup = {
        "preset": args.preset,
        "model": spec.model,
        "image_size": list(spec.resize),
        "batch_size": spec.batch_size,
        "augmentation": spec.augmentation,
        "device": str(trainer.device),
        "amp": str(trainer.compute.amp_dtype).replace("torch.", "") if trainer.compute.amp_dtype else "fp32",
        "channels_last": trainer.compute.channels_last,
        "torch_threads": torch.get_num_threads(),
        "loader_workers": trainer.train_loader.num_workers,
        "train_images": len(trainer.train_loader.dataset),
    }
    log(f"setup: {json.dumps(setup)}")

    # (a) is measured before (c), after each of its epochs and after it, with the trainer's
    # workers idle: the box's load drifts, and the median of these is the limit c is held to.
    bound = Trainer(spec.model_copy(update={"run_name": "model-bound"}))
    log("(a) model-bound: train steps on random tensors already on the device ...")
    model_bound = [measure_model_bound(bound, args.model_steps)]
    log(f"    {model_bound[0]:.1f} img/s")
    log("(b) seed-style pipeline: PIL decode + per-image CPU augmentation + fp32 ...")
    seed_style = measure_seed_pipeline(spec, trainer, args.seed_batches)
    log(f"    {seed_style:.1f} img/s")
    log(f"(c) runyard trainer: {args.epochs} epochs, (a) again after each ...")

    def after_epoch(report) -> None:
        model_bound.append(measure_model_bound(bound, args.model_steps))
        rate = usable_images(trainer) / report.train_seconds
        log(
            f"    epoch {report.epoch}: {rate:.1f} img/s (waiting for data {report.data_seconds:.2f} s); "
            f"(a) {model_bound[-1]:.1f} img/s"
        )

    trainer.fit(on_epoch=after_epoch)
    epochs = [
        {
            "epoch": report.epoch,
            "img_s": usable_images(trainer) / report.train_seconds,
            "train_seconds": report.train_seconds,
            "waiting_for_data_seconds": report.data_seconds,
        }
        for report in trainer.progress.history
    ]
    later = epochs[1:]
    epoch_2_plus = sum(epoch["img_s"] for epoch in later) / len(later)
    log("(d) data pipeline alone, one process, epoch 1 (cold cache) and epoch 2 ...")
    pipeline = measure_pipeline(spec, trainer)
    log("(e) decode + resize: PIL against torchvision ...")
    decoding = measure_decoders(trainer, args.decode_images)

    log(f"(f) drift: small batch for {args.drift_epochs} epochs ...")
    drift = measure_drift(spec, args, torch)

    limit = statistics.median(model_bound)
    results = {
        "setup": setup,
        "machine": machine(torch, trainer.device),
        "a_model_bound_img_s": round(limit, 1),
        "a_model_bound_samples_img_s": [round(rate, 1) for rate in model_bound],
        "b_seed_pipeline_img_s": round(seed_style, 1),
        "c_trainer_epochs": [{key: round(value, 3) for key, value in epoch.items()} for epoch in epochs],
        "c_epoch_1_img_s": round(epochs[0]["img_s"], 1),
        "c_epoch_2_plus_img_s": round(epoch_2_plus, 1),
        "ratio_c2_over_a": round(epoch_2_plus / limit, 3),
        "ratio_c1_over_a": round(epochs[0]["img_s"] / limit, 3),
        "ratio_c2_over_b": round(epoch_2_plus / seed_style, 2),
        "ratio_c_last_over_second": round(epochs[-1]["img_s"] / epochs[1]["img_s"], 3),
        "f_drift": drift,
        "d_pipeline": pipeline,
        "e_decode_img_s": decoding,
    }
    print(json.dumps(results, indent=2) if args.json else report_text(results))
    return 0


def measure_drift(spec, args, torch) -> dict[str, Any]:
    """(f): img/s of each epoch of a small-batch CPU run, and the last epoch's over the second's."""
    from trainer.train import Trainer

    small = spec.model_copy(
        update={
            "model": "test_resnet",
            "resize": (64, 48),
            "batch_size": args.drift_batch,
            "epochs": args.drift_epochs,
            "image_cache": "none",
            "amp": False,
            "device": "cpu",
            "run_name": "drift",
        }
    )
    threads = torch.get_num_threads()
    trainer = Trainer(small)
    torch.set_num_threads(1)
    if args.denormals == "keep":
        torch.set_flush_denormal(False)
    rates: list[float] = []
    # Images per CPU-second of this process (training and evaluating): on a shared box the wall
    # clock also measures the neighbours; the CPU time is what denormals inflate.
    cpu_rates: list[float] = []
    cpu_before = [time.process_time()]

    def after_epoch(report) -> None:
        rates.append(usable_images(trainer) / report.train_seconds)
        cpu_now = time.process_time()
        cpu_rates.append(usable_images(trainer) / (cpu_now - cpu_before[0]))
        cpu_before[0] = cpu_now
        log(
            f"    (f) epoch {report.epoch}: {rates[-1]:.1f} img/s ({report.train_seconds:.1f} s), "
            f"{cpu_rates[-1]:.1f} img per CPU-second"
        )

    try:
        trainer.fit(on_epoch=after_epoch)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
    return {
        "model": small.model,
        "image_size": list(small.resize),
        "batch_size": small.batch_size,
        "image_cache": small.image_cache,
        "torch_threads": 1,
        "denormals": args.denormals,
        "train_images": len(trainer.train_loader.dataset),
        "epochs_img_s": [round(rate, 1) for rate in rates],
        "ratio_last_over_second": round(rates[-1] / rates[1], 3),
        "epochs_img_per_cpu_s": [round(rate, 1) for rate in cpu_rates],
        "cpu_ratio_last_over_second": round(cpu_rates[-1] / cpu_rates[1], 3),
        "machine": machine(torch, trainer.device),
    }


def drift_text(drift: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"(f) drift: {drift['model']} at {drift['image_size'][0]}x{drift['image_size'][1]}, "
            f"batch {drift['batch_size']}, image_cache {drift['image_cache']}, {drift['torch_threads']} thread, "
            f"{drift['train_images']} training images, denormals {drift['denormals']}",
            f"    img/s by epoch: {', '.join(str(rate) for rate in drift['epochs_img_s'])}",
            f"    last / second = {drift['ratio_last_over_second']:.3f}   (goal >= 0.95)",
            f"    img per CPU-second by epoch: {', '.join(str(rate) for rate in drift['epochs_img_per_cpu_s'])}",
            f"    last / second (CPU time) = {drift['cpu_ratio_last_over_second']:.3f}   (goal >= 0.95)",
            f"    machine: {json.dumps(drift['machine'])}",
        ]
    )


def usable_images(trainer) -> int:
    """Images one training pass trains on (full batches; a short last group is skipped)."""
    loader = trainer.train_loader
    accumulation = trainer.spec.grad_accum_steps
    return (len(loader) - len(loader) % accumulation) * loader.batch_size


def measure_model_bound(trainer, steps: int) -> float:
    """img/s of the trainer's own step on random batches already on its device."""
    import torch

    from trainer import compute

    spec, device = trainer.spec, trainer.device
    images = torch.randn(spec.batch_size, 3, *spec.resize, device=device)
    images = compute.prepare_input(images, trainer.compute)
    labels = torch.randint(0, trainer.num_classes, (spec.batch_size,), device=device)
    trainer.model.train()

    def step() -> None:
        with trainer.autocast():
            loss = trainer.loss_fn(trainer.forward(images), labels)
        trainer.autocast.scaler.scale(loss).backward()
        trainer.autocast.scaler.step(trainer.optimizer)
        trainer.autocast.scaler.update()
        trainer.optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, cuDNN autotuning, lazy compilation
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * spec.batch_size / (time.perf_counter() - started)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_transform(size: tuple[int, int], mean, std):
    """The seed's ImgaugAugmentation, per image on the full photo: rotate, flip, blur, noise,
    resize, colour jitter, normalise (torchvision v2 standing in for imgaug)."""
    import torch
    from torchvision.transforms import v2

    def noise(image: torch.Tensor) -> torch.Tensor:
        std_dev = float(torch.empty(()).uniform_(0, 0.1))  # imgaug's scale (0, 0.1*255) on 0..1
        return (image + torch.randn_like(image) * std_dev).clamp_(0, 1)

    return v2.Compose(
        [
            v2.RandomRotation(5),
            v2.RandomHorizontalFlip(),
            v2.GaussianBlur(SEED_BLUR_KERNEL, sigma=(0.01, 3.0)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Lambda(noise),
            v2.Resize(list(size), antialias=True),
            v2.ColorJitter(0.1, 0.1, 0.1, 0.1),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class SeedDataset:
    """The seed's dataset: open the JPEG with PIL every time an image is asked for, then augment it."""

    def __init__(self, samples, transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        sample = self.samples[index]
        with Image.open(sample.path) as image:
            pixels = TF.pil_to_tensor(image.convert("RGB"))
        return self.transform(pixels), sample.label


def measure_seed_pipeline(spec, trainer, batches: int) -> float:
    """img/s of the seed-style loop: its DataLoader (same workers as runyard's), fp32, no AMP."""
    from torch.utils.data import DataLoader

    from trainer.losses import create_criterion
    from trainer.models import create_model, normalization
    from trainer.optim import create_optimizer

    device = trainer.device
    model = create_model(spec, trainer.num_classes).to(device)
    mean, std = normalization(model)
    optimizer = create_optimizer(spec, model)
    criterion = create_criterion(spec, trainer.num_classes, trainer.class_counts).to(device)
    samples = trainer.train_loader.dataset.samples
    loader = DataLoader(
        SeedDataset(samples, seed_transform(tuple(spec.resize), mean, std)),
        batch_size=spec.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=trainer.train_loader.num_workers,
        pin_memory=device.type == "cuda",
    )
    model.train()
    timed, started = 0, None
    for index, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index == 0:  # the first batch pays for starting the workers
            synchronize(device)
            started = time.perf_counter()
            continue
        timed += len(labels)
        if index == batches:
            break
    synchronize(device)
    return timed / (time.perf_counter() - started)


def measure_pipeline(spec, trainer) -> dict[str, Any]:
    """Seconds to load and to augment one epoch's training batches, epoch 1 and 2, in this process
    (no workers, no model): what the loader workers (or the GPU, for augmenting) must supply."""
    import torch

    from trainer.loaders import build_loaders, load_samples
    from trainer.models import normalization

    samples, _ = load_samples(spec)
    mean, std = normalization(trainer.model)
    loader, _ = build_loaders(spec.model_copy(update={"num_workers": 0}), samples, mean, std, torch.device("cpu"))
    dataset, recipe = loader.dataset, loader.collate_fn.recipe
    order = list(range(len(dataset) - len(dataset) % spec.batch_size))
    epochs = []
    for _ in range(2):
        load_seconds = augment_seconds = 0.0
        for start in range(0, len(order), spec.batch_size):
            began = time.perf_counter()
            batch = torch.stack([dataset[index][0] for index in order[start : start + spec.batch_size]])
            loaded = time.perf_counter()
            recipe(batch)
            augment_seconds += time.perf_counter() - loaded
            load_seconds += loaded - began
        epochs.append({"load_seconds": round(load_seconds, 3), "augment_seconds": round(augment_seconds, 3)})
    first, second = epochs
    data_1 = first["load_seconds"] + first["augment_seconds"]
    data_2 = second["load_seconds"] + second["augment_seconds"]
    return {
        "images": len(order),
        "epoch_1": first,
        "epoch_2": second,
        "load_ratio_1_over_2": round(first["load_seconds"] / max(second["load_seconds"], 1e-9), 1),
        "data_ratio_1_over_2": round(data_1 / max(data_2, 1e-9), 2),
    }


def measure_decoders(trainer, count: int) -> dict[str, float]:
    """img/s of decode + the recipe's resize for PIL and for torchvision's decoder, one thread."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from trainer.image_cache import decode

    prefix = trainer.train_loader.dataset.prefix
    paths = [sample.path for sample in trainer.train_loader.dataset.samples[:count]]

    def with_pil(path: str):
        with Image.open(path) as image:
            return prefix(TF.pil_to_tensor(image.convert("RGB")))

    rates = {}
    for name, load in (("pil", with_pil), ("torchvision", lambda path: prefix(decode(path)))):
        load(paths[0])
        started = time.perf_counter()
        for path in paths:
            load(path)
        rates[name] = round(len(paths) / (time.perf_counter() - started), 1)
    rates["torchvision_over_pil"] = round(rates["torchvision"] / rates["pil"], 2)
    return rates


def machine(torch, device) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found = {
        "cpu_cores": cores,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(value, 1) for value in os.getloadavg()],
    }
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def report_text(results: dict[str, Any]) -> str:
    setup, pipeline, decoding = results["setup"], results["d_pipeline"], results["e_decode_img_s"]
    first, second = pipeline["epoch_1"], pipeline["epoch_2"]
    lines = [
        f"{setup['model']} at {setup['image_size'][0]}x{setup['image_size'][1]}, batch {setup['batch_size']}, "
        f"{setup['device']} ({setup['amp']}, channels_last={setup['channels_last']}), "
        f"{setup['torch_threads']} torch thread(s), {setup['loader_workers']} loader worker(s), "
        f"{setup['train_images']} training images, recipe {setup['augmentation']}",
        f"(a) model-bound:                {results['a_model_bound_img_s']:8.1f} img/s "
        f"(median of {', '.join(str(rate) for rate in results['a_model_bound_samples_img_s'])})",
        f"(b) seed-style pipeline:        {results['b_seed_pipeline_img_s']:8.1f} img/s",
        f"(c) runyard trainer, epoch 1:   {results['c_epoch_1_img_s']:8.1f} img/s",
        f"(c) runyard trainer, epoch 2+:  {results['c_epoch_2_plus_img_s']:8.1f} img/s",
    ]
    for epoch in results["c_trainer_epochs"]:
        lines.append(
            f"      epoch {epoch['epoch']}: {epoch['img_s']:.1f} img/s, training pass {epoch['train_seconds']:.2f} s, "
            f"waiting for data {epoch['waiting_for_data_seconds']:.2f} s"
        )
    lines += [
        f"c/a (epoch 2+) = {results['ratio_c2_over_a']:.3f}   (goal >= 0.9; epoch 1: {results['ratio_c1_over_a']:.3f})",
        f"c/b (epoch 2+) = {results['ratio_c2_over_b']:.2f}    (goal >= 3)",
        f"(d) pipeline alone, {pipeline['images']} images, one process: "
        f"epoch 1 load {first['load_seconds']:.2f} s + augment {first['augment_seconds']:.2f} s; "
        f"epoch 2 load {second['load_seconds']:.2f} s + augment {second['augment_seconds']:.2f} s",
        f"    load time epoch 1 / epoch 2 = {pipeline['load_ratio_1_over_2']:.1f}x; "
        f"load + augment = {pipeline['data_ratio_1_over_2']:.2f}x   (goal >= 5x)",
        f"(e) decode + resize, one thread: PIL {decoding['pil']:.1f} img/s, "
        f"torchvision {decoding['torchvision']:.1f} img/s ({decoding['torchvision_over_pil']:.2f}x)",
        f"(c) last epoch / second = {results['ratio_c_last_over_second']:.3f}   (goal >= 0.95)",
        drift_text(results["f_drift"]),
        f"machine: {json.dumps(results['machine'])}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

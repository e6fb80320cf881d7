"""Augmentation recipes: batched ops with fresh parameters for every image, inside the stated ranges.

The recipes run on whole batches (torchvision's v2 transforms would draw ONE parameter set per
batch). The ranges below are the seed recipe's (the issue's): rotate +-5 deg, h-flip p=0.5, blur
sigma 0-3 px of a 512-high photo, noise std 0-0.1*255, ColorJitter 0.1. The draws are recorded on
the path that runs in training: the loader's collate function on the CPU, and the device-side
`finish` of a loader planned for CUDA (run here on CPU tensors: the same recipe object).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from contracts.spec import load_spec
from tests.helpers import tiny_spec
from trainer import augment
from trainer.image_cache import decode
from trainer.loaders import build_loaders, load_samples
from trainer.mixing import BatchMixer, cutmix

SIZE = (64, 48)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
COPIES = 300
BLUR_MAX = 3.0 * SIZE[0] / augment.REFERENCE_HEIGHT

# op -> (parameter, low, high) for every parameter it draws
RANGES = {
    "RandomRotateFlip": [("angle", -5.0, 5.0)],
    "RandomGaussianBlur": [("sigma", 0.0, BLUR_MAX)],
    "RandomGaussianNoise": [("std", 0.0, 25.5)],
    "ColorJitter": [
        ("brightness_factor", 0.9, 1.1),
        ("contrast_factor", 0.9, 1.1),
        ("saturation_factor", 0.9, 1.1),
        ("hue_factor", -0.1, 0.1),
    ],
}
RANDOM_OPS = {
    "base": [],
    "custom": ["ColorJitter", "RandomGaussianNoise"],
    "imgaug": ["RandomRotateFlip", "RandomGaussianBlur", "RandomGaussianNoise", "ColorJitter"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small batches are far slower with two threads on a busy box (as in DataLoader workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo(demo_data) -> torch.Tensor:
    first = sorted((demo_data / "train" / "images").iterdir())[0]
    return decode(str(first / "mask1.jpg"))


def record_draws(recipe: augment.Recipe) -> list[list[dict]]:
    """Make every op of `recipe` remember the parameters it draws (`draw` is each op's one place for them)."""
    draws: list[list[dict]] = [[] for _ in recipe.ops]
    for index, op in enumerate(recipe.ops):
        original = op.draw

        def recording(count, original=original, index=index):
            params = original(count)
            draws[index].append(params)
            return params

        op.draw = recording
    return draws


def check_draws(recipe: augment.Recipe, draws: list[list[dict]], images: int, name: str) -> None:
    assert [type(op).__name__ for op in recipe.ops] == RANDOM_OPS[name]
    for op, op_draws in zip(recipe.ops, draws, strict=True):
        kind = type(op).__name__
        for parameter, low, high in RANGES[kind]:
            values = torch.cat([params[parameter] for params in op_draws])
            assert len(values) == images, f"{kind} must draw once per image"
            assert low <= float(values.min()) and float(values.max()) <= high, (kind, parameter)
            width = high - low
            # spread over the range, and a fresh value for every image
            assert float(values.min()) < low + 0.1 * width and float(values.max()) > high - 0.1 * width
            assert len(set(values.tolist())) == images
        if kind == "RandomRotateFlip":
            flips = torch.cat([params["flip"] for params in op_draws]).float().mean()
            assert 0.4 < float(flips) < 0.6


@pytest.mark.parametrize("name", ["base", "custom", "imgaug"])
def test_each_random_op_draws_fresh_parameters_per_image_within_the_recipe_ranges(name, photo):
    torch.manual_seed(0)
    recipe = augment.train_recipe(name, SIZE, MEAN, STD)
    draws = record_draws(recipe)
    batch = recipe.prefix(photo).expand(COPIES, -1, -1, -1).contiguous()
    outputs = recipe(batch)
    assert outputs.shape == (COPIES, 3, *SIZE) and outputs.dtype == torch.float32
    check_draws(recipe, draws, COPIES, name)
    # different images come out of the same input
    distinct = len({hash(output.numpy().tobytes()) for output in outputs})
    assert distinct == (1 if name == "base" else COPIES)


def training_loader_batches(demo_data, device: str, seed: int):
    """Two epochs of the imgaug training loader built for `device`, with its recipe's draws recorded."""
    spec = load_spec(tiny_spec(demo_data, augmentation="imgaug", resize="64x48", num_workers=0))
    samples, _ = load_samples(spec)
    train_loader, _ = build_loaders(spec, samples, MEAN, STD, torch.device(device))
    draws = record_draws(train_loader.collate_fn.recipe)
    torch.manual_seed(seed)
    batches = [(images, train_loader.collate_fn.finish(images)) for _ in range(2) for images, _ in train_loader]
    return train_loader, draws, batches


def test_the_training_loader_augments_each_image_of_each_batch_with_its_own_parameters(demo_data):
    loader, draws, batches = training_loader_batches(demo_data, "cpu", seed=3)
    images = sum(len(raw) for raw, _ in batches)
    assert images == 2 * len(loader) * loader.batch_size  # drop_last: full batches only
    assert all(raw.dtype == torch.float32 for raw, _ in batches)  # augmented in the loader (on the CPU)
    check_draws(loader.collate_fn.recipe, draws, images, "imgaug")


def test_a_loader_for_cuda_leaves_uint8_batches_whose_device_side_recipe_gives_the_cpu_result(demo_data):
    cuda_loader, draws, cuda_batches = training_loader_batches(demo_data, "cuda", seed=3)
    _, _, cpu_batches = training_loader_batches(demo_data, "cpu", seed=3)
    assert all(raw.dtype == torch.uint8 for raw, _ in cuda_batches)  # what crosses to the GPU: 1 byte/pixel
    check_draws(cuda_loader.collate_fn.recipe, draws, sum(len(raw) for raw, _ in cuda_batches), "imgaug")
    # one recipe, the same draws for the same seed, wherever it runs
    for (_, on_device), (_, on_cpu) in zip(cuda_batches, cpu_batches, strict=True):
        assert torch.equal(on_device, on_cpu)


def smooth_batch(count: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    return TF.gaussian_blur(torch.rand(count, 3, 48, 64), [5, 5], [2.0, 2.0])


def test_rotation_matches_torchvision_rotate_and_a_flip_mirrors_exactly():
    images = smooth_batch(3)
    op = augment.RandomRotateFlip(5.0, 0.5)
    angles = torch.tensor([4.0, -3.0, 0.0])
    rotated = op.apply(images.clone(), {"angle": angles, "flip": torch.tensor([False, False, True])})
    inner = (slice(None), slice(6, -6), slice(6, -6))  # corners differ where pixels come from outside
    for index, angle in enumerate(angles[:2].tolist()):
        expected = TF.rotate(images[index], angle, interpolation=InterpolationMode.BILINEAR)
        assert torch.allclose(rotated[index][inner], expected[inner], atol=1e-5)
    assert torch.allclose(rotated[2], images[2].flip(-1), atol=1e-5)


def test_blur_matches_torchvision_per_image_sigma_and_noise_has_each_images_drawn_std():
    images = smooth_batch(2)
    blur = augment.RandomGaussianBlur((0.0, 1.5))
    sigmas = torch.tensor([0.3, 1.4])
    blurred = blur.apply(images.clone(), {"sigma": sigmas})
    for index, sigma in enumerate(sigmas.tolist()):
        expected = TF.gaussian_blur(images[index], [2 * blur.radius + 1] * 2, [sigma, sigma])
        assert torch.allclose(blurred[index], expected, atol=1e-5)

    grey = torch.full((4, 3, 64, 64), 0.5)
    stds = torch.tensor([0.0, 5.0, 12.0, 25.5])
    noisy = augment.RandomGaussianNoise((0.0, 25.5)).apply(grey, {"std": stds})
    measured = ((noisy - 0.5) * 255).flatten(1).std(dim=1)
    assert torch.allclose(measured, stds, atol=0.6, rtol=0.05)


def test_color_jitter_factors_follow_torchvisions_formulas_and_hue_keeps_luma():
    images = smooth_batch() * 0.5 + 0.25  # mid-range: no factor of 0.9-1.1 clips it
    jitter = augment.ColorJitter(0.1, 0.1, 0.1, 0.1)
    neutral = {
        "brightness_factor": torch.ones(1),
        "contrast_factor": torch.ones(1),
        "saturation_factor": torch.ones(1),
        "hue_factor": torch.zeros(1),
    }
    assert torch.allclose(jitter.apply(images.clone(), neutral), images, atol=1e-6)
    for name, reference in (
        ("brightness_factor", TF.adjust_brightness),
        ("contrast_factor", TF.adjust_contrast),
        ("saturation_factor", TF.adjust_saturation),
    ):
        changed = jitter.apply(images.clone(), neutral | {name: torch.tensor([1.08])})
        assert torch.allclose(changed, reference(images, 1.08), atol=1e-5), name
    turned = jitter.apply(images.clone(), neutral | {"hue_factor": torch.tensor([0.08])})
    assert not torch.allclose(turned, images, atol=1e-3)
    assert torch.allclose(augment.grey(turned), augment.grey(images), atol=1e-4)


def test_center_crop_takes_source_pixels_before_resizing_in_train_and_eval(photo):
    height, width = photo.shape[-2:]
    crop = (height // 2, width // 2)
    expected = TF.resize(TF.center_crop(photo, list(crop)), list(SIZE), antialias=True)
    assert torch.equal(augment.eval_recipe(SIZE, MEAN, STD, crop).prefix(photo), expected)
    assert torch.equal(augment.train_recipe("imgaug", SIZE, MEAN, STD, crop).prefix(photo), expected)
    normalised = augment.eval_recipe(SIZE, MEAN, STD, crop)(expected[None])[0]
    assert torch.allclose(normalised, (expected / 255 - 0.5) / 0.25)
    # a crop larger than the photo keeps that side whole rather than padding it
    assert augment.Prefix(SIZE, crop_pixels=(10 * height, width // 2))(photo).shape[-2:] == SIZE


def test_custom_recipe_crops_the_seeds_320x256_share_unless_the_spec_gives_a_crop():
    image = torch.zeros(3, 512, 384, dtype=torch.uint8)
    image[:, 96:416, 64:320] = 255  # the seed's 320x256 centre
    recipe = augment.train_recipe("custom", (320, 256), (0.0,) * 3, (1.0,) * 3)
    assert bool((recipe.prefix(image) == 255).all())
    with_crop = augment.train_recipe("custom", (100, 100), (0.0,) * 3, (1.0,) * 3, crop=(100, 100))
    assert with_crop.prefix.crop_pixels == (100, 100) and with_crop.prefix.crop_fraction is None


def test_mixup_blends_each_image_with_a_partner_by_the_drawn_lambda():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8)
    lambdas = []
    for _ in range(20):
        batch = BatchMixer(mixup_alpha=0.4, cutmix_alpha=0.0)(images, labels)
        partner = batch.partner_labels  # labels are indexes, so they name the partner image
        assert torch.allclose(batch.images, batch.lam * images + (1 - batch.lam) * images[partner])
        lambdas.append(batch.lam)
    assert all(0.0 <= lam <= 1.0 for lam in lambdas) and len(set(lambdas)) == 20


def test_cutmix_pastes_a_partner_box_whose_area_is_one_minus_lambda():
    torch.manual_seed(0)
    images, partners = torch.zeros(4, 3, 32, 32), torch.ones(4, 3, 32, 32)
    for lam in (0.1, 0.5, 0.9):
        mixed, exact = cutmix(images, partners, lam)
        pasted = float(mixed[0, 0].mean())
        assert pasted == pytest.approx(1 - exact) and 0 < pasted < 1
    batch = BatchMixer(mixup_alpha=0.0, cutmix_alpha=1.0)(torch.rand(8, 3, 32, 32), torch.arange(8))
    own = 1 - batch.lam
    assert 0.0 <= own <= 1.0


def test_mixed_loss_is_the_lambda_weighted_loss_of_both_labels():
    logits = torch.randn(6, 4)
    labels, partners = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 3, 2])
    from trainer.mixing import MixedBatch

    batch = MixedBatch(torch.zeros(6), labels, partners, 0.3)
    criterion = torch.nn.CrossEntropyLoss()
    expected = 0.3 * criterion(logits, labels) + 0.7 * criterion(logits, partners)
    assert torch.allclose(batch.loss(criterion, logits), expected)
    assert torch.equal(batch.dominant_labels, partners)

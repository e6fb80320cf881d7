"""Augmentation recipes: every random op draws its own parameters per image, inside the stated ranges.

Each recipe runs on many copies of one demo photo while the ops record what they draw; the ranges
below are the seed recipe's (the issue's): rotate +-5 deg, h-flip p=0.5, blur sigma 0-3 px of a
512-high photo, noise std 0-0.1*255, ColorJitter 0.1.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torchvision.io import decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer import augment
from trainer.mixing import BatchMixer, cutmix

SIZE = (64, 48)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
COPIES = 300
BLUR_MAX = 3.0 * SIZE[0] / augment.REFERENCE_HEIGHT

# op -> (parameter, low, high) for every parameter it draws
RANGES = {
    "RandomRotation": [("angle", -5.0, 5.0)],
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
    "base": set(),
    "custom": {"ColorJitter", "RandomGaussianNoise"},
    "imgaug": {"RandomRotation", "RandomHorizontalFlip", "RandomGaussianBlur", "RandomGaussianNoise", "ColorJitter"},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Per-image ops on a 64x48 photo are far slower with two threads on a busy box (as in DataLoader workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo(demo_data) -> torch.Tensor:
    first = sorted((demo_data / "train" / "images").iterdir())[0]
    return decode_image(str(first / "mask1.jpg"))


def record_draws(recipe: v2.Compose) -> list[list[dict]]:
    """Make every op of `recipe` remember the parameters it draws (make_params is v2's one place for them)."""
    draws: list[list[dict]] = [[] for _ in recipe.transforms]
    for index, op in enumerate(recipe.transforms):
        original = op.make_params

        def recording(flat_inputs, original=original, index=index):
            params = original(flat_inputs)
            draws[index].append(params)
            return params

        op.make_params = recording
    return draws


@pytest.mark.parametrize("name", ["base", "custom", "imgaug"])
def test_each_random_op_draws_fresh_parameters_per_image_within_the_recipe_ranges(name, photo):
    torch.manual_seed(0)
    recipe = augment.train_transform(name, SIZE, MEAN, STD)
    draws = record_draws(recipe)
    outputs = [recipe(photo) for _ in range(COPIES)]
    assert all(output.shape == (3, *SIZE) and output.dtype == torch.float32 for output in outputs)

    random_ops = set()
    for op, op_draws in zip(recipe.transforms, draws, strict=True):
        kind = type(op).__name__
        if kind == "RandomHorizontalFlip":
            random_ops.add(kind)
            # drawn only when it flips: about half of the images
            assert 0.4 * COPIES < len(op_draws) < 0.6 * COPIES
            continue
        if kind not in RANGES:
            assert all(params == {} for params in op_draws), f"{kind} is meant to be deterministic"
            continue
        random_ops.add(kind)
        assert len(op_draws) == COPIES, f"{kind} must draw once per image"
        for parameter, low, high in RANGES[kind]:
            values = torch.tensor([params[parameter] for params in op_draws])
            assert low <= float(values.min()) and float(values.max()) <= high, (kind, parameter)
            width = high - low
            # spread over the range, and a fresh value for every image
            assert float(values.min()) < low + 0.1 * width and float(values.max()) > high - 0.1 * width
            assert len(set(values.tolist())) == COPIES
    assert random_ops == RANDOM_OPS[name]
    # different images come out of the same input
    assert name == "base" or len({hash(output.numpy().tobytes()) for output in outputs}) == COPIES


def test_measured_noise_matches_the_drawn_std_and_flips_mirror_the_image(photo):
    torch.manual_seed(1)
    noise = augment.RandomGaussianNoise((0.0, 25.5))
    draws = record_draws(v2.Compose([noise]))[0]
    grey = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    measured = [float((noise(grey).float() - 128).std()) for _ in range(50)]
    for std, params in zip(measured, draws, strict=True):
        assert std == pytest.approx(params["std"], abs=0.6 + 0.05 * params["std"])

    flip = v2.RandomHorizontalFlip(0.5)
    outcomes = Counter(
        "flipped" if torch.equal(out, TF.horizontal_flip(photo)) else "same" if torch.equal(out, photo) else "other"
        for out in (flip(photo) for _ in range(200))
    )
    assert outcomes["other"] == 0 and 70 < outcomes["flipped"] < 130


def test_center_crop_takes_source_pixels_before_resizing_in_train_and_eval(photo):
    height, width = photo.shape[-2:]
    crop = (height // 2, width // 2)
    expected = TF.resize(TF.center_crop(photo, list(crop)), list(SIZE), antialias=True)
    expected = TF.normalize(TF.to_dtype(expected, torch.float32, scale=True), list(MEAN), list(STD))
    assert torch.allclose(augment.eval_transform(SIZE, MEAN, STD, crop)(photo), expected)
    assert torch.allclose(augment.train_transform("base", SIZE, MEAN, STD, crop)(photo), expected)
    # a crop larger than the photo keeps that side whole rather than padding it
    assert augment.CenterCropPixels((10 * height, width // 2))(photo).shape[-2:] == (height, width // 2)


def test_custom_recipe_crops_the_seeds_320x256_share_unless_the_spec_gives_a_crop():
    image = torch.zeros(3, 512, 384, dtype=torch.uint8)
    image[:, 96:416, 64:320] = 255  # the seed's 320x256 centre
    recipe = augment.train_transform("custom", (320, 256), (0.0,) * 3, (1.0,) * 3)
    recipe.transforms = [op for op in recipe.transforms if type(op).__name__ in ("CenterCropFraction", "Resize")]
    assert bool((recipe(image) == 255).all())
    with_crop = augment.train_transform("custom", (100, 100), (0.0,) * 3, (1.0,) * 3, crop=(100, 100))
    assert type(with_crop.transforms[0]).__name__ == "CenterCropPixels"


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

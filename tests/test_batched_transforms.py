"""Batched transforms against the per-image torchvision path: bit-exact for equal crops, same crop
distribution (two-sample Kolmogorov-Smirnov tests over many draws with fixed seeds)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ntkcl.data.batched_transforms import build_batched_transforms
from ntkcl.data.decoded import DecodedImages
from ntkcl.data.transforms import build_transforms

# Two-sample KS critical value at significance 1e-4: c(alpha) = sqrt(-ln(alpha / 2) / 2).
KS_C_ALPHA = math.sqrt(-math.log(1e-4 / 2) / 2)


def ks_statistic(first: np.ndarray, second: np.ndarray) -> float:
    """sup_x |F1(x) - F2(x)| of the two empirical distributions."""
    grid = np.union1d(first, second)
    cdf_first = np.searchsorted(np.sort(first), grid, side="right") / len(first)
    cdf_second = np.searchsorted(np.sort(second), grid, side="right") / len(second)
    return float(np.abs(cdf_first - cdf_second).max())


def assert_same_distribution(first: np.ndarray, second: np.ndarray, name: str) -> float:
    statistic = ks_statistic(first, second)
    critical = KS_C_ALPHA * math.sqrt((len(first) + len(second)) / (len(first) * len(second)))
    assert statistic < critical, f"{name}: KS statistic {statistic:.4f} >= {critical:.4f}"
    return statistic


def padded_batch(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    heights, widths = zip(*(array.shape[:2] for array in arrays), strict=True)
    batch = torch.zeros(len(arrays), max(heights), max(widths), 3, dtype=torch.uint8)
    for row, array in enumerate(arrays):
        batch[row, : array.shape[0], : array.shape[1]] = torch.from_numpy(array)
    return batch, torch.tensor(list(zip(heights, widths, strict=True)))


def random_images(shapes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.mark.parametrize(
    ("image_size", "shapes"),
    [(224, [(32, 32)] * 4), (48, [(300, 200), (120, 400), (48, 48), (90, 61)])],
    ids=["cifar-upsampled", "ragged-downsampled"],
)
def test_test_transform_is_bit_identical_to_torchvision(image_size, shapes):
    images = random_images(shapes)
    _, per_image = build_transforms("paper", image_size)
    _, batched = build_batched_transforms("paper", image_size)
    pixels, sizes = padded_batch(images)
    expected = torch.stack([per_image(Image.fromarray(image)) for image in images])
    assert torch.equal(batched(pixels, sizes), expected)


def test_resize_transform_of_grey_arrays_is_bit_identical_to_torchvision():
    grey = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)  # digits-like
    per_image, _ = build_transforms("resize", 32)
    batched, _ = build_batched_transforms("resize", 32)
    pixels, sizes = DecodedImages.from_arrays(grey).gather(np.arange(3))
    expected = torch.stack([per_image(Image.fromarray(image).convert("RGB")) for image in grey])
    assert torch.equal(batched(pixels, sizes), expected)


def test_train_transform_equals_torchvision_for_the_same_crops_and_flips():
    images = random_images([(32, 32), (32, 32), (50, 70), (70, 40)], seed=2)
    batched, _ = build_batched_transforms("paper", 40)
    pixels, sizes = padded_batch(images)
    plan = batched.plan(sizes, batched.draw(len(images), torch.Generator().manual_seed(3)))
    expected = []
    for image, (top, left, height, width, *_, flip) in zip(images, plan.tolist(), strict=True):
        crop = TF.resized_crop(Image.fromarray(image), top, left, height, width, [40, 40], T.InterpolationMode.BILINEAR)
        expected.append(TF.to_tensor(TF.hflip(crop) if flip else crop))
    assert torch.equal(batched.apply(pixels, plan), torch.stack(expected))


@pytest.mark.parametrize("shape", [(32, 32), (40, 150)], ids=["square", "wide-needs-fallback"])
def test_random_resized_crop_draws_torchvision_distribution(shape):
    """Crop height, width, area, aspect ratio, position and flip rate over 10,000 draws each."""
    count = 10_000
    height, width = shape
    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    reference = np.array(
        [T.RandomResizedCrop.get_params(image, [0.05, 1.0], [3 / 4, 4 / 3]) for _ in range(count)], dtype=np.float64
    )
    reference_flips = torch.rand(count, generator=torch.Generator().manual_seed(1)) < 0.5
    batched, _ = build_batched_transforms("paper", 224)
    sizes = torch.tensor([shape] * count)
    plan = batched.plan(sizes, batched.draw(count, torch.Generator().manual_seed(2))).double().numpy()
    ours = plan[:, :4]
    for column, name in enumerate(("top", "left", "height", "width")):
        assert_same_distribution(ours[:, column], reference[:, column], name)
    assert_same_distribution(ours[:, 2] * ours[:, 3], reference[:, 2] * reference[:, 3], "area")
    assert_same_distribution(ours[:, 3] / ours[:, 2], reference[:, 3] / reference[:, 2], "aspect ratio")
    # flip rate: both binomial(10000, 0.5); 4.5 standard deviations apart at most
    flips = plan[:, -1].mean()
    assert abs(flips - 0.5) < 4.5 * 0.5 / math.sqrt(count)
    assert abs(flips - reference_flips.double().mean().item()) < 4.5 * math.sqrt(0.5) / math.sqrt(count)


def test_augmented_pixels_have_the_torchvision_distribution():
    """Pixel statistics of 1,500 augmented copies of a structured image: mean, left-right and top-bottom
    contrast (flips and crop positions), and a moment check on the mean image."""
    count, size = 1_500, 16
    y, x = np.mgrid[0:32, 0:32]
    image = np.stack([x * 8, y * 8, np.where(x < 10, 250, 20)], axis=-1).astype(np.uint8)
    per_image, _ = build_transforms("paper", size)
    torch.manual_seed(0)
    reference = torch.stack([per_image(Image.fromarray(image)) for _ in range(count)])
    batched, _ = build_batched_transforms("paper", size)
    pixels, sizes = DecodedImages.from_arrays(image[None].repeat(count, 0)).gather(np.arange(count))
    ours = batched(pixels, sizes, torch.Generator().manual_seed(1))
    half = size // 2

    def statistics(batch: torch.Tensor) -> dict[str, np.ndarray]:
        return {
            "mean": batch.mean(dim=(1, 2, 3)).numpy(),
            "left-right": (batch[..., :half].mean(dim=(1, 2, 3)) - batch[..., half:].mean(dim=(1, 2, 3))).numpy(),
            "top-bottom": (batch[:, :, :half].mean(dim=(1, 2, 3)) - batch[:, :, half:].mean(dim=(1, 2, 3))).numpy(),
        }

    for name, values in statistics(ours).items():
        assert_same_distribution(values, statistics(reference)[name], name)
    # the mean image of 1,500 draws: every pixel's mean within 5 standard errors of the reference's
    standard_error = torch.sqrt((ours.var(dim=0) + reference.var(dim=0)) / count)
    assert ((ours.mean(dim=0) - reference.mean(dim=0)).abs() <= 5 * standard_error + 1e-6).float().mean() > 0.999


def test_batched_transforms_run_under_autocast_in_fp32():
    images = random_images([(32, 32)] * 2)
    _, batched = build_batched_transforms("paper", 32)
    pixels, sizes = padded_batch(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = batched(pixels, sizes)
    assert inside.dtype == torch.float32 and torch.equal(inside, batched(pixels, sizes))

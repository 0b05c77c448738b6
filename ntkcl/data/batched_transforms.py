"""The transforms of `ntkcl.data.transforms` as batched tensor operations on uint8 images, on any device.

A transform is split in two: `plan` draws the random parameters of a batch on the CPU from a
`torch.Generator` (so a seed gives the same crops on every device), and `apply` resamples the batch on the
device it lives on. Every geometric step (crop, resize, centre crop, horizontal flip) becomes one row of a
separable resampling matrix per output pixel, so a whole batch of differently sized images is two batched
matrix products:

    out = Wy @ image @ Wxᵀ        (per image and channel)

The rows hold Pillow's own filter weights (bilinear for RandomResizedCrop, bicubic with a = -0.5 for the
test Resize, both antialiased when shrinking) in its 22-bit fixed point, and each pass is rounded to uint8
as Pillow does (horizontal pass first), in exact integer arithmetic carried by float32 matrix products. So
for the same crop a batch is bit-identical to the per-image torchvision path on PIL images, on any device.
RandomResizedCrop draws from the same distribution as torchvision's `get_params` (ten attempts of a
uniform scale and log-uniform ratio, then the centre-crop fallback), vectorised over the batch.

The training transform of both feeds takes its crop and flip from `random_draws` of one generator per
image seeded with that image's augmentation seed: `PerImageRandomResizedCrop` on a PIL image (the loader
feed) and `seeded_draws` for a batch (the device feed) give the same crops, hence bit-identical pixels. The
per-image one runs Pillow's horizontal and vertical passes one after the other, as the batched one does:
a single 2-D Pillow resize (Pillow 13) does the vertical pass first for some crops that shrink vertically and
stretch horizontally, which rounds differently (by one grey level on some pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from ntkcl.data.transforms import AUGMENTATIONS, paper_resize

PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling (Resample.c)
SPLIT_BITS = 11  # weights are multiplied in two float32-exact halves (see _split_weights)
ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params

# Columns of a plan: the source window, the size of the resized image the output is cut from, the offset of
# the output inside it (centre crop), and whether to flip the output horizontally.
TOP, LEFT, HEIGHT, WIDTH, RESIZED_H, RESIZED_W, OFFSET_Y, OFFSET_X, FLIP = range(9)
PLAN_COLUMNS = 9


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_min(0.0)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


# Zero outside their support, so evaluating them on every tap of the window equals Pillow's tap bounds.
FILTERS = {"bilinear": _bilinear, "bicubic": _bicubic}


def resampling_matrix(
    start: torch.Tensor,
    length: torch.Tensor,
    resized: torch.Tensor,
    offset: torch.Tensor,
    out_size: int,
    extent: int,
    filter_name: str,
) -> torch.Tensor:
    """(B, out_size, extent) int64 fixed-point weights: Pillow's resize of the window [start, start + length)
    of each image to `resized` pixels, rows `offset .. offset + out_size` of the result.

    Pillow crops first, so taps outside the window get no weight and each row is renormalised over the taps
    inside it (`precompute_coeffs` in Pillow's Resample.c); the float64 weights are then rounded to its
    fixed point (`normalize_coeffs_8bpc`).
    """
    kernel = FILTERS[filter_name]
    device = start.device
    scale = length.double() / resized.double()
    filter_scale = scale.clamp_min(1.0)
    outputs = offset.double()[:, None] + torch.arange(out_size, device=device, dtype=torch.float64)
    centers = (outputs + 0.5) * scale[:, None]
    taps = torch.arange(extent, device=device, dtype=torch.float64)[None, None, :] - start.double()[:, None, None]
    weights = kernel((taps + 0.5 - centers[..., None]) / filter_scale[:, None, None])
    inside = (taps >= 0) & (taps < length.double()[:, None, None])
    weights = torch.where(inside, weights, torch.zeros_like(weights))
    total = weights.sum(dim=2, keepdim=True)
    weights = weights / torch.where(total != 0, total, torch.ones_like(total))
    unit = float(1 << PRECISION_BITS)
    return torch.where(weights < 0, torch.trunc(weights * unit - 0.5), torch.trunc(weights * unit + 0.5)).long()


def _split_weights(fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fixed = high * 2**SPLIT_BITS + low with |high| <= 2**11 and |low| <= 2**10, both exact in float32.

    Products of uint8 pixels with either part, and their sums, stay integers below 2**24 (the weights of a
    row sum to one), so float32 matrix products, even TF32 ones, compute them exactly in any order.
    """
    high = torch.round(fixed.double() / (1 << SPLIT_BITS)).long()
    low = fixed - high * (1 << SPLIT_BITS)
    return high.float(), low.float()


def _fixed_point_round(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Pillow's `clip8((2**21 + sum) >> 22)` of sum = high * 2**SPLIT_BITS + low: round half up, clamp 0..255."""
    total = high.round().long() * (1 << SPLIT_BITS) + low.round().long() + (1 << (PRECISION_BITS - 1))
    return torch.div(total, 1 << PRECISION_BITS, rounding_mode="floor").clamp_(0, 255).float()


def resample(images: torch.Tensor, plan: torch.Tensor, out_size: int, filter_name: str) -> torch.Tensor:
    """(B, H, W, 3) uint8 images (zero-padded beyond each image's size) -> (B, 3, S, S) floats in [0, 1].

    `plan` is (B, PLAN_COLUMNS) int64 on the images' device (see `BatchedTransform.plan`). Two passes,
    horizontal first, each rounded to uint8 as Pillow does, in exact integer arithmetic.
    """
    _, extent_y, extent_x, _ = images.shape
    with torch.autocast(device_type=images.device.type, enabled=False):
        rows_y = resampling_matrix(
            plan[:, TOP], plan[:, HEIGHT], plan[:, RESIZED_H], plan[:, OFFSET_Y], out_size, extent_y, filter_name
        )
        rows_x = resampling_matrix(
            plan[:, LEFT], plan[:, WIDTH], plan[:, RESIZED_W], plan[:, OFFSET_X], out_size, extent_x, filter_name
        )
        rows_x = torch.where(plan[:, FLIP].bool()[:, None, None], rows_x.flip(1), rows_x)
        pixels = images.permute(0, 3, 1, 2).float()
        high_x, low_x = _split_weights(rows_x.transpose(1, 2)[:, None])
        horizontal = _fixed_point_round(pixels @ high_x, pixels @ low_x)
        high_y, low_y = _split_weights(rows_y[:, None])
        output = _fixed_point_round(high_y @ horizontal, low_y @ horizontal)
    return output / 255.0


def random_draws(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, DRAWS) uniform [0, 1) numbers: everything RandomResizedCrop and the flip need per image.

    Drawn apart from the image sizes, so a batch can be drawn as a whole and split between processes.
    The first 2 * ATTEMPTS are float32 draws like torchvision's `torch.empty(1).uniform_`.
    """
    attempts = torch.rand(count, 2 * ATTEMPTS, generator=generator).double()
    rest = torch.rand(count, 3, generator=generator, dtype=torch.float64)
    return torch.cat([attempts, rest], dim=1)


DRAWS = 2 * ATTEMPTS + 3


def seeded_draws(seeds: np.ndarray) -> torch.Tensor:
    """(len(seeds), DRAWS) `random_draws` of one generator per image, seeded with the image's seed."""
    generator = torch.Generator()
    rows = [random_draws(1, generator.manual_seed(int(seed))) for seed in seeds]
    return torch.cat(rows) if rows else torch.zeros(0, DRAWS, dtype=torch.float64)


def random_resized_crop_plan(
    sizes: torch.Tensor,
    draws: torch.Tensor,
    scale: tuple[float, float] = (0.05, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> torch.Tensor:
    """torchvision's `RandomResizedCrop.get_params` for each (height, width) of `sizes`, from `random_draws`.

    Every image tries `ATTEMPTS` (uniform scale, log-uniform ratio) pairs, keeps the first that fits, else
    falls back to the central crop of the clamped ratio, exactly as the per-image loop does; the crop
    position is uniform over the places it fits. Returns (B, 4) int64: top, left, height, width.
    """
    heights, widths = sizes[:, 0].double(), sizes[:, 1].double()
    log_ratio = torch.log(torch.tensor(ratio))
    low_log, high_log = float(log_ratio[0]), float(log_ratio[1])
    # float32 arithmetic for the draws as in torchvision, float64 geometry as in its Python floats
    area_fraction = (scale[0] + (scale[1] - scale[0]) * draws[:, :ATTEMPTS].float()).double()
    aspect = torch.exp(low_log + (high_log - low_log) * draws[:, ATTEMPTS : 2 * ATTEMPTS].float()).double()
    target = (heights * widths)[:, None] * area_fraction
    crop_w = torch.round(torch.sqrt(target * aspect))
    crop_h = torch.round(torch.sqrt(target / aspect))
    fits = (crop_w > 0) & (crop_w <= widths[:, None]) & (crop_h > 0) & (crop_h <= heights[:, None])
    first = fits.double().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    crop_w = crop_w.gather(1, first).squeeze(1)
    crop_h = crop_h.gather(1, first).squeeze(1)
    position = draws[:, 2 * ATTEMPTS : 2 * ATTEMPTS + 2]
    top = torch.floor(position[:, 0] * (heights - crop_h + 1)).clamp_max(heights - crop_h)
    left = torch.floor(position[:, 1] * (widths - crop_w + 1)).clamp_max(widths - crop_w)
    # the fallback: the centred crop of the whole image, its ratio clamped into `ratio`
    in_ratio = widths / heights
    low, high = min(ratio), max(ratio)
    fallback_w = torch.where(in_ratio > high, torch.round(heights * high), widths)
    fallback_h = torch.where(in_ratio < low, torch.round(widths / low), heights)
    crop_w = torch.where(found, crop_w, fallback_w)
    crop_h = torch.where(found, crop_h, fallback_h)
    top = torch.where(found, top, torch.div(heights - fallback_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(widths - fallback_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


def shorter_side_resize(sizes: torch.Tensor, shorter: int) -> torch.Tensor:
    """torchvision's `Resize(shorter)` output (height, width): the long side is `int(shorter * long / short)`."""
    heights, widths = sizes[:, 0], sizes[:, 1]
    short = torch.minimum(heights, widths).double()
    long = torch.maximum(heights, widths).double()
    new_long = torch.floor(shorter * long / short).long()
    new_short = torch.full_like(new_long, shorter)
    width_is_short = widths <= heights
    return torch.stack(
        [torch.where(width_is_short, new_long, new_short), torch.where(width_is_short, new_short, new_long)], dim=1
    )


@dataclass(frozen=True)
class BatchedTransform:
    """One of the dataset transforms, batched.

    Args:
        kind: "random_resized_crop" (train, with horizontal flip), "resize_center_crop" (test: resize the
            shorter side to `resize_to`, then centre-crop `size`) or "resize" (to `size` x `size`).
        size: output side (the backbone's input size).
        filter_name: "bilinear" (torchvision's RandomResizedCrop default) or "bicubic".
        resize_to: shorter side before the centre crop (resize_center_crop only).
    """

    kind: str
    size: int
    filter_name: str
    resize_to: int = 0

    @property
    def random(self) -> bool:
        return self.kind == "random_resized_crop"

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """The random numbers of `count` images (none for the deterministic transforms)."""
        if not self.random:
            return torch.zeros(count, 0, dtype=torch.float64)
        return random_draws(count, generator)

    def plan(self, sizes: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
        """(B, PLAN_COLUMNS) int64 on the CPU for images of (height, width) `sizes`, with `draw`'s numbers."""
        sizes = sizes.long()
        count = sizes.shape[0]
        plan = torch.zeros(count, PLAN_COLUMNS, dtype=torch.int64)
        plan[:, [HEIGHT, WIDTH]] = sizes
        plan[:, [RESIZED_H, RESIZED_W]] = self.size
        if self.kind == "random_resized_crop":
            if draws is None:
                raise ValueError("a random transform needs its draws")
            plan[:, [TOP, LEFT, HEIGHT, WIDTH]] = random_resized_crop_plan(sizes, draws)
            plan[:, FLIP] = (draws[:, -1] < 0.5).long()
        elif self.kind == "resize_center_crop":
            resized = shorter_side_resize(sizes, self.resize_to)
            plan[:, [RESIZED_H, RESIZED_W]] = resized
            # torchvision's CenterCrop: int(round((side - crop) / 2)), round half to even
            plan[:, [OFFSET_Y, OFFSET_X]] = torch.round((resized - self.size).double() / 2.0).long()
        return plan

    def apply(self, images: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """Resample uint8 (B, H, W, 3) `images` on their device with a `plan` on the same device."""
        return resample(images, plan, self.size, self.filter_name)

    def __call__(
        self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        draws = self.draw(sizes.shape[0], generator) if self.random else None
        return self.apply(images, self.plan(sizes, draws).to(images.device))


class PerImageRandomResizedCrop:
    """The "paper" training transform of one PIL image: RandomResizedCrop(scale 0.05-1, ratio 3/4-4/3,
    bilinear) + horizontal flip + ToTensor, its parameters from `random_draws` of torch's default generator
    (seeded per image by the loader), so that the batched transform reproduces it from the same seed."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        sizes = torch.tensor([[image.height, image.width]])
        draws = random_draws(1, torch.random.default_generator)
        top, left, height, width = random_resized_crop_plan(sizes, draws)[0].tolist()
        crop = image.crop((left, top, left + width, top + height))
        # Pillow's two passes one at a time, horizontal first: recent Pillow picks the order of a 2-D resize
        # itself (vertical first for some crops), which rounds differently from the batched passes
        wide = crop.resize((self.size, height), Image.Resampling.BILINEAR)
        resized = wide.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return TF.to_tensor(TF.hflip(resized) if draws[0, -1] < 0.5 else resized)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


BATCHED_AUGMENTATIONS = ("paper", "resize", "clip")


def build_batched_transforms(augment: str, image_size: int) -> tuple[BatchedTransform, BatchedTransform]:
    """The batched (train, test) pair of `ntkcl.data.transforms.build_transforms(augment, image_size)`
    (`BATCHED_AUGMENTATIONS`; timm's colour jitter has no batched form)."""
    if augment == "clip":
        plain = BatchedTransform("resize_center_crop", image_size, "bicubic", image_size)
        return plain, plain
    if augment == "paper":
        train = BatchedTransform("random_resized_crop", image_size, "bilinear")
        test = BatchedTransform("resize_center_crop", image_size, "bicubic", paper_resize(image_size))
        return train, test
    if augment == "resize":
        plain = BatchedTransform("resize", image_size, "bicubic")
        return plain, plain
    raise ValueError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")

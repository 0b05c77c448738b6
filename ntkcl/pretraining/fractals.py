"""Formula-driven images: iterated-function-system (IFS) fractal categories rendered with random colours and
placements, the data of formula-driven supervised learning (FDSL).

Pre-training without natural images: Kataoka et al., "Pre-training without Natural Images" (ACCV 2020,
arXiv 2101.08515, FractalDB) and "Replacing Labeled Real-image Datasets with Auto-generated Contours"
(CVPR 2022, arXiv 2206.09132). A category is one IFS: two to four affine maps `x -> A_i x + b_i` chosen with
probability proportional to `|det A_i|`. The linear parts are sampled by their singular values under the
sigma-factor rule of Anderson & Farrell, "Improving Fractal Pre-training" (WACV 2022, arXiv 2110.03091), which
keeps the attractor neither a dust of points nor a filled blob, instead of FractalDB's filling-rate rejection.
An instance of a category perturbs every map's parameters slightly (FractalDB's intra-category variation),
and is drawn at a random scale, mirror, position (and optionally rotation), foreground and background colour.

Everything is a function of the seed: categories from `np.random.default_rng(seed)`, instance `i` of
category `c` from a generator seeded by `(seed, c, i)`, so any subset is reproducible on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from ntkcl.pretraining.rendering import colourise, render_set


@dataclass(frozen=True)
class FractalSettings:
    """What fixes a generated data set (recorded beside the weights trained on it).

    Attributes:
        seed: seed of the categories and instances.
        num_categories: number of IFS categories (classes).
        instances_per_category: images per category.
        image_size: side of the square RGB images.
        min_maps / max_maps: number of affine maps of a category (inclusive range).
        chains / steps / burn_in: the chaos game runs `chains` points per image for `steps` iterations and
            draws every point after the first `burn_in`.
        jitter: standard deviation of the per-instance perturbation of the map parameters.
        min_scale / max_scale: side of the drawn attractor as a fraction of the image.
        max_rotation: instances are rotated by up to this angle (radians) either way; 0 keeps FractalDB's
            upright instances, which a small ViT learns to tell apart in far fewer steps.
    """

    seed: int = 0
    num_categories: int = 128
    instances_per_category: int = 300
    image_size: int = 32
    min_maps: int = 2
    max_maps: int = 4
    chains: int = 16
    steps: int = 160
    burn_in: int = 20
    jitter: float = 0.04
    min_scale: float = 0.8
    max_scale: float = 0.95
    max_rotation: float = 0.0
    kind: ClassVar[str] = "ifs-fractals"

    def record(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class IteratedFunctionSystem:
    """Affine maps `x -> linear[i] @ x + offset[i]` and the probability of choosing each."""

    linear: np.ndarray  # (maps, 2, 2)
    offset: np.ndarray  # (maps, 2)
    probability: np.ndarray  # (maps,)


def _rotation(angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def sample_system(rng: np.random.Generator, num_maps: int) -> IteratedFunctionSystem:
    """One IFS whose singular values meet the sigma factor `sum_i (s1_i + 2 s2_i)` in `[(5+N)/2, (6+N)/2]`.

    The target sigma factor is split over the maps, each map's largest singular value is drawn first and
    its second one fills the remainder (both kept in (0, 1), so every map contracts).
    """
    target = rng.uniform((5 + num_maps) / 2, (6 + num_maps) / 2)
    shares = rng.dirichlet(np.ones(num_maps)) * (target - num_maps * 0.6) + 0.6
    first = np.empty(num_maps)
    second = np.empty(num_maps)
    for index, share in enumerate(shares):
        # share = s1 + 2 s2 with 1 > s1 >= s2 > 0
        low, high = max(share / 3, share - 2 * 0.999), min(0.999, share)
        first[index] = rng.uniform(low, high) if high > low else high
        second[index] = np.clip((share - first[index]) / 2, 0.02, first[index])
    mirror = rng.choice([-1.0, 1.0], size=num_maps)
    diagonal = np.zeros((num_maps, 2, 2))
    diagonal[:, 0, 0] = first
    diagonal[:, 1, 1] = second * mirror
    linear = (
        _rotation(rng.uniform(-np.pi, np.pi, num_maps)) @ diagonal @ _rotation(rng.uniform(-np.pi, np.pi, num_maps))
    )
    offset = rng.uniform(-1.0, 1.0, (num_maps, 2))
    determinant = np.abs(np.linalg.det(linear))
    return IteratedFunctionSystem(linear, offset, determinant / determinant.sum())


def sample_categories(settings: FractalSettings) -> list[IteratedFunctionSystem]:
    """The categories of a data set: one IFS each, all drawn from `settings.seed`."""
    rng = np.random.default_rng(settings.seed)
    return [
        sample_system(rng, int(rng.integers(settings.min_maps, settings.max_maps + 1)))
        for _ in range(settings.num_categories)
    ]


def _chaos_game(system: IteratedFunctionSystem, settings: FractalSettings, rng: np.random.Generator) -> np.ndarray:
    """Points on the attractor: (chains * (steps - burn_in), 2)."""
    points = rng.uniform(-1.0, 1.0, (settings.chains, 2))
    choices = rng.choice(len(system.probability), size=(settings.steps, settings.chains), p=system.probability)
    drawn = []
    for step in range(settings.steps):
        chosen = choices[step]
        points = np.einsum("cij,cj->ci", system.linear[chosen], points) + system.offset[chosen]
        if step >= settings.burn_in:
            drawn.append(points)
    return np.concatenate(drawn)


def _perturbed(system: IteratedFunctionSystem, jitter: float, rng: np.random.Generator) -> IteratedFunctionSystem:
    linear = system.linear * (1.0 + rng.normal(0.0, jitter, system.linear.shape))
    offset = system.offset + rng.normal(0.0, jitter, system.offset.shape)
    determinant = np.abs(np.linalg.det(linear)) + 1e-8
    return IteratedFunctionSystem(linear, offset, determinant / determinant.sum())


def _place(points: np.ndarray, settings: FractalSettings, rng: np.random.Generator) -> np.ndarray:
    """Pixel coordinates: the attractor normalised, mirrored, rotated, scaled and moved inside the image."""
    low, high = np.percentile(points, [1, 99], axis=0)
    points = (points - (low + high) / 2) / max(float((high - low).max()), 1e-6)  # into [-0.5, 0.5]
    if rng.random() < 0.5:
        points[:, 0] = -points[:, 0]
    points = points @ _rotation(np.asarray(rng.uniform(-settings.max_rotation, settings.max_rotation))).T
    size = settings.image_size
    scale = rng.uniform(settings.min_scale, settings.max_scale) * size
    room = max(size - scale, 0.0) / 2
    centre = size / 2 + rng.uniform(-room, room, 2)
    return points * scale + centre


def render_instance(system: IteratedFunctionSystem, settings: FractalSettings, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image (size, size, 3) of `system`: a perturbed copy, drawn at a random placement."""
    size = settings.image_size
    pixels = np.floor(_place(_chaos_game(_perturbed(system, settings.jitter, rng), settings, rng), settings, rng))
    pixels = pixels.astype(np.int64)
    inside = (pixels >= 0).all(1) & (pixels < size).all(1)
    density = np.zeros(size * size)
    np.add.at(density, pixels[inside, 1] * size + pixels[inside, 0], 1.0)
    # Log density: the dense core of an attractor does not hide its thin branches.
    density = np.log1p(density.reshape(size, size))
    coverage = density / max(float(density.max()), 1e-6)
    return colourise(coverage, rng)


def generate(settings: FractalSettings, categories: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size, 3) uint8 and labels (n,) int64 of `categories` (default: all), in category order."""
    return render_set(sample_categories(settings), settings, render_instance, (settings.seed,), categories)

"""Formula-driven images: radial-contour categories (line drawings) with random colours and placements.

Kataoka et al., "Replacing Labeled Real-image Datasets with Auto-generated Contours" (CVPR 2022, arXiv
2206.09132, the Radial Contour DataBase): ViTs pre-trained to tell categories of generated outlines apart
transfer as well as from fractals, because what a ViT learns first is the shape of contours. A category here
is a closed outline around a centre: `vertices` points at angles 2πk/vertices whose radii deviate from 1 by a
category-fixed random profile, drawn as a polygon or as the smooth closed curve through the points, repeated
as `rings` concentric copies shrunk by a fixed factor and turned by a fixed angle each. An instance jitters
every radius, and is drawn with a random line width, scale, position, slight rotation, foreground and
background colour.

Everything is a function of the seed, as for `ntkcl.pretraining.fractals`: categories from
`np.random.default_rng(seed)`, instance `i` of category `c` from a generator seeded by `(seed, 1, c, i)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from ntkcl.pretraining.rendering import colourise, render_set


@dataclass(frozen=True)
class ContourSettings:
    """What fixes a generated set of contour categories (recorded beside the weights trained on it).

    Attributes:
        seed: seed of the categories and instances (a different stream of draws than the fractals' seed).
        num_categories / instances_per_category / image_size: as for fractals.
        min_vertices / max_vertices: points of the outline (inclusive range).
        max_rings: concentric copies of the outline, 1 up to this many.
        jitter: standard deviation of the per-instance perturbation of each radius.
        min_width / max_width: line width in pixels.
        min_scale / max_scale: diameter of the outermost ring as a fraction of the image.
        max_rotation: instances are rotated by up to this angle (radians) either way.
    """

    seed: int = 0
    num_categories: int = 128
    instances_per_category: int = 300
    image_size: int = 32
    min_vertices: int = 3
    max_vertices: int = 12
    max_rings: int = 3
    jitter: float = 0.05
    min_width: float = 1.0
    max_width: float = 3.0
    min_scale: float = 0.6
    max_scale: float = 0.95
    max_rotation: float = 0.2
    kind: ClassVar[str] = "radial-contours"

    def record(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class ContourCategory:
    """One outline: its radius profile, whether it is smooth, and how its rings shrink and turn."""

    radii: np.ndarray  # (vertices,) around 1
    smooth: bool
    rings: int
    shrink: float
    turn: float


def sample_categories(settings: ContourSettings) -> list[ContourCategory]:
    """The categories of a data set, all drawn from `settings.seed`."""
    rng = np.random.default_rng((settings.seed, 1))  # 1: not the fractals' stream of the same seed
    categories = []
    for _ in range(settings.num_categories):
        vertices = int(rng.integers(settings.min_vertices, settings.max_vertices + 1))
        amplitude = rng.uniform(0.05, 0.5)
        categories.append(
            ContourCategory(
                radii=1.0 + amplitude * rng.uniform(-1.0, 1.0, vertices),
                smooth=bool(rng.random() < 0.5),
                rings=int(rng.integers(1, settings.max_rings + 1)),
                shrink=rng.uniform(0.45, 0.8),
                turn=rng.uniform(-np.pi, np.pi),
            )
        )
    return categories


SMOOTH_POINTS = 24  # points of a smooth outline (segments of about 4 px on a 32-px image)


def _outline(radii: np.ndarray, smooth: bool, turn: float) -> np.ndarray:
    """The closed outline as a polyline (n, 2), first point repeated last; smooth ones by periodic
    Catmull-Rom interpolation of the radius over the angle, with about `SMOOTH_POINTS` points."""
    vertices = len(radii)
    points_per_edge = max(2, SMOOTH_POINTS // vertices)
    angles = 2 * np.pi * np.arange(vertices) / vertices + turn
    if not smooth:
        corners = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        return np.concatenate([corners, corners[:1]])
    t = np.linspace(0.0, 1.0, points_per_edge, endpoint=False)
    p0, p1, p2, p3 = (np.roll(radii, shift) for shift in (1, 0, -1, -2))
    # Catmull-Rom between p1 and p2 (uniform), per edge
    curve = 0.5 * (
        2 * p1[:, None]
        + (p2 - p0)[:, None] * t
        + (2 * p0 - 5 * p1 + 4 * p2 - p3)[:, None] * t**2
        + (3 * p1 - p0 - 3 * p2 + p3)[:, None] * t**3
    ).reshape(-1)
    theta = (angles[:, None] + 2 * np.pi / vertices * t).reshape(-1)
    points = np.stack([curve * np.cos(theta), curve * np.sin(theta)], 1)
    return np.concatenate([points, points[:1]])


def line_coverage(segments: np.ndarray, size: int, width: float) -> np.ndarray:
    """Anti-aliased coverage (size, size) of line segments (m, 2, 2) in pixel coordinates drawn `width` wide:
    1 within half the width of a pixel centre, falling linearly to 0 one pixel further out."""
    centres = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="xy"), -1).reshape(-1, 2)
    start, direction = segments[:, 0], segments[:, 1] - segments[:, 0]
    length2 = np.maximum((direction**2).sum(1), 1e-12)
    offset = centres[:, None] - start[None]  # (pixels, segments, 2)
    along = np.clip((offset * direction[None]).sum(-1) / length2, 0.0, 1.0)
    distance2 = ((offset - along[..., None] * direction[None]) ** 2).sum(-1).min(1)
    return np.clip(width / 2 + 0.5 - np.sqrt(distance2), 0.0, 1.0).reshape(size, size)


def render_instance(category: ContourCategory, settings: ContourSettings, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image (size, size, 3) of `category`: jittered radii, random line width and placement."""
    size = settings.image_size
    radii = category.radii * (1.0 + rng.normal(0.0, settings.jitter, len(category.radii)))
    rotation = rng.uniform(-settings.max_rotation, settings.max_rotation)
    scale = rng.uniform(settings.min_scale, settings.max_scale) * size / 2 / max(float(radii.max()), 1e-6)
    room = max(size / 2 - scale * float(radii.max()), 0.0)
    centre = size / 2 + rng.uniform(-room, room, 2)
    segments = []
    for ring in range(category.rings):
        outline = _outline(radii * category.shrink**ring, category.smooth, rotation + ring * category.turn)
        outline = outline * scale + centre
        segments.append(np.stack([outline[:-1], outline[1:]], 1))
    coverage = line_coverage(np.concatenate(segments), size, rng.uniform(settings.min_width, settings.max_width))
    return colourise(coverage, rng)


def generate(settings: ContourSettings, categories: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size, 3) uint8 and labels (n,) int64 of `categories` (default: all), in category order."""
    return render_set(sample_categories(settings), settings, render_instance, (settings.seed, 1), categories)

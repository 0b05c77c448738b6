"""What the formula-driven generators share: colouring a drawn shape and rendering every instance of a set of
categories from its own seeded generator."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def colourise(coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 (size, size, 3): a random light foreground over a random dark background, mixed by `coverage`
    (size, size) in [0, 1]."""
    foreground = rng.uniform(0.4, 1.0, 3)
    background = rng.uniform(0.0, 0.3, 3)
    image = background + coverage[..., None] * (foreground - background)
    return np.round(image * 255).astype(np.uint8)


def render_set(
    drawn: Sequence,
    settings,
    render: Callable[[object, object, np.random.Generator], np.ndarray],
    seed_key: tuple[int, ...],
    categories: range | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size, 3) uint8 and labels (n,) int64 of `categories` (default: all) of `drawn`, in
    category order; instance `i` of category `c` is drawn from a generator seeded by `(*seed_key, c, i)`, so any
    subset is reproducible on its own."""
    chosen = range(settings.num_categories) if categories is None else categories
    images, labels = [], []
    for category in chosen:
        for instance in range(settings.instances_per_category):
            rng = np.random.default_rng((*seed_key, category, instance))
            images.append(render(drawn[category], settings, rng))
            labels.append(category)
    return np.stack(images), np.asarray(labels, dtype=np.int64)

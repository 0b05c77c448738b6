"""Torch datasets over `Samples` and the loaders the engine uses."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ntkcl.data.plugin import Samples


class ImageDataset(Dataset):
    """Decodes one sample (file or array) to RGB and applies `transform`; returns (image, label)."""

    def __init__(self, samples: Samples, transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = self.samples.image(index)
        if isinstance(source, np.ndarray):
            image = Image.fromarray(source).convert("RGB")
        else:
            with Image.open(source) as opened:
                image = opened.convert("RGB")
        return self.transform(image), int(self.samples.labels[index])


class ShardSampler(Sampler[int]):
    """Deterministic, unpadded shard of `indices` for one process (`indices[rank::world]`).

    Used for evaluation and end-of-task statistics: unlike DistributedSampler it never repeats samples to
    even out shards, so counts and class means over all processes equal the single-process ones.
    """

    def __init__(self, indices: Sequence[int], rank: int = 0, world_size: int = 1):
        self.indices = list(np.asarray(indices)[rank::world_size])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

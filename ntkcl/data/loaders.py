"""Torch datasets over `Samples` and the loaders the engine uses."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler

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

    @staticmethod
    def unsharded_positions(local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """Where the shard's `local`-th samples sit in the unsharded order (the inverse of `[rank::world]`)."""
        return local * world_size + rank


@contextlib.contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Python's and torch's CPU generators (what torchvision's and timm's transforms draw from) seeded with
    `seed`, restored afterwards.

    Restoring matters when images are decoded in the training process itself (no loader workers): the
    augmentation of one image must not move the generator that dropout draws from.
    """
    saved = random.getstate(), torch.random.get_rng_state()
    random.seed(seed)
    # The CPU generator alone: torch.manual_seed would also queue a seed for every CUDA device, costly per image.
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        torch.random.set_rng_state(saved[1])


class SeededImages(Dataset):
    """`images[indices[position]]` whose random transform draws from its own seed: keys are (position, seed).

    With a seed per image and epoch, an image's augmentation is the same whatever the number of processes
    and loader workers, and wherever in the epoch a resumed run starts.
    """

    def __init__(self, images: ImageDataset, indices: Sequence[int]):
        self.images = images
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        position, seed = key
        with seeded_generators(seed):
            return self.images[self.indices[position]]


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, padded to equal shards) yielding (position, augmentation seed).

    The seeds of an epoch are drawn per dataset position from `augmentation_seed` and the epoch, so every
    process agrees on them. `set_position(epoch, skip)` starts after this process's first `skip` images,
    which is how a run resumed in the middle of an epoch continues with the images it had not seen.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, augmentation_seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.augmentation_seed = augmentation_seed
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        sequence = np.random.SeedSequence([self.augmentation_seed, self.epoch])
        seeds = np.random.Generator(np.random.PCG64(sequence)).integers(0, 2**32, size=len(self.dataset))
        for position in itertools.islice(super().__iter__(), self.skip, None):
            yield position, int(seeds[position])

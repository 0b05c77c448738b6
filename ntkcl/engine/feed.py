"""How images reach the model (`data.feed`): per-image DataLoader workers, or decoded once and batched on
the device.

The **loader** feed decodes and transforms every image in DataLoader workers (`ntkcl.data.loaders`). The
**device** feed decodes each split once (`ntkcl.data.decoded`: file datasets into a memory-mapped uint8 cache
under `<data root>/decoded/`, array datasets used as they are, memory maps included), and then for every batch

1. takes the batch's images in the loader's order: training batches come from the same `EpochSampler`
   (shuffle, DDP shards, padding, the per-image augmentation seeds, the position a resumed epoch starts at),
   evaluation and end-of-task statistics from the same unpadded shards;
2. gathers their uint8 pixels and draws their crops (`seeded_draws`) in a background thread, one batch ahead;
3. copies them to the device from pinned memory on a side stream, one batch ahead, so the copy of the next
   batch overlaps the computation on this one (CUDA);
4. applies the batched train or test transform there (`ntkcl.data.batched_transforms`).

Both feeds draw an image's crop and flip from a generator seeded with that image's seed, and the batched
transforms equal the per-image ones bit for bit, so a run is the same whichever feed it uses (on CPU, exactly).

`auto` takes the device feed on CUDA when the augmentation has a batched form (`paper`, `resize`, `clip`)
and the decoded splits fit `data.feed_memory_fraction` of the host's physical memory: the cache is read
through the page cache, which has to hold it for batches to be gathered at memory speed. The decoded size is
exact for arrays and an existing cache, otherwise width x height x 3 bytes from every image file's header.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ntkcl.config import RunConfig
from ntkcl.data.batched_transforms import (
    BATCHED_AUGMENTATIONS,
    BatchedTransform,
    build_batched_transforms,
    seeded_draws,
)
from ntkcl.data.decoded import DecodedImages, decode_split
from ntkcl.data.loaders import EpochSampler
from ntkcl.data.plugin import Samples
from ntkcl.data.stream import Stream
from ntkcl.engine.distributed import DistributedContext
from ntkcl.errors import BadInputError

LOADER, DEVICE = "loader", "device"


@dataclass(frozen=True)
class FeedChoice:
    """The feed a run uses and why (written to log.jsonl)."""

    feed: str
    reason: str


def check_feed_setting(config: RunConfig) -> None:
    """`data.feed=device` needs an augmentation with a batched form; exit 2 before anything runs."""
    augment = config.stream.augment
    if config.data.feed == DEVICE and augment not in BATCHED_AUGMENTATIONS:
        raise BadInputError(
            f"data.feed=device needs an augmentation with a batched form ({', '.join(BATCHED_AUGMENTATIONS)}); "
            f"stream.augment is {augment!r}: use --feed loader"
        )


def decoded_bytes(samples: Samples) -> int:
    """Bytes the split takes once decoded (see the module docstring)."""
    if samples.paths is None and samples.arrays.dtype != object:
        arrays = samples.arrays
        return int(arrays.nbytes) if arrays.dtype == np.uint8 else int(np.prod(arrays.shape[:3])) * 3
    total = 0
    for index in range(len(samples)):
        source = samples.image(index)
        if isinstance(source, np.ndarray):
            total += int(np.prod(source.shape[:2])) * 3
        else:
            with Image.open(source) as opened:
                total += opened.width * opened.height * 3
    return total


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_feed(config: RunConfig, stream: Stream, device: torch.device) -> FeedChoice:
    """The feed `data.feed` asks for on `device` (see the module docstring for `auto`)."""
    setting, augment = config.data.feed, config.stream.augment
    check_feed_setting(config)
    if setting != "auto":
        return FeedChoice(setting, f"data.feed is {setting}")
    if device.type != "cuda":
        return FeedChoice(LOADER, f"auto: the device feed is for CUDA, the device is {device.type}")
    if augment not in BATCHED_AUGMENTATIONS:
        return FeedChoice(LOADER, f"auto: stream.augment={augment} has no batched form")
    needed = decoded_bytes(stream.train) + decoded_bytes(stream.test)
    fraction = config.data.feed_memory_fraction
    budget = fraction * host_memory_bytes()
    sizes = f"the decoded splits take {needed / 2**30:.2f} GiB"
    if needed > budget:
        return FeedChoice(LOADER, f"auto: {sizes}, more than {fraction:.0%} of host memory ({budget / 2**30:.1f} GiB)")
    return FeedChoice(DEVICE, f"auto: CUDA, and {sizes}, within {fraction:.0%} of host memory")


@dataclass
class _HostBatch:
    """One batch gathered on the host: uint8 pixels, labels and the transform's plan."""

    pixels: torch.Tensor
    labels: torch.Tensor
    plan: torch.Tensor

    def pinned(self) -> _HostBatch:
        return _HostBatch(self.pixels.pin_memory(), self.labels.pin_memory(), self.plan.pin_memory())

    def to(self, device: torch.device) -> _HostBatch:
        return _HostBatch(*(t.to(device, non_blocking=True) for t in (self.pixels, self.labels, self.plan)))


class DeviceFeed:
    """The decoded train and test splits of a stream and their batched transforms on one device."""

    def __init__(
        self,
        train: DecodedImages,
        test: DecodedImages,
        stream: Stream,
        transforms: tuple[BatchedTransform, BatchedTransform],
        device: torch.device,
    ):
        self.stream, self.device = stream, device
        self.decoded = {id(stream.train): train, id(stream.test): test}
        self.train_transform, self.test_transform = transforms

    @classmethod
    def build(cls, config: RunConfig, stream: Stream, ctx: DistributedContext, cache_root: Path, image_size: int):
        """Decode the stream's splits (rank 0 writes the cache of a file dataset, the others read it)."""
        folder = cache_root / "decoded" / config.stream.dataset.replace(",", "+").replace("/", "_")
        workers = config.runtime.num_workers or 1
        splits = {}
        for name, samples in (("train", stream.train), ("test", stream.test)):
            if ctx.is_main:
                splits[name] = decode_split(samples, name, None, folder, workers)
            ctx.barrier()
            if not ctx.is_main:
                splits[name] = decode_split(samples, name, None, folder, workers, write=False)
        transforms = build_batched_transforms(config.stream.augment, image_size)
        return cls(splits["train"], splits["test"], stream, transforms, ctx.device)

    def serves(self, samples: Samples) -> bool:
        return id(samples) in self.decoded

    def training_batches(
        self, indices: np.ndarray, sampler: EpochSampler, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches the DataLoader over `SeededImages(train, indices)` with `sampler` would give."""
        indices = np.asarray(indices, dtype=np.int64)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            keys = np.fromiter((value for key in sampler for value in key), dtype=np.int64).reshape(-1, 2)
            for start in range(0, len(keys), batch_size):
                positions, seeds = keys[start : start + batch_size].T
                yield indices[positions], seeds

        return self._batches(self.stream.train, chunks(), self.train_transform)

    def scoring_batches(
        self, samples: Samples, indices: np.ndarray, rank: int, world_size: int, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's unpadded shard `indices[rank::world_size]` under the test transform."""
        shard = np.asarray(indices, dtype=np.int64)[rank::world_size]
        chunks = ((shard[start : start + batch_size], None) for start in range(0, len(shard), batch_size))
        return self._batches(samples, chunks, self.test_transform)

    def _gather(self, samples: Samples, chunk: tuple[np.ndarray, np.ndarray | None], transform) -> _HostBatch:
        """Runs in the background thread: pixels, labels and the plan of one batch, pinned for CUDA."""
        indices, seeds = chunk
        pixels, sizes = self.decoded[id(samples)].gather(indices)
        plan = transform.plan(sizes, seeded_draws(seeds) if transform.random else None)
        batch = _HostBatch(pixels, torch.from_numpy(samples.labels[indices]), plan)
        return batch.pinned() if self.device.type == "cuda" else batch

    def _batches(
        self, samples: Samples, chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], transform: BatchedTransform
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = iter(chunks)

        def gather_next() -> _HostBatch | None:
            chunk = next(chunks, None)
            return None if chunk is None else self._gather(samples, chunk, transform)

        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(gather_next)
            upcoming = self._upload(pending.result(), copy_stream)
            while upcoming is not None:
                current = upcoming
                pending = pool.submit(gather_next)  # batch k + 1 is gathered while batch k is computed on
                if cuda:
                    compute_stream = torch.cuda.current_stream(self.device)
                    compute_stream.wait_stream(copy_stream)
                    for tensor in (current.pixels, current.labels, current.plan):
                        tensor.record_stream(compute_stream)
                yield transform.apply(current.pixels, current.plan), current.labels
                # its copy is queued behind the kernels of batch k that the consumer has launched meanwhile
                upcoming = self._upload(pending.result(), copy_stream)

    def _upload(self, batch: _HostBatch | None, copy_stream) -> _HostBatch | None:
        if batch is None or copy_stream is None:
            return batch
        with torch.cuda.stream(copy_stream):
            return batch.to(self.device)

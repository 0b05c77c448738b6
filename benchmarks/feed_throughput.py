"""Images/s of the two data feeds (`data.feed`) over one training epoch, no model: the loader feed (per-image
decode + "paper" training transform in DataLoader workers) at 1, 2, 8 and 16 workers where the host has the
cores, and the device feed (decoded once, gathered in a background thread, batched transform on the device:
CUDA when present, else the CPU), for CIFAR-100-shaped arrays (32 x 32) and a folder of 500 x 375 JPEGs,
at batch 16, 96 and 256, in one run. Both feeds draw the same crops from the same sampler and seeds.
Prints one JSON object; the device feed's one-off decode time is reported apart.

    python benchmarks/feed_throughput.py --arrays 4096 --jpegs 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_throughput import make_images  # noqa: E402

from ntkcl.config import RunConfig  # noqa: E402
from ntkcl.data.loaders import EpochSampler, ImageDataset, SeededImages  # noqa: E402
from ntkcl.data.plugin import Samples  # noqa: E402
from ntkcl.data.stream import Stream  # noqa: E402
from ntkcl.data.transforms import build_transforms  # noqa: E402
from ntkcl.engine.distributed import DistributedContext  # noqa: E402
from ntkcl.engine.feed import DeviceFeed  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_sampler(dataset: SeededImages) -> EpochSampler:
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, seed=0, augmentation_seed=1)
    sampler.set_position(0)
    return sampler


def loader_rate(samples: Samples, image_size: int, workers: int, batch_size: int) -> float:
    train, _ = build_transforms("paper", image_size)
    dataset = SeededImages(ImageDataset(samples, train), range(len(samples)))
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=epoch_sampler(dataset), num_workers=workers, generator=torch.Generator()
    )
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def device_rate(feed: DeviceFeed, samples: Samples, batch_size: int) -> float:
    dataset = SeededImages(ImageDataset(samples, None), range(len(samples)))
    device = feed.device
    synchronize(device)
    start, seen = time.perf_counter(), 0
    for images, _ in feed.training_batches(np.arange(len(samples)), epoch_sampler(dataset), batch_size):
        seen += images.shape[0]
    synchronize(device)
    return seen / (time.perf_counter() - start)


def build_feed(samples: Samples, cache_root: Path, image_size: int, device: torch.device) -> tuple[DeviceFeed, float]:
    stream = Stream.build(samples, samples, int(samples.labels.max()) + 1, 1, 1, None)
    config = RunConfig()
    config.stream.dataset = "benchmark"
    config.runtime.num_workers = os.cpu_count() or 1
    ctx = DistributedContext(device=device)
    start = time.perf_counter()
    feed = DeviceFeed.build(config, stream, ctx, cache_root, image_size)
    return feed, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=4096, help="CIFAR-100-shaped images (32 x 32 x 3)")
    parser.add_argument("--jpegs", type=int, default=512, help="500 x 375 JPEG files")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="16,96,256")
    parser.add_argument("--workers", default="1,2,8,16", help="loader workers; those above the CPU count are skipped")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    workers = [w for w in (int(w) for w in args.workers.split(",")) if w <= cpus]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    results, decode_seconds = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "jpegs"
        rows = make_images(folder, args.jpegs, 500, 375)
        datasets = {
            "cifar100_arrays_32x32": Samples(
                rng.integers(0, 100, args.arrays), arrays=rng.integers(0, 256, (args.arrays, 32, 32, 3), np.uint8)
            ),
            "jpeg_folder_500x375": Samples(np.array([label for _, label in rows]), paths=[folder / r for r, _ in rows]),
        }
        for name, samples in datasets.items():
            feed, decode_seconds[name] = build_feed(samples, Path(scratch) / name, args.image_size, device)
            for batch_size in batch_sizes:
                for count in workers:
                    rate = loader_rate(samples, args.image_size, count, batch_size)
                    results.append(
                        {"data": name, "feed": "loader", "workers": count, "batch": batch_size, "images_per_s": rate}
                    )
                rate = device_rate(feed, samples, batch_size)
                results.append(
                    {"data": name, "feed": "device", "device": device.type, "batch": batch_size, "images_per_s": rate}
                )
    report = {
        "host": {
            "cpus": cpus,
            "load_average_1min": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
        },
        "image_size": args.image_size,
        "images": {"cifar100_arrays_32x32": args.arrays, "jpeg_folder_500x375": args.jpegs},
        "device_feed_decode_s": decode_seconds,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

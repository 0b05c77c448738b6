"""Images/s of the data loader alone (decode + paper transforms + collation), no model.

Generates a folder of JPEGs at a realistic size, then times full passes of a torch DataLoader over it with
the train and test transforms, from the original files and from the `prepare --resize-cache` copies.
Prints one JSON object.

    python benchmarks/loader_throughput.py --images 1000 --size 500x375 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ntkcl.data.loaders import ImageDataset
from ntkcl.data.manifest import write_manifest
from ntkcl.data.plugin import Samples
from ntkcl.data.resize_cache import write_resize_cache
from ntkcl.data.transforms import build_transforms


def make_images(folder: Path, count: int, width: int, height: int, classes: int = 10) -> list[tuple[str, int]]:
    """Smooth colour fields plus texture noise: compresses like a photo (tens of KB at 500x375)."""
    rng = np.random.default_rng(0)
    rows = []
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        label = index % classes
        phase = rng.uniform(0, 6.28, size=3)
        base = np.stack([np.sin(xs / (30 + 7 * c) + ys / (45 + 5 * c) + phase[c]) for c in range(3)], axis=-1)
        pixels = 127 + 90 * base + rng.normal(0, 18, size=(height, width, 3))
        relative = f"class{label:02d}/img{index:05d}.jpg"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / relative, quality=90)
        rows.append((relative, label))
    return rows


def images_per_second(
    paths: list[Path], labels: np.ndarray, transform, workers: int, batch_size: int, passes: int
) -> float:
    dataset = ImageDataset(Samples(labels=labels, paths=paths), transform)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    for _ in loader:  # warm-up pass: worker start-up and page cache
        break
    start = time.perf_counter()
    seen = 0
    for _ in range(passes):
        for images, _ in loader:
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def model_rate(batch_size: int, steps: int = 20) -> dict:
    """Images/s of a ViT-B/16 forward + backward in bf16 on the GPU: the rate a loader has to keep up with."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100).cuda()
    images = torch.rand(batch_size, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 100, (batch_size,), device="cuda")
    for step in range(steps + 5):
        if step == 5:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
    torch.cuda.synchronize()
    forward_backward = steps * batch_size / (time.perf_counter() - start)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for step in range(steps + 5):
            if step == 5:
                torch.cuda.synchronize()
                start = time.perf_counter()
            model(images)
    torch.cuda.synchronize()
    forward = steps * batch_size / (time.perf_counter() - start)
    return {
        "device": torch.cuda.get_device_name(),
        "vit_b16_train_step": round(forward_backward, 1),
        "vit_b16_forward": round(forward, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--model-rate", action="store_true", help="also time a ViT-B/16 step on the GPU")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        rows = make_images(folder, args.images, width, height)
        manifest = write_manifest(folder, "bench", [f"class{c:02d}" for c in range(10)], {"train": rows})
        cache = write_resize_cache(folder, manifest, args.cache_size)
        labels = np.array([label for _, label in rows])
        train, test = build_transforms("paper", 224)
        mean_kb = np.mean([(folder / r).stat().st_size for r, _ in rows]) / 1024
        results = {}
        for source, base in (("original", folder), (f"resized-{args.cache_size}", cache)):
            paths = [base / r for r, _ in rows]
            for name, transform in (("train", train), ("test", test)):
                results[f"{source}/{name}"] = round(
                    images_per_second(paths, labels, transform, args.workers, args.batch_size, args.passes), 1
                )
    print(
        json.dumps(
            {
                "benchmark": "loader_throughput",
                "images": args.images,
                "image_size": f"{width}x{height}",
                "mean_jpeg_kb": round(float(mean_kb), 1),
                "workers": args.workers,
                "batch_size": args.batch_size,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "pillow": Image.__version__,
                "images_per_second": results,
                "gpu_images_per_second": model_rate(args.batch_size) if args.model_rate else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Cost of `ntkcl diagnose` per probe image: the Jacobian of a method's logits with respect to its tuned
parameters (`ntkcl.diagnostics.kernels.tangent_features`), on a randomly initialised backbone.

Each method is walked through `--tasks` tasks of `--classes` classes with random images (end-of-task
statistics included), then the tangent features of `--images` random probe images are timed, for the
seen-class logits and for a `--outputs` projection of them. Prints one JSON document: per method, the tuned
parameter count, seconds per probe image for each output count, and the Jacobian's size per image
(K outputs x P parameters, fp32), which is what the kernel keeps in memory per probe image.

Usage: python benchmarks/diagnose_cost.py [--backbone vit_base_patch16_224] [--methods ntk-cl cl-lora proteus]
       [--tasks 2] [--classes 10] [--images 2] [--outputs 8] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch
from _device import describe_device, peak_memory_mb, pick_device, synchronize

from ntkcl.diagnostics import kernels
from ntkcl.diagnostics.run import trained_parameter_names
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.registry import get_method
from ntkcl.models.backbone import create_backbone


class RandomTaskImages:
    """`TaskData` over a fixed batch of random images, two per class of the task."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.device = images.device
        self._images, self._labels = images, labels

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self._images, self._labels

    def indexed_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        yield self._images, self._labels, torch.arange(len(self._labels), device=self.device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def trained_method(name: str, backbone, device: torch.device, args):
    method_class = get_method(name)
    params = {"projection_dim": 1000} if name == "proteus" else {}
    tasks = [TaskInfo(t, args.tasks, t * args.classes, args.classes) for t in range(args.tasks)]
    names = trained_parameter_names(_fresh(method_class, backbone, params, tasks, device))
    method = _fresh(method_class, backbone, params, tasks, device)
    size = backbone.img_size
    for task in tasks:
        method.begin_task(task)
        method.to(device)
        labels = torch.arange(task.known_classes, task.total_classes, device=device).repeat(2)
        method.end_task(task, RandomTaskImages(torch.rand(len(labels), 3, size, size, device=device), labels))
    return method.eval(), names


def _fresh(method_class, backbone, params, tasks, device):
    torch.manual_seed(0)
    method = method_class(backbone, method_class.Params(**params)).to(device)
    method.begin_stream(tasks)
    return method


def measure(method, names: list[str], outputs: int | None, device: torch.device, args) -> float:
    size = method.backbone.img_size
    images = torch.rand(args.images, 3, size, size, device=device)
    projection = None if outputs is None else torch.randn(method.seen_classes, outputs, dtype=torch.float64)
    kernels.tangent_features(method, names, images[:1], projection, batch_size=1)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    kernels.tangent_features(method, names, images, projection, batch_size=args.images)
    synchronize(device)
    return (time.perf_counter() - started) / args.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--methods", nargs="+", default=["ntk-cl", "cl-lora", "proteus"])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--outputs", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    backbone = create_backbone(args.backbone, pretrained=False).to(device)
    results = {}
    for name in args.methods:
        method, names = trained_method(name, backbone, device, args)
        present = [n for n in names if n in dict(method.named_parameters())]
        parameters = sum(dict(method.named_parameters())[n].numel() for n in present)
        seen = method.seen_classes
        results[name] = {
            "tuned_parameters": parameters,
            "seconds_per_probe_image": {
                f"{seen} logits": measure(method, present, None, device, args),
                f"{args.outputs} projected outputs": measure(method, present, args.outputs, device, args),
            },
            "jacobian_mb_per_probe_image": {
                f"{seen} logits": seen * parameters * 4 / 2**20,
                f"{args.outputs} projected outputs": args.outputs * parameters * 4 / 2**20,
            },
        }
    print(
        json.dumps(
            {
                "device": describe_device(device),
                "backbone": args.backbone,
                "tasks": args.tasks,
                "classes_per_task": args.classes,
                "threads": torch.get_num_threads(),
                "methods": results,
                "peak_memory_mb": peak_memory_mb(device),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""KeepLoRA's per-task costs on CLIP ViT-B/16 (open_clip's OpenAI architecture, random weights).

Prints one JSON document with images/s of the three passes a task makes over its training images and the
seconds of the per-task linear algebra:

* training: forward + backward + AdamW step of B on batches of `--batch` images, the text encoder run on the
  task's class prompts every step (both encoders carry LoRA);
* gradient estimate: the full-gradient pass over the task's images with merged weights (no LoRA);
* feature pass: the no-grad pass recording every adapted weight's input;
* SVD work: the protected bases of the pre-trained weights (once, before the first task), the residual
  gradients' low-rank SVDs with the offsets (every task), the GPM updates (every task).

bf16 autocast on GPU (fp32/fp64 linear algebra), fp32 on CPU, as in training. Random weights give the same
shapes and costs as the real checkpoint.

Usage: python benchmarks/keeplora_throughput.py [--device auto] [--batch 64] [--images 256] [--steps 5]
       [--warmup 1] [--classes 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from _device import optimizer_step, peak_memory_mb, synchronize

from ntkcl.data.scenarios import TASK_INCREMENTAL
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.keeplora import KeepLoRA, KeepLoRAParams
from ntkcl.models.backbone import create_backbone


class GeneratedImages:
    """`TaskData` over random images of the task's classes, in batches of `batch` on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int):
        self.device = images.device
        self.images, self.labels, self.batch = images, labels, batch

    def batches(self):
        for start in range(0, len(self.labels), self.batch):
            yield self.images[start : start + self.batch], self.labels[start : start + self.batch]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def timed(device: torch.device, work) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64, help="training, gradient and feature batch (reference: 64)")
    parser.add_argument("--images", type=int, default=256, help="training images of the task")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--classes", type=int, default=100, help="classes of the task (Aircraft: 100)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    backbone = create_backbone("clip:ViT-B-16/openai", pretrained=False, normalize="clip").to(device)
    torch.manual_seed(0)
    method = KeepLoRA(backbone, KeepLoRAParams(feature_batch_size=args.batch)).to(device)
    names = tuple(f"class {index}" for index in range(args.classes))
    task = TaskInfo(0, 11, 0, args.classes, class_names=names, scenario=TASK_INCREMENTAL)
    method.begin_stream([task])
    method.begin_task(task)
    size = backbone.img_size
    images = torch.rand(args.images, 3, size, size, device=device)
    labels = torch.arange(args.images, device=device) % args.classes
    data = GeneratedImages(images, labels, args.batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    weight_bases_s, _ = timed(device, method.protect_pretrained_weights)
    with autocast:
        gradient_s, gradients = timed(device, lambda: method.estimate_gradients(task, data))
    lora_init_s, loras = timed(device, lambda: method.loras_from_gradients(gradients))
    method.attach_loras(loras)

    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    train_step = optimizer_step(method, optimizer, autocast, images[: args.batch], labels[: args.batch])

    method.train()
    for _ in range(args.warmup):
        train_step()
    train_s, _ = timed(device, lambda: [train_step() for _ in range(args.steps)])
    method.eval()
    method.merge()
    with autocast, torch.no_grad():
        feature_s, statistics = timed(device, lambda: method.accumulate_features(task, data))
    gpm_s, _ = timed(device, lambda: method.grow_bases(statistics, data))

    basis_widths = [basis.width for basis in method.bases.values()]
    result = {
        "backbone": "clip:ViT-B-16/openai (random weights)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "batch": args.batch,
        "task_images": args.images,
        "task_classes": args.classes,
        "adapted_weights": len(method.targets),
        "train_images_per_s": args.steps * args.batch / train_s,
        "gradient_estimate_images_per_s": args.images / gradient_s,
        "feature_pass_images_per_s": args.images / feature_s,
        "svd_seconds": {
            "pretrained_weight_bases_first_task_only": weight_bases_s,
            "residual_gradient_lowrank_svd": lora_init_s,
            "gpm_update": gpm_s,
            "per_task": lora_init_s + gpm_s,
        },
        "basis_width_mean_after_task": sum(basis_widths) / len(basis_widths),
        "peak_memory_mb": peak_memory_mb(device),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""CL-LoRA training and evaluation throughput, and its shared-prefix inference against one full pass per task.

Prints one JSON document, every number measured in the same run on the same randomly initialised model:

* train: images/s of a second-task batch (both optimizer steps: distillation, then cross-entropy +
  orthogonality) through the engine's `train_step`, for each `ce_gradient`, and peak memory;
* eval: images/s of `predict` with N stored tasks (default 10 and 40), with the blocks before the first
  task-specific block run once per image and the rest batched over tasks ("shared_prefix", the default),
  and with the whole ViT run once per stored task as the reference does ("per_task"); `speedup` is their
  ratio.

bf16 autocast on GPU, fp32 on CPU, as the engine runs.

Usage: python benchmarks/cl_lora_throughput.py [--backbone vit_base_patch16_224] [--batch 32] [--eval-batch 64]
       [--stored-tasks 10 40] [--rank 10] [--device auto] [--steps 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json

import torch
from _device import describe_device, peak_memory_mb, pick_device, timed

from ntkcl.config import OptimConfig
from ntkcl.engine.optim import TaskOptimization
from ntkcl.engine.training import ShardedBatches, train_step
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.cl_lora import CLLoRA, CLLoRAParams
from ntkcl.models.backbone import create_backbone

CLASSES_PER_TASK = 5


def method_with_tasks(backbone, device, num_tasks: int, **params) -> CLLoRA:
    """A method in task `num_tasks - 1` whose earlier tasks are finished, with random non-zero adapters."""
    torch.manual_seed(0)
    method = CLLoRA(backbone, CLLoRAParams(**params)).to(device)
    for index in range(num_tasks):
        method.begin_task(TaskInfo(index, num_tasks, index * CLASSES_PER_TASK, CLASSES_PER_TASK))
        method.to(device)
        with torch.no_grad():
            for lora in [*method.tasks[-1].q, *method.tasks[-1].v]:
                lora.up.normal_(std=0.01)
            method.prototypes.prototypes.normal_()
        method.seen_classes = (index + 1) * CLASSES_PER_TASK
    return method


def autocast_on(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def measure_training(backbone, device, ce_gradient: str, args) -> dict:
    method = method_with_tasks(backbone, device, 2, rank=args.rank, ce_gradient=ce_gradient).train()
    optimization = TaskOptimization.build(method, OptimConfig(lr=0.01, momentum=0.9), updates_per_epoch=1, epochs=1)
    size = backbone.img_size
    images = torch.rand(args.batch, 3, size, size, device=device)
    labels = torch.randint(CLASSES_PER_TASK, 2 * CLASSES_PER_TASK, (args.batch,), device=device)
    parts = ShardedBatches(args.batch, args.batch, 1, 0).micro_batches(0, args.batch, 1)
    precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        train_step(method, method, optimization, images, labels, parts, device, precision)

    for _ in range(args.warmup):
        step()
    seconds = timed(device, step, args.steps)
    return {"images_per_s": args.batch / seconds, "peak_memory_mb": peak_memory_mb(device)}


def measure_inference(backbone, device, num_tasks: int, args) -> dict:
    method = method_with_tasks(backbone, device, num_tasks, rank=args.rank).eval()
    size = backbone.img_size
    images = torch.rand(args.eval_batch, 3, size, size, device=device)
    rates = {}
    for inference in ("shared_prefix", "per_task"):
        method.params.inference = inference
        with torch.no_grad(), autocast_on(device):
            for _ in range(args.warmup):
                method.predict(images)
            seconds = timed(device, lambda: method.predict(images), args.steps)
        rates[f"{inference}_images_per_s"] = args.eval_batch / seconds
    rates["speedup"] = rates["shared_prefix_images_per_s"] / rates["per_task_images_per_s"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=32, help="training batch (the reference's ImageNet-R/A)")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--stored-tasks", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = pick_device(args.device)
    backbone = create_backbone(args.backbone, pretrained=False).to(device)
    document = {
        "device": describe_device(device),
        "backbone": f"{args.backbone} (random init)",
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "rank": args.rank,
        "batch": args.batch,
        "eval_batch": args.eval_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "train": {mode: measure_training(backbone, device, mode, args) for mode in ("before_kd_step", "after_kd_step")},
        "eval": {
            f"{count}_stored_tasks": measure_inference(backbone, device, count, args) for count in args.stored_tasks
        },
    }
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

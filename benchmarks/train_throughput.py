"""NTK-CL training and evaluation throughput: the optimised path against a plain sequential fp32 one.

Prints one JSON document. Both executions run in the same process on the same model, so the speed-up is a
ratio measured in one run:

* optimised: frozen branches without autograd, stacked branch passes, the orthogonality basis once per task,
  bf16 autocast on GPU (fp32 for SVD, prototypes and averaging), no host-device sync in the step loop;
* sequential: the reference's execution, 4-5 full passes per image one after another with autograd, the SVD
  recomputed every batch, fp32.

Usage: python benchmarks/train_throughput.py [--backbone vit_base_patch16_224] [--batch 16] [--device auto]
       [--steps 10] [--warmup 2] [--use-init-ptm] [--mode both|optimised|sequential]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from _device import optimizer_step, peak_memory_mb, synchronize

from ntkcl.methods.base import TaskInfo
from ntkcl.methods.ntk_cl import NTKCL, NTKCLParams
from ntkcl.models.backbone import create_backbone


def measure(backbone, device, mode: str, args) -> dict:
    sequential = mode == "sequential"
    execution = "sequential" if sequential else "fast"
    params = NTKCLParams(use_init_ptm=args.use_init_ptm, execution=execution)
    torch.manual_seed(0)
    method = NTKCL(backbone, params).to(device)
    # Second task of a 10-class stream: old prototypes exist, so every loss term is active.
    method.begin_task(TaskInfo(0, 2, 0, 5))
    with torch.no_grad():
        method.prototypes.prototypes.normal_()
    method.begin_task(TaskInfo(1, 2, 5, 5))
    method.seen_classes = 10
    optimizer = torch.optim.SGD(method.parameter_groups()[0]["params"], lr=0.01, momentum=0.9)
    use_bf16 = device.type == "cuda" and not sequential
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    size = backbone.img_size
    images = torch.rand(args.batch, 3, size, size, device=device)
    labels = torch.randint(5, 10, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step = optimizer_step(method, optimizer, autocast, images, labels)

    method.train()
    for _ in range(args.warmup):
        train_step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    synchronize(device)
    train_seconds = time.perf_counter() - started
    method.eval()
    with torch.no_grad(), autocast:
        for _ in range(args.warmup):
            method.predict(images)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            method.predict(images)
        synchronize(device)
    eval_seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "execution": execution,
        "precision": "bf16" if use_bf16 else "fp32",
        "train_images_per_s": args.batch * args.steps / train_seconds,
        "eval_images_per_s": args.batch * args.steps / eval_seconds,
        "peak_memory_mb": peak_memory_mb(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--use-init-ptm", action="store_true")
    parser.add_argument("--mode", choices=["both", "optimised", "sequential"], default="both")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    backbone = create_backbone(args.backbone, pretrained=False).to(device)
    modes = ["optimised", "sequential"] if args.mode == "both" else [args.mode]
    results = {mode: measure(backbone, device, mode, args) for mode in modes}
    document = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backbone": f"{args.backbone} (random init)",
        "batch": args.batch,
        "steps": args.steps,
        "use_init_ptm": args.use_init_ptm,
        "torch": torch.__version__,
        **results,
    }
    if len(results) == 2:
        document["speedup"] = {
            key: results["optimised"][key] / results["sequential"][key]
            for key in ("train_images_per_s", "eval_images_per_s")
        }
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

"""NTK-CL training and evaluation throughput, FLOPs and MFU: the optimised path against a plain sequential fp32 one.

Prints one JSON document. Both executions run in the same process on the same model, so the speed-up is a
ratio measured in one run, and the device's peak matmul throughput is measured in that run too:

* optimised: frozen branches without autograd, stacked branch passes, the orthogonality basis once per task,
  bf16 autocast on GPU (fp32 for SVD, prototypes and averaging), the engine's optimizer (fused where
  available), and `torch.compile` of the method's compile targets as the engine would do it (`--compile`;
  `auto` = on for CUDA, CUDA graphs on one GPU);
* sequential: the reference's execution, 4-5 full passes per image one after another with autograd, the SVD
  recomputed every batch, fp32, eager.

For each batch size: train and eval images/s, FLOPs per image (counted, with how), MFU, peak memory and
compile seconds; `--profile` adds the top kernels of a few optimised training steps and the share of the
step's wall time outside them.

Usage: python benchmarks/train_throughput.py [--backbone vit_base_patch16_224] [--batch 16 96 256]
       [--device auto] [--steps 10] [--warmup 3] [--use-init-ptm] [--mode both|optimised|sequential]
       [--compile auto|on|off] [--model-kwargs '{"img_size": 32, "patch_size": 8, "depth": 2}'] [--profile]
"""

from __future__ import annotations

import argparse
import json

import torch
from _device import (
    FLOPS_DERIVATION,
    count_flops,
    describe_device,
    model_flops_utilisation,
    optimizer_step,
    peak_matmul,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
    synchronize,
    timed,
)

from ntkcl.config import OptimConfig
from ntkcl.engine.optim import build_optimizer
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.ntk_cl import NTKCL, NTKCLParams
from ntkcl.models.backbone import create_backbone


def prepared_method(backbone, device, sequential: bool, use_init_ptm: bool) -> NTKCL:
    """NTK-CL in the second task of a 10-class stream: old prototypes exist, so every loss term is active."""
    params = NTKCLParams(use_init_ptm=use_init_ptm, execution="sequential" if sequential else "fast")
    torch.manual_seed(0)
    method = NTKCL(backbone, params).to(device)
    method.begin_task(TaskInfo(0, 2, 0, 5))
    with torch.no_grad():
        method.prototypes.prototypes.normal_()
    method.begin_task(TaskInfo(1, 2, 5, 5))
    method.seen_classes = 10
    return method


def compiled_now(method, device, setting: str, batch: int) -> bool:
    """Compile the method's targets as the engine does (an `auto` run is taken to be long)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    from ntkcl.engine.compile import compile_method, plan_compilation

    plan = plan_compilation("on", device, 1, False, (batch,))
    return bool(compile_method(method, plan, lambda message: print(message, flush=True)))


def compile_seconds() -> float:
    from ntkcl.engine.compile import compile_seconds as seconds

    return seconds()


def profile_summary(device: torch.device, step, steps: int = 5) -> dict:
    """Top kernels (device time on GPU, self CPU time on CPU) of `steps` calls and the share outside them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        wall = timed(device, step, steps) * steps
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda event: getattr(event, attribute), reverse=True)
    kernel_seconds = sum(getattr(event, attribute) for event in events) / 1e6
    return {
        "steps": steps,
        "wall_s": wall,
        "time_in_kernels_s": kernel_seconds,
        "share_outside_kernels": max(0.0, 1.0 - kernel_seconds / wall) if device.type == "cuda" else None,
        "top": [
            {"name": event.key, "seconds": getattr(event, attribute) / 1e6, "calls": event.count}
            for event in events[:10]
        ],
    }


def measure(backbone, device, mode: str, batch: int, args, peak_tflops: float) -> dict:
    sequential = mode == "sequential"
    method = prepared_method(backbone, device, sequential, args.use_init_ptm)
    optim = OptimConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0)
    optimizer = build_optimizer(method.parameter_groups(), optim)
    use_bf16 = device.type == "cuda" and not sequential
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    size = backbone.img_size
    images = torch.rand(batch, 3, size, size, device=device)
    labels = torch.randint(5, 10, (batch,), device=device)

    train_step = optimizer_step(method, optimizer, autocast, images, labels)

    def eval_step():
        with torch.no_grad(), autocast:
            method.predict(images)

    method.train()
    flops_train = count_flops(train_step)
    method.eval()
    flops_eval = count_flops(eval_step)
    compiled = not sequential and compiled_now(method, device, args.compile, batch)
    reset_peak_memory(device)
    compile_before = compile_seconds() if compiled else 0.0
    method.train()
    timed(device, train_step, args.warmup)
    train_seconds = timed(device, train_step, args.steps)
    method.eval()
    timed(device, eval_step, args.warmup)
    eval_seconds = timed(device, eval_step, args.steps)
    train_rate, eval_rate = batch / train_seconds, batch / eval_seconds
    per_image_train, per_image_eval = flops_train["total"] / batch, flops_eval["total"] / batch
    result = {
        "mode": mode,
        "execution": "sequential" if sequential else "fast",
        "precision": "bf16" if use_bf16 else "fp32",
        "compiled": compiled,
        "compile_s": (compile_seconds() - compile_before) if compiled else 0.0,
        "train_images_per_s": train_rate,
        "eval_images_per_s": eval_rate,
        "train_gflop_per_image": per_image_train / 1e9,
        "eval_gflop_per_image": per_image_eval / 1e9,
        "train_flops_by_operator": flops_train["by_operator"],
        "train_mfu": model_flops_utilisation(train_rate, per_image_train, peak_tflops),
        "eval_mfu": model_flops_utilisation(eval_rate, per_image_eval, peak_tflops),
        "peak_memory_mb": peak_memory_mb(device),
    }
    if args.profile and not sequential:
        method.train()
        result["train_profile"] = profile_summary(device, train_step)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--model-kwargs", default="{}", help="JSON of extra timm.create_model arguments")
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--use-init-ptm", action="store_true")
    parser.add_argument("--mode", choices=["both", "optimised", "sequential"], default="both")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--profile", action="store_true", help="top kernels of the optimised training step")
    args = parser.parse_args()
    device = pick_device(args.device)
    model_kwargs = json.loads(args.model_kwargs)
    backbone = create_backbone(args.backbone, pretrained=False, model_kwargs=model_kwargs).to(device)
    peak = peak_matmul(device)
    modes = ["optimised", "sequential"] if args.mode == "both" else [args.mode]
    batches = {}
    for batch in args.batch:
        results = {mode: measure(backbone, device, mode, batch, args, peak["tflops"]) for mode in modes}
        if len(results) == 2:
            results["speedup"] = {
                key: results["optimised"][key] / results["sequential"][key]
                for key in ("train_images_per_s", "eval_images_per_s")
            }
        batches[str(batch)] = results
    document = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "backbone": f"{args.backbone} {model_kwargs or ''} (random init)".replace("  ", " "),
        "use_init_ptm": args.use_init_ptm,
        "steps": args.steps,
        "peak_matmul": peak,
        "flops_derivation": FLOPS_DERIVATION,
        "batches": batches,
    }
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

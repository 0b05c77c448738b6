"""Timing helpers the benchmark scripts share (run them as `python benchmarks/NAME.py`).

MFU = achieved model FLOP/s / the device's measured peak matmul FLOP/s (bf16 on GPU, fp32 on CPU), both
measured in the same run.
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def optimizer_step(method, optimizer: torch.optim.Optimizer, autocast, images: torch.Tensor, labels: torch.Tensor):
    """A function running one training step of `method` on a fixed batch: forward under `autocast`, backward,
    optimizer update."""

    def step() -> None:
        with autocast:
            loss = method.training_step(images, labels).total()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


FLOPS_DERIVATION = (
    "torch.utils.flop_counter.FlopCounterMode over one eager step of the method as the benchmark runs it "
    "(forward, and for training the backward and nothing else), divided by the batch size; it counts matrix "
    "products, convolutions and attention at 2 FLOPs per multiply-add and ignores elementwise work."
)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed(device: torch.device, function: Callable[[], object], repeats: int) -> float:
    """Seconds per call of `function`, synchronised around the timed calls."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def peak_matmul(device: torch.device, size: int | None = None, repeats: int = 20) -> dict:
    """Measured matmul throughput of the device: a square bf16 product on GPU (8192), fp32 on CPU (1024)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    timed(device, lambda: left @ right, 3)
    seconds = timed(device, lambda: left @ right, repeats if device.type == "cuda" else max(3, repeats // 4))
    return {"dtype": str(dtype).removeprefix("torch."), "size": size, "tflops": 2 * size**3 / seconds / 1e12}


def count_flops(function: Callable[[], object]) -> dict:
    """FLOPs of one call of `function` by operator (FlopCounterMode), and their total."""
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    by_operator = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": int(counter.get_total_flops()), "by_operator": by_operator}


def model_flops_utilisation(images_per_s: float, flops_per_image: float, peak_tflops: float) -> float:
    return images_per_s * flops_per_image / (peak_tflops * 1e12)

"""Timing helpers the benchmark scripts share (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import resource

import torch


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

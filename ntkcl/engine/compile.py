"""Step compilation (`runtime.compile`, `--compile/--no-compile`): `torch.compile` of the passes a method
names, with an eager fallback.

A method lists in `compile_targets` the bound methods that hold its heavy work and do not depend on the
task (NTK-CL: `features`, the frozen and current backbone passes plus the fusion; finetune, SimpleCIL and
RanPAC: `features`; CL-LoRA: `task_feature`, `early_exit_feature`; the prompt methods: `query_and_prefix`;
the CLIP methods, KeepLoRA and KeepLoRA+ among them: `image_features`; PROTEUS: `task_pass`). Per-task
Python state (class counts, a new proxy head, growing prototype tables, which dataset's text features)
stays outside, so one compilation serves every task instead of one per task. Where a pass's shapes grow with
the tasks (PROTEUS's pool of units), the method reads `compiled_targets` and takes a form of the pass whose
shapes are the same for every task. The engine replaces each target on the instance by `StaticShapeCompiled`:

* only batches of the run's full sizes (the per-process training batch, the evaluation batch) run
  compiled, with `dynamic=False`; a task's last, smaller batch runs eagerly, so every compiled graph has
  static shapes. On one CUDA process the mode is "reduce-overhead": the passes replay as CUDA graphs,
  which removes the per-kernel launch cost that dominates small batches. Under DDP it is "default";
* the backward graph is compiled together with the forward one, so a compilation error surfaces in the
  first compiled call; it is reported in one line and that target runs eagerly for the rest of the run
  (an error of the computation itself then re-raises from the eager call).

`auto` compiles only on CUDA and only when the run has at least `COMPILE_PAYBACK_STEPS` full-batch training
steps: compiling NTK-CL's ViT-B passes is expected to take on the order of a minute, paid back by tens of
milliseconds saved per step at the papers' batch of 16. This is an estimate to be checked on a GPU; inductor's
on-disk cache (on by default) makes later runs of the same shapes compile faster. Compilation seconds, read
from torch's own compile-time counters, are written per task to log.jsonl (`compile_s`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

COMPILE_PAYBACK_STEPS = 2_000
CUDA_GRAPH_MODE = "reduce-overhead"


@dataclass(frozen=True)
class CompilePlan:
    """Whether and how the run compiles; `reason` says why, for the log."""

    enabled: bool
    reason: str
    mode: str = "default"
    backend: str = "inductor"
    batch_sizes: tuple[int, ...] = ()


def plan_compilation(
    setting: str, device: torch.device, full_steps: int, distributed: bool, batch_sizes: tuple[int, ...]
) -> CompilePlan:
    """The plan for `runtime.compile` = `setting` (auto, on, off); see the module docstring for `auto`."""
    if setting == "off":
        return CompilePlan(False, "runtime.compile is off")
    if setting == "auto" and device.type != "cuda":
        return CompilePlan(False, f"auto: compiles on CUDA only, the device is {device.type}")
    if setting == "auto" and full_steps < COMPILE_PAYBACK_STEPS:
        return CompilePlan(
            False, f"auto: {full_steps} full-batch training steps, fewer than the {COMPILE_PAYBACK_STEPS} that pay back"
        )
    mode = CUDA_GRAPH_MODE if device.type == "cuda" and not distributed else "default"
    reason = "runtime.compile is on" if setting == "on" else f"auto: {full_steps} full-batch training steps on CUDA"
    return CompilePlan(True, reason, mode, "inductor", tuple(sorted(set(batch_sizes))))


def compile_seconds() -> float:
    """Seconds torch has spent compiling in this process (dynamo frames, with their backward graphs)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


class StaticShapeCompiled:
    """`function` compiled for inputs whose first argument's batch size is in `plan.batch_sizes`.

    Other batch sizes run `function` eagerly, as does every call after a compilation error (reported once
    through `on_failure`).
    """

    def __init__(self, function: Callable, plan: CompilePlan, on_failure: Callable[[str], None]):
        self.eager = function
        self.batch_sizes = set(plan.batch_sizes)
        self.on_failure = on_failure
        self.failure: str | None = None
        options = {"mode": plan.mode} if plan.backend == "inductor" else {}
        self.compiled = torch.compile(function, backend=plan.backend, dynamic=False, **options)

    def __call__(self, images: torch.Tensor, *args, **kwargs):
        if self.compiled is None or images.shape[0] not in self.batch_sizes:
            return self.eager(images, *args, **kwargs)
        try:
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                return self.compiled(images, *args, **kwargs)
        except Exception as error:  # any compiler failure; an error of the computation re-raises eagerly below
            self.compiled = None
            self.failure = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            self.on_failure(f"compilation failed, running eagerly: {self.failure}")
            return self.eager(images, *args, **kwargs)


def compile_method(method: nn.Module, plan: CompilePlan, on_failure: Callable[[str], None]) -> list[str]:
    """Replace the method's `compile_targets` on the instance by compiled wrappers, list them in the
    method's `compiled_targets`, and return their names."""
    if not plan.enabled:
        return []
    names = list(getattr(method, "compile_targets", ()))
    for name in names:
        setattr(method, name, StaticShapeCompiled(getattr(method, name), plan, on_failure))
    method.compiled_targets = tuple(names)
    return names

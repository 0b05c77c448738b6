"""Per-task optimiser, learning-rate schedule and gradient clipping: `TaskOptimization.build`.

Every task gets a new optimiser and schedule. The defaults are the papers' and stay exactly as they were:
torch's SGD / Adam / AdamW over the method's `parameter_groups()`, cosine annealing (or a constant rate)
stepped once per epoch, no clipping. timm's training options are opt-in (`optim.*`):

* `layer_decay`: learning rate x layer_decay^(L + 1 - layer) with L the backbone's blocks (BEiT / timm's
  layer-wise decay): embeddings are layer 0, block i and every module attached to it layer i + 1, heads and
  everything else layer L + 1.
* `weight_decay_exclude_1d`: no weight decay on 1-D parameters, biases and the backbone's `no_weight_decay()`
  names (timm's `filter_bias_and_bn`).
* an optimizer name outside sgd / adam / adamw (lamb, lion, nadamw, ...): timm's `create_optimizer_v2`.
* `warmup_epochs` (from `warmup_lr`), `sched_on_updates` (step the schedule after every optimizer update),
  or layer decay: timm's `create_scheduler_v2`, which also applies each group's `lr_scale`.
* `clip_grad` / `clip_mode` (norm, value, agc): timm's `dispatch_clip_grad` before every optimizer step.

`scheduler = "onecycle"` is torch's OneCycleLR stepped after every update (KeepLoRA's schedule). New
schedules go into `_build_schedule`, new parameter-group rules into
`parameter_groups`; the training step calls only `TaskOptimization.step`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ntkcl.config import TORCH_OPTIMIZERS, OptimConfig

_BLOCK_PARAMETER = re.compile(r"^backbone\.vit\.blocks\.(\d+)\.")
_BACKBONE_HEAD = ("backbone.vit.norm.", "backbone.vit.fc_norm.", "backbone.vit.head.", "backbone.vit.attn_pool.")


def layer_of(method: nn.Module, name: str, num_blocks: int) -> int:
    """The layer of parameter `name` for layer-wise decay: 0 embeddings, i + 1 block i, L + 1 the rest.

    A method's module belongs to block i when it sits at index i of a module list with one entry per block
    (adapters, prompt generators); a parameter inside the backbone is placed by the timm block it is in.
    """
    block = _BLOCK_PARAMETER.match(name)
    if block:
        return int(block.group(1)) + 1
    if name.startswith("backbone."):
        return num_blocks + 1 if name.startswith(_BACKBONE_HEAD) else 0
    parts = name.split(".")
    module = method
    for part in parts[:-1]:
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) == num_blocks and part.isdigit():
            return int(part) + 1
        module = getattr(module, part)
    return num_blocks + 1


def _excluded_from_decay(name: str, parameter: nn.Parameter, backbone_no_decay: set[str]) -> bool:
    return parameter.ndim <= 1 or name.endswith(".bias") or name in backbone_no_decay


def parameter_groups(method: nn.Module, settings: OptimConfig) -> list[dict]:
    """The method's `parameter_groups()`, split by layer (lr_scale) and by decay when those options are on.

    A group keeps its own options (lr, weight_decay...); a split adds `lr_scale` and sets `weight_decay` 0
    for the excluded parameters.
    """
    groups = method.parameter_groups()
    if settings.layer_decay is None and not settings.weight_decay_exclude_1d:
        return groups
    names = {id(parameter): name for name, parameter in method.named_parameters()}
    vit = method.backbone.vit
    num_blocks = len(vit.blocks)
    no_decay_names = getattr(vit, "no_weight_decay", lambda: set())()
    backbone_no_decay = {f"backbone.vit.{name}" for name in no_decay_names}
    split: list[dict] = []
    for group in groups:
        options = {key: value for key, value in group.items() if key != "params"}
        parts: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for parameter in group["params"]:
            name = names[id(parameter)]
            layer = layer_of(method, name, num_blocks) if settings.layer_decay is not None else num_blocks + 1
            decayed = not (
                settings.weight_decay_exclude_1d and _excluded_from_decay(name, parameter, backbone_no_decay)
            )
            parts.setdefault((layer, decayed), []).append(parameter)
        for (layer, decayed), members in parts.items():
            part = {**options, "params": members}
            if not decayed:
                part["weight_decay"] = 0.0
            if settings.layer_decay is not None:
                part["lr_scale"] = settings.layer_decay ** (num_blocks + 1 - layer)
            split.append(part)
    return split


def fused_update(groups: list[dict], optimizer: str) -> dict:
    """One fused kernel per step instead of a loop over parameters: SGD's fused update equals its loop bit
    for bit on CPU and GPU; Adam's differs in the last bit, so it is fused on CUDA only."""
    devices = {parameter.device.type for group in groups for parameter in group["params"]}
    return {"fused": True} if devices and (optimizer == "sgd" or devices == {"cuda"}) else {}


def build_optimizer(groups: list[dict], settings: OptimConfig, allow_fused: bool = True) -> torch.optim.Optimizer:
    """torch's class for sgd / adam / adamw (as in the papers), timm's factory for any other name.

    `allow_fused=False` keeps the per-parameter loop: torch's fused SGD fails on a step where some parameters
    have momentum buffers and others not yet, which happens when a batch's stages update different parameters.
    """
    fused = fused_update(groups, settings.optimizer) if allow_fused else {}
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay, **fused
        )
    if settings.optimizer in TORCH_OPTIMIZERS:
        optimizer = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
        return optimizer(groups, lr=settings.lr, weight_decay=settings.weight_decay, **fused)
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        groups, opt=settings.optimizer, lr=settings.lr, weight_decay=settings.weight_decay, momentum=settings.momentum
    )


class Schedule:
    """A learning-rate schedule stepped after each epoch (`epoch_end`) or after each update (`update`)."""

    def __init__(self, scheduler, per_update: bool, timm_style: bool):
        self.scheduler = scheduler
        self.per_update = per_update
        self._timm = timm_style

    def update(self, updates: int) -> None:
        """After `updates` optimizer updates of the task."""
        if self.per_update:
            if self._timm:
                self.scheduler.step_update(updates)
            else:
                self.scheduler.step()

    def epoch_end(self, epochs_done: int) -> None:
        if self._timm:
            self.scheduler.step(epochs_done)
        elif not self.per_update:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def uses_timm_scheduler(settings: OptimConfig) -> bool:
    return settings.warmup_epochs > 0 or settings.sched_on_updates or settings.layer_decay is not None


def _build_schedule(
    optimizer: torch.optim.Optimizer, settings: OptimConfig, updates_per_epoch: int, epochs: int
) -> Schedule:
    if settings.scheduler == "onecycle":
        # KeepLoRA's schedule: torch's OneCycleLR with its defaults, peaking at the configured rate.
        max_lr = [group["lr"] for group in optimizer.param_groups]
        total = max(1, epochs * updates_per_epoch)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total)
        return Schedule(scheduler, per_update=True, timm_style=False)
    if uses_timm_scheduler(settings):
        from timm.scheduler import create_scheduler_v2

        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=settings.scheduler,
            num_epochs=epochs,
            min_lr=settings.min_lr,
            warmup_lr=settings.warmup_lr,
            warmup_epochs=settings.warmup_epochs,
            step_on_epochs=not settings.sched_on_updates,
            updates_per_epoch=updates_per_epoch,
        )
        return Schedule(scheduler, per_update=settings.sched_on_updates, timm_style=True)
    if settings.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=settings.min_lr)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return Schedule(scheduler, per_update=False, timm_style=False)


@dataclass
class TaskOptimization:
    """The optimiser, schedule and clipping of one task, and the number of updates taken so far."""

    optimizer: torch.optim.Optimizer
    schedule: Schedule
    settings: OptimConfig
    updates: int = 0

    @classmethod
    def build(cls, method: nn.Module, settings: OptimConfig, updates_per_epoch: int, epochs: int) -> TaskOptimization:
        """The task's optimiser and its schedule over `epochs` epochs of `updates_per_epoch` updates."""
        single_stage = len(method.training_stages()) == 1
        optimizer = build_optimizer(parameter_groups(method, settings), settings, allow_fused=single_stage)
        return cls(optimizer, _build_schedule(optimizer, settings, updates_per_epoch, epochs), settings)

    @property
    def learning_rate(self) -> float:
        """The largest learning rate among the parameter groups (the base rate under layer decay)."""
        return max(group["lr"] for group in self.optimizer.param_groups)

    def update(self) -> None:
        """Clip the accumulated gradients if asked and update the parameters (once per training stage)."""
        if self.settings.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            parameters = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            dispatch_clip_grad(parameters, self.settings.clip_grad, mode=self.settings.clip_mode)
        self.optimizer.step()

    def end_step(self) -> None:
        """Count the step and advance a per-update schedule: once per global batch, whatever its stages."""
        self.updates += 1
        self.schedule.update(self.updates)

    def epoch_end(self, epochs_done: int) -> None:
        self.schedule.epoch_end(epochs_done)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.updates = int(state["updates"])

"""Per-task optimiser, learning-rate schedule and gradient clipping: `TaskOptimization.build`.

Every task gets a new optimiser and schedule. The defaults are the papers' and stay exactly as they were:
torch's SGD / Adam / AdamW over the method's `parameter_groups()`, cosine annealing (or a constant rate)
stepped once per epoch, no clipping. timm's training options are opt-in (`optim.*`):

* `layer_decay`: learning rate x layer_decay^(L - layer) with L the backbone's image blocks, as timm's
  `param_groups_layer_decay` assigns layers: embeddings are layer 0, block i and every module attached to
  it layer i + 1, and the final norm, heads and everything else layer L (the last block's).
* `weight_decay_exclude_1d`: no weight decay on 1-D parameters, biases and the backbone's `no_weight_decay()`
  names (timm's `filter_bias_and_bn`).
* an optimizer name outside sgd / adam / adamw (lamb, lion, nadamw, ...): timm's `create_optimizer_v2`.
* `warmup_epochs` (from `warmup_lr`), `sched_on_updates` (step the schedule after every optimizer update),
  or layer decay: timm's `create_scheduler_v2`, which also applies each group's `lr_scale`.
* `scheduler = "onecycle"`: torch's OneCycleLR (peak `lr`, its default warm-up and annealing), stepped after
  every update (KeepLoRA's schedule).
* `clip_grad` / `clip_mode` (norm, value, agc): timm's `dispatch_clip_grad` before every optimizer step.

`scheduler = "onecycle"` is torch's OneCycleLR stepped after every update (KeepLoRA's schedule). New
schedules go into `_build_schedule`, new parameter-group rules into
`parameter_groups`; the training step calls only `TaskOptimization.step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ntkcl.config import TORCH_OPTIMIZERS, OptimConfig


def backbone_layers(backbone: nn.Module) -> dict[int, int]:
    """Layer of each backbone parameter (by id): i + 1 inside image block i, timm's grouping for the rest of a
    timm ViT (0 for the patch and position embeddings, L for the final norm), L otherwise."""
    num_blocks = len(backbone.blocks)
    layers = {}
    vit = getattr(backbone, "vit", None)
    if vit is not None and hasattr(vit, "group_matcher"):
        from timm.models import group_parameters

        by_name = group_parameters(vit, vit.group_matcher(coarse=False), reverse=True)
        named = dict(vit.named_parameters())
        layers = {id(named[name]): min(layer, num_blocks) for name, layer in by_name.items()}
    for index, block in enumerate(backbone.blocks):
        layers.update({id(parameter): index + 1 for parameter in block.parameters()})
    return layers


def layer_of(method: nn.Module, name: str, num_blocks: int, backbone_layer: dict[int, int]) -> int:
    """The layer of parameter `name` for layer-wise decay: 0 embeddings, i + 1 block i, L the rest.

    A method's own module belongs to block i when it sits at index i of a module list with one entry per
    block (adapters, prompt generators); a backbone parameter is placed by `backbone_layers`.
    """
    module = method
    for part in name.split(".")[:-1]:
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) == num_blocks and part.isdigit():
            return int(part) + 1
        if module is method.backbone:
            break
        module = getattr(module, part)
    parameter = method.get_parameter(name)
    return backbone_layer.get(id(parameter), num_blocks)


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
    backbone = method.backbone
    num_blocks = len(backbone.blocks)
    layers = backbone_layers(backbone) if settings.layer_decay is not None else {}
    vit = getattr(backbone, "vit", None)
    no_decay_names = vit.no_weight_decay() if hasattr(vit, "no_weight_decay") else set()
    backbone_no_decay = {f"backbone.vit.{name}" for name in no_decay_names}
    split: list[dict] = []
    for group in groups:
        options = {key: value for key, value in group.items() if key != "params"}
        parts: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for parameter in group["params"]:
            name = names[id(parameter)]
            layer = layer_of(method, name, num_blocks, layers) if settings.layer_decay is not None else 0
            decayed = not (
                settings.weight_decay_exclude_1d and _excluded_from_decay(name, parameter, backbone_no_decay)
            )
            parts.setdefault((layer, decayed), []).append(parameter)
        for (layer, decayed), members in parts.items():
            part = {**options, "params": members}
            if not decayed:
                part["weight_decay"] = 0.0
            if settings.layer_decay is not None:
                part["lr_scale"] = settings.layer_decay ** (num_blocks - layer)
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

    def __init__(self, scheduler, per_update: bool):
        self.scheduler = scheduler
        self.per_update = per_update
        self._timm = hasattr(scheduler, "step_update")

    def update(self, updates: int) -> None:
        """After `updates` optimizer updates of the task."""
        if not self.per_update:
            return
        if self._timm:
            self.scheduler.step_update(updates)
        else:
            self.scheduler.step()

    def epoch_end(self, epochs_done: int) -> None:
        if self._timm:
            self.scheduler.step(epochs_done)  # a timm schedule stepped on updates ignores it
        elif not self.per_update:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def uses_timm_scheduler(settings: OptimConfig) -> bool:
    if settings.scheduler == "onecycle":
        return False
    return settings.warmup_epochs > 0 or settings.sched_on_updates or settings.layer_decay is not None


def _build_schedule(
    optimizer: torch.optim.Optimizer, settings: OptimConfig, updates_per_epoch: int, epochs: int
) -> Schedule:
    if settings.scheduler == "onecycle":
        # KeepLoRA's schedule: torch's OneCycleLR with its defaults, peaking at the configured rate.
        max_lr = [group["lr"] * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
        total = max(1, epochs * updates_per_epoch)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total)
        return Schedule(scheduler, per_update=True)
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
        return Schedule(scheduler, per_update=settings.sched_on_updates)
    if settings.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=settings.min_lr)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return Schedule(scheduler, per_update=False)


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

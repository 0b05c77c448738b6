"""Everything a run needs, checked before its run folder exists.

`ntkcl train` refuses bad input with one line and exit 2 before anything runs, and a run folder appears only
once the configuration, the host, the paths, the data and the model have passed:

- values: the pydantic models (`ntkcl.config` and each method's `Params`) bound every field, and
  `complete_config` fits the protocol to the dataset and validates the method's hyper-parameters;
- the host: processes, GPUs and the device (`ntkcl.engine.launch.plan_processes`);
- `prepare_run`, here: the output folder, the data root, the stream and its batch size, then the backbone and
  the method built on it (cheapest first).

The parts `prepare_run` builds are the ones the run trains, so a one-process run loads nothing twice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ntkcl.config import RunConfig
from ntkcl.data.extract import disk_errors
from ntkcl.data.registry import check_data_root
from ntkcl.data.stream import Stream
from ntkcl.engine.builders import (
    StreamProvenance,
    build_backbone,
    build_method,
    build_stream,
    data_root,
    device_memory,
)
from ntkcl.engine.distributed import DistributedContext
from ntkcl.engine.seeding import derived_seed, seed_everything
from ntkcl.errors import BadInputError
from ntkcl.methods.base import ContinualMethod
from ntkcl.models.backbone import Backbone


@dataclass
class RunParts:
    """What a run is made of, built and checked before its folder exists."""

    stream: Stream
    provenance: StreamProvenance
    backbone: Backbone
    method: ContinualMethod


def check_output_folder(out: Path) -> None:
    """`out` is, or can become, a writable folder. Nothing is created here: a refused run leaves no trace."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"cannot create run directory under {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot create run directory under {out}: {existing} is not writable")


def check_batch_size(config: RunConfig, stream: Stream) -> None:
    """A training batch must be one that some task can fill (the stream is known only once loaded)."""
    if config.optim.epochs == 0:
        return
    largest = max(len(stream.train_indices(task)) for task in stream.tasks())
    if config.optim.batch_size > largest:
        raise BadInputError(
            f"optim.batch_size {config.optim.batch_size} is larger than every task's training set (the largest has "
            f"{largest} images); give --batch-size at most {largest}"
        )


def method_memory(config: RunConfig, stream: Stream) -> tuple[int, int] | None:
    """Lower bounds of (bytes of the method's own parameters and buffers once its first task began, of which
    trainable), from the method built on the meta device over the architecture (nothing allocated, no weights
    read). Set-up that computes on tensors, which meta tensors cannot, ends the count early: what was built
    until then is still a lower bound. None for a CLIP backbone or a method that cannot be built this way.
    """
    import torch

    from ntkcl.models.backbone import TIMM, Backbone, backbone_family
    from ntkcl.models.weights import describe_timm_model

    if backbone_family(config.backbone.name) is not TIMM:
        return None
    model, origin = describe_timm_model(config.backbone.name, config.backbone.model_kwargs)
    with torch.device("meta"):
        try:
            method = build_method(config, Backbone(model, origin, "", config.backbone.normalize))
        except BadInputError:
            raise
        except Exception:  # a constructor that computes on meta tensors: no estimate, and no refusal on a guess
            return None
        with contextlib.suppress(Exception):  # the same, later in the set-up: the count so far is a lower bound
            method.begin_stream(stream.tasks())
            method.begin_task(stream.task(0))
    own = [(name, tensor) for name, tensor in (*method.named_parameters(), *method.named_buffers())]
    own = [(name, tensor) for name, tensor in own if not name.startswith("backbone.")]
    total = sum(tensor.numel() * tensor.element_size() for _, tensor in own)
    trainable = sum(tensor.numel() * tensor.element_size() for _, tensor in own if tensor.requires_grad)
    return total, trainable


def check_method_memory(config: RunConfig, stream: Stream) -> None:
    """Refuse hyper-parameters whose method parameters (with gradients and two optimizer moments for the
    trainable ones) exceed the device's whole memory, naming the method's parameters and the estimate."""
    memory = device_memory(config.runtime.device)
    estimate = method_memory(config, stream) if memory is not None else None
    if estimate is None:
        return
    total, trainable = estimate
    needed = total + 3 * trainable
    available, where = memory
    if needed > available:
        from ntkcl.methods.registry import get_method

        gib = 1 << 30
        defaults = get_method(config.method.name).Params().model_dump(mode="json")
        changed = [
            f"method.params.{key}={value}" for key, value in config.method.params.items() if defaults.get(key) != value
        ]
        settings = f" with {', '.join(changed)}" if changed else ""
        raise BadInputError(
            f"method {config.method.name}{settings} needs at least "
            f"{needed / gib:.1f} GiB for its parameters, gradients and optimizer state; {where} holds "
            f"{available / gib:.1f} GiB"
        )


def prepare_run(config: RunConfig, ctx: DistributedContext, out: Path | None = None) -> RunParts:
    """Check the paths and build the stream, backbone and method of a run; BadInputError on bad input.

    Args:
        config: the completed run configuration.
        ctx: this process's rank and device (generated data is prepared by rank 0 alone).
        out: the folder that will receive a new run folder (None when resuming).
    """
    if out is not None:
        check_output_folder(out)
    root = data_root(config)
    check_data_root(root)
    with disk_errors(root):
        stream, provenance = build_stream(config, ctx)
    check_batch_size(config, stream)
    check_method_memory(config, stream)
    backbone = build_backbone(config).to(ctx.device)
    # The method's initial weights depend on the run seed alone, not on what the process did before.
    seed_everything(derived_seed(config.runtime.seed))
    method = build_method(config, backbone).to(ctx.device)
    method.begin_stream(stream.tasks())
    return RunParts(stream, provenance, backbone, method)

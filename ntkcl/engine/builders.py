"""Turn a RunConfig into the objects a run needs: dataset, stream, backbone, method.

Training, evaluation and export loading all rebuild through these functions, so a run is reconstructed the
same way everywhere.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ntkcl.config import RunConfig, StreamConfig, StreamMember
from ntkcl.data.composite import Member, StreamDefinition, parse_members
from ntkcl.data.manifest import Manifest
from ntkcl.data.plugin import DatasetPlugin
from ntkcl.data.registry import default_data_root, discover_datasets, discover_streams, get_dataset, get_stream
from ntkcl.data.scenarios import CLASS_INCREMENTAL
from ntkcl.data.stream import Stream, TaskSource, compose, task_sizes
from ntkcl.data.transforms import build_transforms
from ntkcl.engine.distributed import DistributedContext
from ntkcl.engine.feed import check_feed_setting
from ntkcl.errors import BadInputError
from ntkcl.files import expand_user
from ntkcl.methods.base import ContinualMethod
from ntkcl.methods.registry import get_method, validate_params
from ntkcl.models.backbone import (
    Backbone,
    BackboneDescription,
    check_backbone_for_method,
    create_backbone,
    describe_backbone,
)
from ntkcl.models.weights import SHIPPED_SOURCE, timm_model_kwargs


def data_root(config: RunConfig) -> Path:
    return expand_user(config.stream.data_root) if config.stream.data_root else default_data_root()


def dataset_plugin(config: RunConfig) -> DatasetPlugin:
    return get_dataset(config.stream.dataset).configure(**config.stream.dataset_options)


def stream_definition(config: RunConfig) -> StreamDefinition | None:
    """The composite stream a configuration names (members from `stream.members` when given); None for a
    single dataset. An unknown name is a BadInputError listing the datasets and the streams."""
    settings = config.stream
    name = settings.dataset
    named = get_stream(name) if name in discover_streams() else None
    if settings.members is not None:
        members = tuple(Member(member.dataset, dict(member.options)) for member in settings.members)
        return replace(named, members=members) if named else StreamDefinition(name, members)
    if "," in name:
        return StreamDefinition(name, tuple(parse_members(name)))
    if named is not None or name in discover_datasets():
        return named
    datasets = ", ".join(n for n, item in discover_datasets().items() if item.ok)
    streams = ", ".join(n for n, item in discover_streams().items() if item.ok)
    raise BadInputError(f"unknown dataset {name!r} (nor a composite stream); datasets: {datasets}; streams: {streams}")


def member_plugins(definition: StreamDefinition, root: Path) -> list[DatasetPlugin]:
    """The configured plugin of each member; one line naming every member that still needs `ntkcl prepare`."""
    plugins = [get_dataset(member.dataset).configure(**member.options) for member in definition.members]
    unprepared = sorted({p.name for p in plugins if p.needs_download and not p.is_prepared(root)})
    if unprepared:
        raise BadInputError(
            f"stream {definition.name} needs datasets that are not prepared under {root}: {', '.join(unprepared)}; "
            f"run `ntkcl prepare NAME` for each (`ntkcl datasets` lists what is missing)"
        )
    return plugins


def check_capabilities(method: type[ContinualMethod], definition: StreamDefinition | None, scenario: str) -> None:
    """Exit 2 before anything runs when the method cannot run this stream the way it has to be run."""
    if scenario not in method.scenarios:
        raise BadInputError(
            f"method {method.name} does not support {scenario} streams (it supports {', '.join(method.scenarios)})"
        )
    if definition is None:
        return
    if definition.requires_zero_shot and not method.zero_shot:
        raise BadInputError(
            f"stream {definition.name} scores every task before it is trained (zero-shot transfer); "
            f"method {method.name} cannot classify a task it has not trained"
        )
    if definition.mixing is not None and not method.mixed_task_data:
        raise BadInputError(
            f"stream {definition.name} mixes images of other tasks into each task's training set; "
            f"method {method.name} expects a task's training images to be of its own classes"
        )


def _check_composite_settings(settings: StreamConfig) -> None:
    given = [
        flag
        for flag, value in (
            ("stream.dataset_options (use stream.members[i].options)", settings.dataset_options),
            ("--init-classes", settings.init_classes),
            ("--increment", settings.increment),
            ("stream.class_order", settings.class_order),
        )
        if value
    ]
    if given:
        raise BadInputError(
            f"stream {settings.dataset} has one task per dataset in each dataset's own label order; "
            f"drop {', '.join(given)}"
        )


def check_backbone(config: RunConfig) -> BackboneDescription:
    """Before anything runs: the backbone name resolves, its architecture has what the method hooks into,
    and an explicit weights file reads as a checkpoint. Returns what was resolved (`origin.name` is `arch.tag`)."""
    settings = config.backbone
    method = get_method(config.method.name)
    description = describe_backbone(settings.name, settings.model_kwargs, settings.weights)
    check_backbone_for_method(method.name, method.required_backbone_features, description)
    check_memory(config, description)
    return description


def device_memory(device: str) -> tuple[int, str] | None:
    """(bytes, what they are) a run on `device` can use at most: the GPU's memory, else the host's; None when
    the device cannot be queried (the device checks that follow report why)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        try:
            return torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}"
        except (RuntimeError, AssertionError, ValueError):
            return None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def check_memory(config: RunConfig, description) -> None:
    """Refuse a backbone that cannot fit: its parameters plus one batch's tokens (lower bounds, from the
    architecture built on the meta device; nothing is allocated) exceed the device's whole memory."""
    memory = device_memory(config.runtime.device)
    if not description.parameter_bytes or memory is None:
        return
    available, where = memory
    batch = max(config.optim.batch_size, config.optim.eval_batch_size)
    activations = description.activation_bytes_per_image * batch
    if description.parameter_bytes + activations > available:
        gib = 1 << 30
        raise BadInputError(
            f"backbone {config.backbone.name} with backbone.model_kwargs {config.backbone.model_kwargs} needs at least "
            f"{description.parameter_bytes / gib:.1f} GiB of parameters and {activations / gib:.1f} GiB of "
            f"activations for a batch of {batch}; {where} holds {available / gib:.1f} GiB"
        )


def complete_config(config: RunConfig) -> RunConfig:
    """Fill what defaults to the stream or method (protocol, members, scenario, method hyper-parameters) and
    check that they fit each other.

    A bare or deprecated timm backbone name becomes the `arch.tag` it resolves to, so the saved config says
    which weights it means. A timm backbone without weights becomes its bare architecture with its full
    `model_kwargs` (those of a shipped backbone included), so no tag or shipped name claims weights it lacks.
    """
    method = get_method(config.method.name)
    resolved = config.model_copy(deep=True)
    # Values first: a malformed hyper-parameter is named before the backbone or data are looked at.
    resolved.method.params = validate_params(method, config.method.params).model_dump(mode="json")
    origin = check_backbone(config).origin
    settings = config.backbone
    random_init = not settings.pretrained and settings.weights is None
    other_weights = origin.source == SHIPPED_SOURCE and settings.weights is not None
    if (random_init and origin.source in ("timm", SHIPPED_SOURCE)) or other_weights:
        resolved.backbone.model_kwargs = timm_model_kwargs(settings.name, settings.model_kwargs)
        resolved.backbone.name = origin.architecture
    elif origin.source == "timm":
        resolved.backbone.name = origin.name
    definition = stream_definition(config)
    if definition is None:
        plugin = dataset_plugin(config)
        if resolved.stream.init_classes is None:
            resolved.stream.init_classes = plugin.default_init_classes
        if resolved.stream.increment is None:
            resolved.stream.increment = plugin.default_increment
        num_tasks = len(task_sizes(plugin.num_classes, resolved.stream.init_classes, resolved.stream.increment))
        resolved.stream.scenario = config.stream.scenario or CLASS_INCREMENTAL
    else:
        _check_composite_settings(config.stream)
        resolved.stream.members = [
            StreamMember(dataset=member.dataset, options=dict(member.options)) for member in definition.members
        ]
        resolved.stream.class_order_seed = None
        resolved.stream.scenario = config.stream.scenario or definition.scenario
        num_tasks = len(definition.members)
    task_epochs = resolved.optim.task_epochs
    if task_epochs is not None and len(task_epochs) != num_tasks:
        raise BadInputError(f"optim.task_epochs has {len(task_epochs)} entries; the stream has {num_tasks} tasks")
    check_capabilities(method, definition, resolved.stream.scenario)
    if definition is not None:
        member_plugins(definition, data_root(config))
    check_feed_setting(resolved)
    if resolved.runtime.num_workers is None:
        resolved.runtime.num_workers = min(4, os.cpu_count() or 1)
    return resolved


def prepared_manifest(plugin: DatasetPlugin, root: Path, ctx: DistributedContext) -> Manifest:
    """The dataset's manifest; generated/bundled data is prepared on the fly by rank 0 only."""
    if not plugin.is_prepared(root):
        if plugin.needs_download:
            raise BadInputError(
                f"dataset {plugin.name!r} is not prepared under {root}; run `ntkcl prepare {plugin.name}`"
            )
        if ctx.is_main:
            plugin.prepare(root)
        ctx.barrier()
    return plugin.manifest(root)


@dataclass
class StreamProvenance:
    """Which data a stream was built from: what `run.json` records and `--resume` checks.

    Attributes:
        name: the stream's name (`stream.dataset`).
        members: per task dataset `{"dataset", "options", "manifest_sha256"}` (one entry for a single dataset).
        composite: one dataset per task (else one dataset split by classes).
        train_files: for mixed streams (VTAB-SimS), every training image as (task, dataset, manifest row,
            stream label): the file list the mixing rule produced, written to the run directory.
    """

    name: str
    members: list[dict]
    composite: bool = False
    train_files: list[tuple[int, str, str, int]] | None = None

    def train_files_text(self) -> str:
        return "".join(f"{task}\t{dataset}\t{row}\t{label}\n" for task, dataset, row, label in self.train_files)

    @property
    def sha256(self) -> str:
        """A single dataset's manifest sha256; for a composite, one hash over its members (and file list)."""
        if not self.composite:
            return self.members[0]["manifest_sha256"]
        digest = hashlib.sha256()
        for member in self.members:
            digest.update(f"{member['dataset']}:{member['manifest_sha256']};".encode())
        if self.train_files is not None:
            digest.update(self.train_files_text().encode())
        return digest.hexdigest()

    def record(self) -> dict:
        document = {"name": self.name, "manifest_sha256": self.sha256}
        if self.composite:
            document["members"] = self.members
        if self.train_files is not None:
            document["train_files_sha256"] = hashlib.sha256(self.train_files_text().encode()).hexdigest()
        return document


def build_stream(config: RunConfig, ctx: DistributedContext) -> tuple[Stream, StreamProvenance]:
    """The run's stream and where its data came from."""
    root = data_root(config)
    definition = stream_definition(config)
    scenario = config.stream.scenario or (definition.scenario if definition else CLASS_INCREMENTAL)
    if definition is None:
        plugin = dataset_plugin(config)
        manifest = prepared_manifest(plugin, root, ctx)
        stream = Stream.build(
            plugin.load(root, "train"),
            plugin.load(root, "test"),
            num_classes=plugin.num_classes,
            init_classes=config.stream.init_classes or plugin.default_init_classes,
            increment=config.stream.increment or plugin.default_increment,
            order_seed=config.stream.class_order_seed,
            explicit_order=config.stream.class_order,
            dataset=plugin.name,
            prompt_names=plugin.text_class_names(manifest.classes),
            templates=plugin.prompt_templates(),
            scenario=scenario,
        )
        member = {"dataset": plugin.name, "options": config.stream.dataset_options, "manifest_sha256": manifest.sha256}
        return stream, StreamProvenance(config.stream.dataset, [member])
    plugins = member_plugins(definition, root)
    sources, members = [], []
    for member, plugin in zip(definition.members, plugins):
        manifest = prepared_manifest(plugin, root, ctx)
        train = plugin.load(root, "train")
        rows = manifest.splits["train"]
        sources.append(
            TaskSource(
                dataset=plugin.name,
                train=train,
                test=plugin.load(root, "test"),
                num_classes=plugin.num_classes,
                prompt_names=plugin.text_class_names(manifest.classes),
                templates=plugin.prompt_templates(),
                train_rows=[path for path, _ in rows]
                if len(rows) == len(train)
                else [f"#{i}" for i in range(len(train))],
            )
        )
        members.append(
            {
                "dataset": member.dataset,
                "options": dict(member.options),
                "manifest_sha256": manifest.sha256,
            }
        )
    composite = compose(sources, scenario, definition.mixing)
    return composite.stream, StreamProvenance(config.stream.dataset, members, True, composite.file_list)


def build_backbone(config: RunConfig) -> Backbone:
    settings = config.backbone
    return create_backbone(
        settings.name,
        pretrained=settings.pretrained,
        weights=settings.weights,
        model_kwargs=settings.model_kwargs,
        init_seed=settings.init_seed,
        normalize=settings.normalize,
        allow_partial=settings.allow_partial,
    )


def build_method(config: RunConfig, backbone: Backbone) -> ContinualMethod:
    method = get_method(config.method.name)
    built = method(backbone, validate_params(method, config.method.params))
    built.train_batch_size = config.optim.batch_size
    return built


def build_run_transforms(config: RunConfig, backbone) -> tuple:
    """(train, test) transforms of a run: `stream.augment` at the backbone's input size.

    "timm" reads the backbone's pretrained data configuration and normalises with its mean/std, so the
    backbone must not normalise as well.
    """
    augment = config.stream.augment
    if augment != "timm":
        return build_transforms(augment, backbone.img_size)
    if not hasattr(backbone, "data_config"):
        raise BadInputError(
            f"stream.augment=timm needs a timm backbone; {backbone.name} has no timm data configuration"
        )
    if backbone.normalize != "none":
        raise BadInputError(
            f"stream.augment=timm normalises with the backbone's mean/std; set backbone.normalize=none "
            f"(it is {backbone.normalize!r}) so images are not normalised twice"
        )
    return build_transforms(augment, backbone.img_size, backbone.data_config())

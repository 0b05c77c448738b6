"""Turn a RunConfig into the objects a run needs: dataset, stream, backbone, method.

Training, evaluation and export loading all rebuild through these functions, so a run is reconstructed the
same way everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from ntkcl.config import RunConfig
from ntkcl.data.manifest import Manifest
from ntkcl.data.plugin import DatasetPlugin
from ntkcl.data.registry import default_data_root, get_dataset
from ntkcl.data.stream import ClassIncrementalStream, task_sizes
from ntkcl.engine.distributed import DistributedContext
from ntkcl.errors import BadInputError
from ntkcl.methods.base import ContinualMethod
from ntkcl.methods.registry import get_method, validate_params
from ntkcl.models.backbone import Backbone, create_backbone


def data_root(config: RunConfig) -> Path:
    return Path(config.stream.data_root).expanduser() if config.stream.data_root else default_data_root()


def dataset_plugin(config: RunConfig) -> DatasetPlugin:
    return get_dataset(config.stream.dataset).configure(**config.stream.dataset_options)


def complete_config(config: RunConfig) -> RunConfig:
    """Fill what defaults to the dataset or method (protocol, method hyper-parameters) and check it fits."""
    plugin = dataset_plugin(config)
    method = get_method(config.method.name)
    resolved = config.model_copy(deep=True)
    if resolved.stream.init_classes is None:
        resolved.stream.init_classes = plugin.default_init_classes
    if resolved.stream.increment is None:
        resolved.stream.increment = plugin.default_increment
    if resolved.runtime.num_workers is None:
        resolved.runtime.num_workers = min(4, os.cpu_count() or 1)
    task_sizes(plugin.num_classes, resolved.stream.init_classes, resolved.stream.increment)
    resolved.method.params = validate_params(method, config.method.params).model_dump(mode="json")
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


def build_stream(config: RunConfig, ctx: DistributedContext) -> tuple[ClassIncrementalStream, Manifest]:
    plugin = dataset_plugin(config)
    root = data_root(config)
    manifest = prepared_manifest(plugin, root, ctx)
    stream = ClassIncrementalStream.build(
        plugin.load(root, "train"),
        plugin.load(root, "test"),
        num_classes=plugin.num_classes,
        init_classes=config.stream.init_classes or plugin.default_init_classes,
        increment=config.stream.increment or plugin.default_increment,
        order_seed=config.stream.class_order_seed,
        explicit_order=config.stream.class_order,
    )
    return stream, manifest


def build_backbone(config: RunConfig) -> Backbone:
    settings = config.backbone
    return create_backbone(
        settings.name,
        pretrained=settings.pretrained,
        weights=settings.weights,
        model_kwargs=settings.model_kwargs,
        init_seed=settings.init_seed,
        normalize=settings.normalize,
    )


def build_method(config: RunConfig, backbone: Backbone) -> ContinualMethod:
    method = get_method(config.method.name)
    return method(backbone, validate_params(method, config.method.params))

"""The export's description of itself: `adapter_config.json`, built from a run directory and read back.

The document names the method and its hyper-parameters, the base backbone (timm name and weights sha256),
the stream protocol with class order and names, the metrics and how the run was trained: everything needed
to rebuild the model without the run directory.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import ntkcl
from ntkcl.config import RunConfig, load_config, validate
from ntkcl.engine import rundir
from ntkcl.errors import BadInputError
from ntkcl.export.constants import CONFIG_NAME, EXPORT_FORMAT, LIBRARY_NAME, WEIGHTS_NAME
from ntkcl.methods.base import TaskInfo


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric parts of a version string: "0.2.0.dev1" -> (0, 2, 0)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def task_infos(sizes: Sequence[int], records: Sequence[dict] | None = None) -> list[TaskInfo]:
    """The TaskInfo of every task of a stream with these task sizes.

    `records` (the `tasks` of run.json and of the export document) also restore each task's dataset, class
    names for a text encoder, prompt templates and scenario, which CLIP methods build their classifier from.
    """
    if records:
        return [
            TaskInfo(**{**record, "class_names": tuple(record["class_names"]), "templates": tuple(record["templates"])})
            for record in records
        ]
    return [TaskInfo(i, len(sizes), sum(sizes[:i]), size) for i, size in enumerate(sizes)]


def _last_checkpoint(run_dir: Path) -> tuple[Path, int]:
    checkpoints = rundir.finished_checkpoints(run_dir)
    if not checkpoints:
        raise BadInputError(f"{run_dir} has no finished task yet; nothing to export")
    names = [p.name for p in checkpoints]
    expected = [rundir.checkpoint_dir(run_dir, i).name for i in range(len(checkpoints))]
    if names != expected:
        raise BadInputError(f"{run_dir} has non-contiguous checkpoints {names}")
    return checkpoints[-1], len(checkpoints)


def recorded_command(record: dict, config: RunConfig) -> str:
    """The `ntkcl train ...` command the run was started with (rebuilt from the config if not recorded)."""
    argv = [str(part) for part in record.get("command") or []]
    if len(argv) > 1 and Path(argv[0]).name in ("ntkcl", "__main__.py") and argv[1] == "train":
        return shlex.join(["ntkcl", *argv[1:]])
    flags = [
        "ntkcl",
        "train",
        "--stream",
        config.stream.dataset,
        "--method",
        config.method.name,
        "--backbone",
        config.backbone.name,
    ]
    if not config.backbone.pretrained:
        flags.append("--no-pretrained")
    if config.stream.members is None:
        flags += ["--init-classes", str(config.stream.init_classes), "--increment", str(config.stream.increment)]
    flags += ["--seed", str(config.runtime.seed)]
    settings = {
        **{f"optim.{k}": v for k, v in config.optim.model_dump(mode="json").items()},
        "stream.class_order_seed": config.stream.class_order_seed,
        "stream.augment": config.stream.augment,
        "backbone.init_seed": config.backbone.init_seed,
        "backbone.normalize": config.backbone.normalize,
        "backbone.allow_partial": config.backbone.allow_partial,
        **{f"backbone.model_kwargs.{k}": v for k, v in sorted(config.backbone.model_kwargs.items())},
        **{f"method.params.{k}": v for k, v in sorted(config.method.params.items())},
    }
    for key, value in settings.items():
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(flags)


def build_export_config(run_dir: Path) -> tuple[dict, Path]:
    """The adapter_config.json document of a run and the checkpoint whose state it describes."""
    config = load_config(run_dir / rundir.CONFIG_FILE)
    record = rundir.read_json(run_dir / rundir.RUN_FILE)
    checkpoint, finished_tasks = _last_checkpoint(run_dir)
    metrics_file = run_dir / rundir.METRICS_FILE
    metrics = rundir.read_json(metrics_file) if metrics_file.is_file() else {}
    sizes = list(record["task_sizes"])
    backbone = config.backbone
    origin = dict(record["backbone"])
    document = {
        "library_name": LIBRARY_NAME,
        "export_format": EXPORT_FORMAT,
        "ntkcl_version": ntkcl.__version__,
        "inference_mode": True,
        "method": config.method.name,
        "method_params": config.method.params,
        "base_model": origin.get("hf_hub_id"),
        "base_model_revision": origin.get("revision"),
        "base_model_sha256": origin.pop("weights_sha256"),
        "backbone": {
            "name": backbone.name,
            "pretrained": backbone.pretrained or backbone.weights is not None,
            "model_kwargs": backbone.model_kwargs,
            "init_seed": backbone.init_seed,
            "normalize": backbone.normalize,
            "allow_partial": backbone.allow_partial,
        },
        "backbone_origin": origin,
        "stream": {
            "dataset": config.stream.dataset,
            "dataset_options": config.stream.dataset_options,
            "init_classes": config.stream.init_classes,
            "increment": config.stream.increment,
            "class_order_seed": config.stream.class_order_seed,
            "augment": config.stream.augment,
            "members": None if config.stream.members is None else [m.model_dump() for m in config.stream.members],
            "scenario": config.stream.scenario,
            "manifest_sha256": record.get("dataset", {}).get("manifest_sha256"),
        },
        "protocol": config.stream.scenario or "class-incremental",
        "task_sizes": sizes,
        "num_tasks": len(sizes),
        "finished_tasks": finished_tasks,
        "finished": finished_tasks == len(sizes),
        "class_order": record["class_order"],
        "class_names": record["class_names"],
        "tasks": record.get("tasks"),
        "metrics": {
            key: metrics.get(key)
            for key in (
                "final_accuracy",
                "mean_incremental_accuracy",
                "forgetting",
                "backward_transfer",
                "accuracy_matrix",
                "all_seen_accuracy",
                "correct",
                "total",
            )
        },
        "training": {
            "optim": config.optim.model_dump(mode="json"),
            "seed": config.runtime.seed,
            "command": recorded_command(record, config),
            "run": run_dir.name,
            "started_at": record.get("started_at"),
            "versions": record.get("versions", {}),
        },
    }
    return document, checkpoint


def hub_config(document: dict) -> dict:
    """`config.json`: what the export is, in a few keys, and where its description and weights are."""
    return {
        "library_name": LIBRARY_NAME,
        "ntkcl_version": document["ntkcl_version"],
        "export_format": document["export_format"],
        "method": document["method"],
        "backbone": document["backbone"]["name"],
        "base_model": document.get("base_model"),
        "protocol": document.get("protocol"),
        "num_classes": sum(document["task_sizes"][: document["finished_tasks"]]),
        "adapter_config": CONFIG_NAME,
        "weights": WEIGHTS_NAME,
    }


def read_export_config(folder: Path) -> dict:
    """adapter_config.json of an ntkcl export, checked for the library, format and version."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise BadInputError(f"{folder} is not an ntkcl export (no {CONFIG_NAME})")
    document = rundir.read_json(path)
    if document.get("library_name") != LIBRARY_NAME:
        other = document.get("peft_type") or document.get("library_name") or "another library"
        raise BadInputError(f"{path} was not written by ntkcl (it is a {other} adapter config)")
    made_by = str(document.get("ntkcl_version", "0"))
    if (
        int(document.get("export_format", 0)) > EXPORT_FORMAT
        or version_tuple(made_by)[:2] > version_tuple(ntkcl.__version__)[:2]
    ):
        raise BadInputError(
            f"{folder} was exported by ntkcl {made_by} (format {document.get('export_format')}); "
            f"this is ntkcl {ntkcl.__version__}: upgrade with `pip install -U ntkcl`"
        )
    missing = [
        key for key in ("method", "method_params", "backbone", "base_model_sha256", "task_sizes") if key not in document
    ]
    if missing:
        raise BadInputError(f"{path} lacks {', '.join(missing)}")
    return document


def run_config_of(document: dict, weights: str | Path | None = None) -> RunConfig:
    """A RunConfig that rebuilds the exported model (and its stream, when the dataset is prepared)."""
    stream = {k: v for k, v in document["stream"].items() if k != "manifest_sha256"}
    stream["class_order"] = document["class_order"]
    backbone = dict(document["backbone"])
    if weights is not None:
        backbone["weights"] = str(weights)
    return validate(
        {
            "stream": stream,
            "backbone": backbone,
            "method": {"name": document["method"], "params": document["method_params"]},
        }
    )

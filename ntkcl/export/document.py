"""The export's description of itself: `ntkcl_config.json`, built from a run directory and read back.

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
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import ntkcl
from ntkcl.config import RunConfig, describe_validation_error, validate
from ntkcl.engine.run_reader import RunFolder
from ntkcl.errors import BadInputError
from ntkcl.export.constants import CONFIG_NAME, EXPORT_FORMAT, LIBRARY_NAME, WEIGHTS_NAME, export_path
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


def build_export_config(run: RunFolder) -> dict:
    """The ntkcl_config.json document of a validated run folder (its last finished checkpoint's state)."""
    if not run.checkpoints:
        raise BadInputError(f"{run.path} has no finished task yet; nothing to export")
    config, record, metrics, finished_tasks, run_dir = run.config, run.record, run.metrics, run.finished_tasks, run.path
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
    return document


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
        "ntkcl_config": CONFIG_NAME,
        "weights": WEIGHTS_NAME,
    }


class ExportDocument(BaseModel):
    """What reading an export back relies on in ntkcl_config.json (other keys are descriptive)."""

    model_config = ConfigDict(extra="allow", strict=True)

    method: str
    method_params: dict[str, Any]
    backbone: dict[str, Any]
    base_model_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    stream: dict[str, Any]
    class_order: list[int]
    class_names: list[str]
    task_sizes: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    finished_tasks: Annotated[int, Field(ge=1)] | None = None
    tasks: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ExportDocument:
        if self.finished_tasks is not None and self.finished_tasks > len(self.task_sizes):
            raise ValueError(f"finished_tasks {self.finished_tasks} exceeds the {len(self.task_sizes)} tasks")
        classes = sum(self.task_sizes)
        if len(self.class_names) != classes or len(self.class_order) != classes:
            raise ValueError(f"class_names and class_order must list the {classes} classes of task_sizes")
        return self


def read_export_config(folder: Path) -> dict:
    """ntkcl_config.json of an ntkcl export (adapter_config.json before format 4), checked for the library,
    format and version."""
    path = export_path(folder, CONFIG_NAME)
    if not path.is_file():
        raise BadInputError(f"{folder} is not an ntkcl export (no {CONFIG_NAME})")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise BadInputError(f"{path} cannot be read: {reason}; the export is damaged") from error
    if not isinstance(document, dict):
        raise BadInputError(f"{path} holds a JSON {type(document).__name__}, not an object; the export is damaged")
    if document.get("library_name") != LIBRARY_NAME:
        other = document.get("peft_type") or document.get("library_name") or "another library"
        raise BadInputError(f"{path} was not written by ntkcl (it is a {other} adapter config)")
    made_by = str(document.get("ntkcl_version", "0"))
    export_format = document.get("export_format", 0)
    if not isinstance(export_format, int) or isinstance(export_format, bool):
        raise BadInputError(f"{path}: export_format {export_format!r} is not an integer; the export is damaged")
    if export_format > EXPORT_FORMAT or version_tuple(made_by)[:2] > version_tuple(ntkcl.__version__)[:2]:
        raise BadInputError(
            f"{folder} was exported by ntkcl {made_by} (format {document.get('export_format')}); "
            f"this is ntkcl {ntkcl.__version__}: upgrade with `pip install -U ntkcl`"
        )
    try:
        ExportDocument.model_validate(document)
    except ValidationError as error:
        raise BadInputError(f"{path}: {describe_validation_error(error)}; the export is damaged") from error
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

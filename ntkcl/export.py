"""Export a run as a PEFT-style folder, and load such a folder (or a Hub repo holding one) back.

    adapter_model.safetensors   the learned state of the last finished task (never the frozen backbone)
    adapter_config.json         method + hyper-parameters, base model `timm/<arch.tag>` + weights sha256,
                                stream protocol, class order and names, metrics, ntkcl version
    README.md                   model card: YAML front matter, metrics table, command, citation
    metrics.json                the run's metrics

A run that is still training (or was stopped) is exported as far as its finished tasks go; the config says
`"finished": false` with `finished_tasks` / `num_tasks`, and the card says so at the top.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import ntkcl
from ntkcl.config import RunConfig, load_config
from ntkcl.engine import rundir
from ntkcl.errors import BadInputError
from ntkcl.methods.base import ContinualMethod, TaskInfo

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, METRICS_NAME)
EXPORT_FORMAT = 1
CARD_MARKER = "<!-- ntkcl-card-sha256:"
LIBRARY_NAME = "ntkcl"
PAPER_CITATION = (
    "@article{liu2024ntkcl, title={Parameter-Efficient Fine-Tuning for Continual Learning: A Neural Tangent "
    "Kernel Perspective}, author={Liu, Jingren and Ji, Zhong and Pang, Yanwei and Yu, Yunlong}, "
    "journal={arXiv:2407.17120}, year={2024}}"
)


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric parts of a version string: "0.2.0.dev1" -> (0, 2, 0)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def task_infos(sizes: Sequence[int]) -> list[TaskInfo]:
    """The TaskInfo of every task of a stream with these task sizes."""
    return [TaskInfo(i, len(sizes), sum(sizes[:i]), size) for i, size in enumerate(sizes)]


def base_model_id(backbone_name: str) -> str:
    return f"timm/{backbone_name}"


# ---------------------------------------------------------------------------------------------------------------
# Run -> folder


@dataclass
class ExportResult:
    folder: Path
    config: dict
    files: dict[str, int]

    @property
    def finished(self) -> bool:
        return bool(self.config["finished"])


def _last_checkpoint(run_dir: Path) -> tuple[Path, int]:
    checkpoints = rundir.finished_checkpoints(run_dir)
    if not checkpoints:
        raise BadInputError(f"{run_dir} has no finished task yet; nothing to export")
    names = [p.name for p in checkpoints]
    expected = [rundir.checkpoint_dir(run_dir, i).name for i in range(len(checkpoints))]
    if names != expected:
        raise BadInputError(f"{run_dir} has non-contiguous checkpoints {names}")
    return checkpoints[-1], len(checkpoints)


def _dataset_info(name: str) -> dict:
    """Homepage, licence and citation of the dataset plugin, when it is installed."""
    from ntkcl.data.registry import get_dataset

    try:
        plugin = get_dataset(name)
    except BadInputError:
        return {}
    return {"homepage": plugin.homepage, "license": plugin.license, "citation": plugin.citation}


def _method_citation(name: str) -> str:
    from ntkcl.methods.registry import get_method

    try:
        return get_method(name).citation
    except BadInputError:
        return ""


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
    flags += ["--init-classes", str(config.stream.init_classes), "--increment", str(config.stream.increment)]
    flags += ["--seed", str(config.runtime.seed)]
    settings = {
        **{f"optim.{k}": v for k, v in config.optim.model_dump(mode="json").items()},
        "stream.class_order_seed": config.stream.class_order_seed,
        "stream.augment": config.stream.augment,
        "backbone.init_seed": config.backbone.init_seed,
        "backbone.normalize": config.backbone.normalize,
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
    document = {
        "library_name": LIBRARY_NAME,
        "export_format": EXPORT_FORMAT,
        "ntkcl_version": ntkcl.__version__,
        "inference_mode": True,
        "method": config.method.name,
        "method_params": config.method.params,
        "base_model": base_model_id(backbone.name),
        "base_model_sha256": record["backbone"]["weights_sha256"],
        "backbone": {
            "name": backbone.name,
            "pretrained": backbone.pretrained or backbone.weights is not None,
            "model_kwargs": backbone.model_kwargs,
            "init_seed": backbone.init_seed,
            "normalize": backbone.normalize,
        },
        "stream": {
            "dataset": config.stream.dataset,
            "dataset_options": config.stream.dataset_options,
            "init_classes": config.stream.init_classes,
            "increment": config.stream.increment,
            "class_order_seed": config.stream.class_order_seed,
            "augment": config.stream.augment,
            "manifest_sha256": record.get("dataset", {}).get("manifest_sha256"),
        },
        "protocol": "class-incremental",
        "task_sizes": sizes,
        "num_tasks": len(sizes),
        "finished_tasks": finished_tasks,
        "finished": finished_tasks == len(sizes),
        "class_order": record["class_order"],
        "class_names": record["class_names"],
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


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _metrics_markdown(metrics: dict) -> str:
    matrix = metrics.get("accuracy_matrix") or []
    if not matrix:
        return "No task has been evaluated.\n"
    size = len(matrix)
    lines = [
        "| after task | " + " | ".join(f"T{i}" for i in range(size)) + " | all seen | old | new |",
        "|---:|" + "---:|" * (size + 3),
    ]
    for t, row in enumerate(matrix):
        cells = [_percent(v) for v in row]
        extra = [metrics.get(name, [None] * size)[t] for name in ("all_seen_accuracy", "old_accuracy", "new_accuracy")]
        lines.append(f"| {t} | " + " | ".join(cells + [_percent(v) for v in extra]) + " |")
    summary = [
        "",
        "| metric | value (%) |",
        "|---|---:|",
        f"| A_T (accuracy on all classes after the last task) | {_percent(metrics.get('final_accuracy'))} |",
        f"| mean incremental accuracy | {_percent(metrics.get('mean_incremental_accuracy'))} |",
        f"| forgetting | {_percent(metrics.get('forgetting'))} |",
        f"| backward transfer | {_percent(metrics.get('backward_transfer'))} |",
    ]
    return "\n".join(lines + summary) + "\n"


def card_digest(text: str) -> str:
    """sha256 of a card without its marker line: equal to the marker's value while nobody edited the card."""
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith(CARD_MARKER))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def card_is_generated(text: str) -> bool:
    """Whether `text` is a card ntkcl wrote, unedited since (its marker still matches its content)."""
    match = re.search(re.escape(CARD_MARKER) + r"\s*([0-9a-f]{64})\s*-->", text)
    return match is not None and match.group(1) == card_digest(text)


def render_card(document: dict, metrics: dict, license_id: str = "other", repo_id: str | None = None) -> str:
    """The README.md model card of an export (deterministic: the same run renders the same card)."""
    method, dataset = document["method"], document["stream"]["dataset"]
    data_info = _dataset_info(dataset)
    backbone = document["backbone"]
    tags = ["continual-learning", "class-incremental", LIBRARY_NAME, method, dataset, "vision", "timm"]
    front = [
        "---",
        f"library_name: {LIBRARY_NAME}",
        f"base_model: {document['base_model']}",
        f"license: {license_id}",
        "pipeline_tag: image-classification",
        "tags:",
        *[f"- {tag}" for tag in dict.fromkeys(tags)],
        "metrics:",
        "- accuracy",
        "---",
    ]
    title = f"# {method} on {dataset} (ntkcl, class-incremental)"
    status = (
        f"All {document['num_tasks']} tasks of the stream are learned."
        if document["finished"]
        else f"**Partial export:** the run had finished {document['finished_tasks']} of "
        f"{document['num_tasks']} tasks; this model knows the classes of those tasks only."
    )
    seen = sum(document["task_sizes"][: document["finished_tasks"]])
    weights = (
        "pre-trained weights" if backbone["pretrained"] else f"random initialisation, seed {backbone['init_seed']}"
    )
    where = repo_id or "<this repo id or folder>"
    about = [
        f"Learned state of the continual-learning method **{method}** after {document['finished_tasks']} "
        f"task(s) of the **{dataset}** stream ({seen} classes), on the frozen timm backbone "
        f"`{backbone['name']}` ({weights}, sha256 `{document['base_model_sha256'][:16]}…`).",
        "",
        status,
        "",
        f"Protocol: init {document['stream']['init_classes']} classes, then {document['stream']['increment']} "
        f"per task; task sizes {document['task_sizes']}; class-order seed "
        f"{document['stream']['class_order_seed']}. The file `{WEIGHTS_NAME}` holds only what the method "
        "learned (adapters, heads, prototypes, ...); the backbone is loaded from timm and checked by sha256.",
    ]
    usage = [
        "## Use",
        "",
        "```bash",
        "pip install ntkcl",
        f"ntkcl eval {where}      # scores it on the test images; needs `ntkcl prepare {dataset}`",
        "```",
        "",
        "```python",
        "import ntkcl",
        f'model = ntkcl.load_pretrained("{where}")',
        "logits = model.predict(images)           # images: PIL images or a (B, 3, H, W) tensor in [0, 1]",
        "names = model.class_names                # stream order, the logits' columns",
        "```",
    ]
    hyper = json.dumps(document["method_params"], indent=2, sort_keys=True)
    training = document["training"]
    data_lines = []
    if data_info:
        data_lines = [f"Dataset: {dataset} ({data_info['homepage']}), licence: {data_info['license']}.", ""]
    citations = [c for c in (data_info.get("citation", ""), _method_citation(method), PAPER_CITATION) if c]
    body = [
        *front,
        "",
        title,
        "",
        *about,
        "",
        "## Results",
        "",
        "Accuracy (%) on the test images of every class seen so far; R[t][i] is task i after training task t.",
        "",
        _metrics_markdown(metrics),
        *usage,
        "",
        "## Training",
        "",
        *data_lines,
        "Produced by:",
        "",
        "```bash",
        training["command"],
        "```",
        "",
        f"Method hyper-parameters (`{method}`):",
        "",
        "```json",
        hyper,
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(training.get("versions", {}).items())) + ".",
        "",
        "## Citation",
        "",
        "```bibtex",
        *citations,
        "```",
        "",
    ]
    text = "\n".join(body)
    return f"{text}{CARD_MARKER} {card_digest(text)} -->\n"


def _check_destination(folder: Path) -> None:
    if folder.is_file():
        raise BadInputError(f"--out {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_NAME).is_file():
        raise BadInputError(f"--out {folder} is a non-empty folder that is not an ntkcl export; choose another")


def export_run(run_dir: Path, out: Path, license_id: str = "other", repo_id: str | None = None) -> ExportResult:
    """Write the export folder of `run_dir` into `out` (built next to it, then renamed into place).

    Args:
        run_dir: a run directory; its last finished checkpoint is exported.
        out: the export folder (replaced if it holds an earlier export).
        license_id: the model card's `license`.
        repo_id: the Hub repo the card's usage lines name, when known.
    """
    run_dir = rundir.check_run_dir(run_dir)
    _check_destination(out)
    document, checkpoint = build_export_config(run_dir)
    metrics_file = run_dir / rundir.METRICS_FILE
    metrics = rundir.read_json(metrics_file) if metrics_file.is_file() else {}
    state = load_file(checkpoint / rundir.STATE_FILE)
    leaked = [key for key in state if key.startswith("backbone.")]
    if leaked:
        raise BadInputError(f"{checkpoint} holds backbone tensors ({leaked[0]}, ...); refusing to export them")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    except OSError as error:
        raise BadInputError(f"cannot write the export to {out}: {error.strerror or error}") from error
    tensors = {key: value.contiguous() for key, value in sorted(state.items())}
    try:
        (temporary / CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, temporary / WEIGHTS_NAME, metadata={"format": "pt"})
        shutil.copymode(temporary / CONFIG_NAME, temporary / WEIGHTS_NAME)  # safetensors writes owner-only files
        (temporary / METRICS_NAME).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (temporary / CARD_NAME).write_text(render_card(document, metrics, license_id, repo_id), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return ExportResult(out, document, {name: (out / name).stat().st_size for name in EXPORT_FILES})


# ---------------------------------------------------------------------------------------------------------------
# Folder (or Hub repo) -> model


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
    from ntkcl.config import validate

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


@dataclass
class PretrainedModel:
    """A loaded export: the method (eval mode) with its class names and test-time transform.

    `predict` takes PIL images or a (B, 3, H, W) float tensor in [0, 1] already at the backbone's input size,
    and returns logits over `class_names` (stream order). No dataset is needed.
    """

    method: ContinualMethod
    class_names: list[str]
    transform: Callable
    config: dict
    source: str

    @property
    def device(self) -> torch.device:
        return self.method.device

    def to(self, device: str | torch.device) -> PretrainedModel:
        self.method.to(device)
        return self

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            single = not isinstance(images, (list, tuple))
            images = torch.stack([self.transform(image.convert("RGB")) for image in ([images] if single else images)])
        self.method.eval()
        return self.method.predict(images.to(self.device))

    def classify(self, images) -> list[str]:
        """The predicted class name of each image."""
        return [self.class_names[i] for i in self.predict(images).argmax(dim=1).tolist()]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_folder(
    folder: Path,
    *,
    weights: str | Path | None = None,
    device: str = "cpu",
    method: str | None = None,
    source: str | None = None,
) -> PretrainedModel:
    """Rebuild the model of an export folder; the backbone's sha256 must match the one it was trained on."""
    from ntkcl.data.transforms import build_transforms
    from ntkcl.engine.builders import build_backbone, build_method

    document = read_export_config(folder)
    if method is not None and document["method"] != method:
        raise BadInputError(f"{folder} holds a {document['method']} export, not {method}")
    if not (folder / WEIGHTS_NAME).is_file():
        raise BadInputError(f"{folder} is not an ntkcl export (no {WEIGHTS_NAME})")
    config = run_config_of(document, weights)
    backbone = build_backbone(config)
    if backbone.weights_sha256 != document["base_model_sha256"]:
        raise BadInputError(
            f"backbone {backbone.name} has weights sha256 {backbone.weights_sha256[:12]}…, the export was trained "
            f"on {document['base_model_sha256'][:12]}… (another timm tag or weights file); pass the original "
            "weights (--weights FILE)"
        )
    model = build_method(config, backbone)
    finished = task_infos(document["task_sizes"])[: document.get("finished_tasks", len(document["task_sizes"]))]
    try:
        state = load_file(folder / WEIGHTS_NAME)
        model.load_learned_state(state, finished)
    except BadInputError as error:
        raise BadInputError(f"{folder / WEIGHTS_NAME}: {error}") from error
    except (ValueError, RuntimeError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInputError(f"{folder / WEIGHTS_NAME} does not fit method {document['method']}: {reason}") from error
    model.eval()
    model.to(resolve_device(device))
    _, test_transform = build_transforms(config.stream.augment, backbone.img_size)
    seen = finished[-1].total_classes if finished else 0
    return PretrainedModel(model, list(document["class_names"][:seen]), test_transform, document, source or str(folder))


def locate_export(path_or_repo_id: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local export folder, or the snapshot of a Hub repo holding one (downloaded or from the cache)."""
    text = str(path_or_repo_id)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise BadInputError(f"{path} is not an ntkcl run directory or export (no run.json / {CONFIG_NAME})")
        return path
    if path.is_absolute() or text.startswith((".", "~")) or len(path.parts) != 2 or Path(path.parts[0]).is_dir():
        raise BadInputError(f"{path} does not exist (and is not a Hub repo id of the form user/name)")
    from ntkcl.hub import download_export

    return download_export(str(path_or_repo_id), revision=revision, token=token)


def load_pretrained(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
    method: str | None = None,
) -> PretrainedModel:
    """Load an ntkcl export from a folder or a Hugging Face Hub repo id.

    Args:
        path_or_repo_id: an export folder (`ntkcl export --out DIR`) or `user/name` on the Hub.
        revision: Hub branch, tag or commit.
        token: Hub token for private repos (default: HF_TOKEN or the saved login).
        weights: a local file with the base backbone's weights (offline use); its sha256 is checked.
        device: "cpu", "cuda", "cuda:N" or "auto".
        method: if given, the export must be of this method.

    Returns:
        A PretrainedModel: `.predict(images)` -> logits, `.class_names`, `.transform`, `.method`.
    """
    folder = locate_export(path_or_repo_id, revision=revision, token=token)
    return load_folder(folder, weights=weights, device=device, method=method, source=str(path_or_repo_id))


def evaluate_pretrained(
    model: PretrainedModel,
    dataset: str | None = None,
    data_root: Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    precision: str = "auto",
) -> dict:
    """Accuracy of a loaded export on the test images of its stream (or of another prepared dataset).

    Another dataset must have the same number of classes: it is cut with the export's class order and task
    sizes, and scored against the export's class indices. The result is the last row of the accuracy matrix
    (per-task accuracy after the last exported task) and A_T.
    """
    from ntkcl.data.registry import get_dataset
    from ntkcl.engine.builders import build_stream
    from ntkcl.engine.distributed import init_distributed
    from ntkcl.engine.evaluate import ScoringLoader, evaluate

    document = model.config
    config = run_config_of(document)
    if dataset is not None and dataset != config.stream.dataset:
        plugin = get_dataset(dataset)
        if plugin.num_classes != len(document["class_order"]):
            raise BadInputError(
                f"{dataset} has {plugin.num_classes} classes, the export was trained on "
                f"{len(document['class_order'])}; --stream needs the same label space"
            )
        config.stream.dataset = dataset
        config.stream.dataset_options = {}
    if data_root is not None:
        config.stream.data_root = data_root
    ctx = init_distributed("cpu" if model.device.type == "cpu" else str(model.device))
    stream, _ = build_stream(config, ctx)
    finished = document.get("finished_tasks", stream.num_tasks)
    scoring = ScoringLoader(stream, model.transform, ctx, batch_size, num_workers, precision)
    counts = evaluate(model.method, scoring, stream.task(finished - 1))
    accuracy = [100.0 * c / t if t else None for c, t in counts]
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    final = 100.0 * correct / total if total else None
    exported = document.get("metrics") or {}
    same_stream = config.stream.dataset == document["stream"]["dataset"]
    return {
        "source": model.source,
        "method": document["method"],
        "dataset": config.stream.dataset,
        "finished_tasks": finished,
        "num_tasks": document["num_tasks"],
        "task_accuracy": accuracy,
        "correct": [c for c, _ in counts],
        "total": [t for _, t in counts],
        "final_accuracy": final,
        "exported_final_accuracy": exported.get("final_accuracy"),
        "matches_export": bool(
            same_stream
            and exported.get("correct")
            and exported["correct"][finished - 1] == [c for c, _ in counts]
            and exported["total"][finished - 1] == [t for _, t in counts]
        ),
    }

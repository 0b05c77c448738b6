"""The model card (`README.md`) of an export: Hub metadata, results, usage, training, citations.

The YAML front matter is `huggingface_hub.ModelCardData`: `base_model` is the Hub repo the backbone weights
came from (none for a random or local backbone) with `base_model_relation: adapter`, the evaluation results
are a `model-index` of `EvalResult`s (A_T, mean incremental accuracy and forgetting on the stream), and the
licence is the base weights' unless chosen. A generated card ends with a marker holding the sha256 of the
rest of the card, so a later push can tell an unedited ntkcl card (safe to replace) from one a person edited
on the Hub (kept unless forced).
"""

from __future__ import annotations

import hashlib
import json
import re

from huggingface_hub import EvalResult, ModelCardData

from ntkcl.errors import BadInputError
from ntkcl.export.constants import LIBRARY_NAME, WEIGHTS_NAME
from ntkcl.models.shipped import RANDOM_INIT, SHIPPED_SOURCE

CARD_MARKER = "<!-- ntkcl-card-sha256:"
UNCHOSEN_LICENSE = "unspecified"
# (metrics.json key, model-index metric type, metric name): what the Hub shows as evaluation results.
EVALUATED = (
    ("final_accuracy", "accuracy", "A_T (accuracy on all seen classes after the last task)"),
    ("mean_incremental_accuracy", "accuracy", "Mean incremental accuracy"),
    ("forgetting", "forgetting", "Forgetting"),
)


def _dataset_info(name: str) -> dict:
    """Homepage, licence and citation of the dataset plugin, when it is installed."""
    from ntkcl.data.registry import get_dataset

    try:
        plugin = get_dataset(name)
    except BadInputError:
        return {}
    return {
        "homepage": plugin.homepage,
        "license": plugin.license,
        "citation": plugin.citation,
        "hub_dataset_id": plugin.hub_dataset_id,
    }


def _method_citation(name: str) -> str:
    from ntkcl.methods.registry import get_method

    try:
        return get_method(name).citation
    except BadInputError:
        return ""


def datasets_of(document: dict) -> list[str]:
    """The dataset plugins a stream is made of (the members of a composite stream, else the one dataset)."""
    members = document["stream"].get("members")
    if members:
        return list(dict.fromkeys(member["dataset"] for member in members))
    return [document["stream"]["dataset"]]


def hub_datasets(document: dict) -> list[str]:
    """The Hub dataset ids of the stream's datasets, for those the Hub has (the card's `datasets`)."""
    found = (_dataset_info(name).get("hub_dataset_id") for name in datasets_of(document))
    return [dataset_id for dataset_id in found if dataset_id]


def card_license(document: dict, license_id: str | None) -> dict:
    """`license` (with `license_name` / `license_link` when it is `other`): the chosen one, else the base
    weights' licence from timm's pretrained config, else `other`/unspecified linked to the training data."""
    origin = document.get("backbone_origin") or {}
    chosen = license_id or (origin.get("license") if origin.get("pretrained") else None)
    if chosen and chosen != "other":
        return {"license": chosen}
    homepage = _dataset_info(datasets_of(document)[0]).get("homepage")
    return {"license": "other", "license_name": UNCHOSEN_LICENSE, **({"license_link": homepage} if homepage else {})}


def eval_results(document: dict, metrics: dict) -> list[EvalResult]:
    """A_T, mean incremental accuracy and forgetting of the stream as model-index entries (values in %)."""
    stream = document["stream"]
    protocol = document.get("protocol") or "class-incremental"
    if stream.get("members"):
        setting = f"{len(stream['members'])} datasets, one task each"
    else:
        setting = f"B{stream['init_classes']} Inc{stream['increment']}, class-order seed {stream['class_order_seed']}"
    tasks = f"{document['finished_tasks']}/{document['num_tasks']} tasks"
    dataset_ids = hub_datasets(document)
    results = []
    for key, metric_type, metric_name in EVALUATED:
        value = metrics.get(key)
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name=f"{protocol.capitalize()} image classification",
                # The Hub id where the stream is one dataset the Hub has; the stream's own name otherwise.
                dataset_type=dataset_ids[0]
                if len(dataset_ids) == 1 and not stream.get("members")
                else stream["dataset"],
                dataset_name=f"{stream['dataset']} ({setting}, {tasks})",
                dataset_split="test",
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(float(value), 2),
            )
        )
    return results


def card_data(
    document: dict, metrics: dict, license_id: str | None = None, repo_id: str | None = None
) -> ModelCardData:
    """The card's metadata as `huggingface_hub.ModelCardData`."""
    method, dataset = document["method"], document["stream"]["dataset"]
    origin = document.get("backbone_origin") or {}
    family = "open_clip" if origin.get("source") == "open_clip" else "timm"
    protocol = document.get("protocol") or "class-incremental"
    tags = ["continual-learning", protocol, LIBRARY_NAME, method, *datasets_of(document), "vision", family]
    base = (
        {"base_model": document["base_model"], "base_model_relation": "adapter"} if document.get("base_model") else {}
    )
    return ModelCardData(
        model_name=repo_id.rsplit("/", 1)[-1] if repo_id else f"ntkcl-{dataset}-{method}",
        library_name=LIBRARY_NAME,
        pipeline_tag="image-classification",
        datasets=hub_datasets(document) or None,
        tags=list(dict.fromkeys(tags)),
        metrics=["accuracy"],
        eval_results=eval_results(document, metrics) or None,
        **card_license(document, license_id),
        **base,
    )


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


def _backbone_line(document: dict) -> str:
    backbone, origin = document["backbone"], document.get("backbone_origin") or {}
    if origin.get("hf_hub_id"):
        revision = f" at revision `{origin['revision'][:12]}`" if origin.get("revision") else ""
        weights = f"weights of [{origin['hf_hub_id']}](https://huggingface.co/{origin['hf_hub_id']}){revision}"
    elif origin.get("source") == SHIPPED_SOURCE:
        weights = "weights shipped with ntkcl, pre-trained on generated images"
    elif backbone["pretrained"]:
        weights = "local pre-trained weights"
    else:
        weights = f"{RANDOM_INIT}, seed {backbone['init_seed']}"
    return f"`{backbone['name']}` ({weights}; loaded tensors sha256 `{document['base_model_sha256'][:16]}…`)"


def _protocol(document: dict) -> str:
    """How the stream was cut into tasks: by classes of one dataset, or one dataset per task."""
    stream = document["stream"]
    members = stream.get("members")
    if members:
        datasets = ", ".join(member["dataset"] for member in members)
        return (
            f"Protocol: {document['protocol']}, one dataset per task ({datasets}); task sizes {document['task_sizes']}."
        )
    return (
        f"Protocol: init {stream['init_classes']} classes, then {stream['increment']} per task; task sizes "
        f"{document['task_sizes']}; class-order seed {stream['class_order_seed']}."
    )


def install_line(document: dict) -> str:
    """`pip install` of the ntkcl release that wrote the export, with the extra its backbone needs."""
    origin = document.get("backbone_origin") or {}
    extra = "[clip]" if origin.get("source") == "open_clip" else ""
    return f"pip install 'ntkcl{extra}=={document['ntkcl_version']}'"


def hyperparameter_table(document: dict) -> list[str]:
    """Markdown rows of what the run was trained with: optimisation, seeds, protocol and the method's values."""
    training, stream = document["training"], document["stream"]
    rows = [(f"optim.{key}", value) for key, value in training["optim"].items() if value is not None]
    rows += [("runtime.seed", training["seed"]), ("stream.class_order_seed", stream.get("class_order_seed"))]
    rows += [(f"method.params.{key}", value) for key, value in sorted(document["method_params"].items())]
    lines = ["| setting | value |", "| --- | --- |"]
    lines += [f"| `{key}` | `{json.dumps(value)}` |" for key, value in rows if value is not None]
    return lines


def render_card(document: dict, metrics: dict, license_id: str | None = None, repo_id: str | None = None) -> str:
    """The README.md model card of an export (deterministic: the same run renders the same card)."""
    method, dataset = document["method"], document["stream"]["dataset"]
    data = card_data(document, metrics, license_id, repo_id)
    title = f"# {method} on {dataset} (ntkcl, {document.get('protocol') or 'class-incremental'})"
    status = (
        f"All {document['num_tasks']} tasks of the stream are learned."
        if document["finished"]
        else f"**Partial export:** the run had finished {document['finished_tasks']} of "
        f"{document['num_tasks']} tasks; this model knows the classes of those tasks only."
    )
    seen = sum(document["task_sizes"][: document["finished_tasks"]])
    where = repo_id or "<this repo id or folder>"
    about = [
        f"Learned state of the continual-learning method **{method}** after {document['finished_tasks']} "
        f"task(s) of the **{dataset}** stream ({seen} classes), on the frozen backbone {_backbone_line(document)}.",
        "",
        status,
        "",
        f"{_protocol(document)} The file `{WEIGHTS_NAME}` holds only what the method learned (adapters, heads, "
        "prototypes, ...); the backbone is loaded from its own source and checked by sha256.",
    ]
    usage = [
        "## Use",
        "",
        "```bash",
        install_line(document),
        f"ntkcl eval {where}      # scores it on the test images; needs `ntkcl prepare {dataset}`",
        "```",
        "",
        "```python",
        "import ntkcl",
        f'model = ntkcl.ContinualModel.from_pretrained("{where}")  # a torch.nn.Module',
        "logits = model.predict(images)  # images: PIL images or a (B, 3, H, W) tensor in [0, 1]",
        "names = model.class_names       # stream order, the logits' columns",
        "```",
    ]
    training = document["training"]
    infos = [(name, _dataset_info(name)) for name in datasets_of(document)]
    data_lines = [f"Data: {name} ({info['homepage']}), licence: {info['license']}." for name, info in infos if info]
    licence = []
    if data.license_name == UNCHOSEN_LICENSE:
        licence = [
            "## Licence",
            "",
            "No licence was chosen for these weights and the backbone brings none; the terms of the training "
            "data apply. Choose one with `ntkcl export --license ID`.",
            "",
        ]
    citations = list(
        dict.fromkeys(c for c in [*(info.get("citation", "") for _, info in infos), _method_citation(method)] if c)
    )
    citation = ["## Citation", "", "```bibtex", *citations, "```", ""] if citations else []
    body = [
        "---",
        data.to_yaml(),
        "---",
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
        *([""] if data_lines else []),
        "Produced by:",
        "",
        "```bash",
        training["command"],
        "```",
        "",
        "Hyper-parameters:",
        "",
        *hyperparameter_table(document),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(training.get("versions", {}).items())) + ".",
        "",
        *licence,
        *citation,
    ]
    text = "\n".join(body)
    return f"{text}{CARD_MARKER} {card_digest(text)} -->\n"

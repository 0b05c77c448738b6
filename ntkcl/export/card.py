"""The model card (`README.md`) of an export: front matter, results, usage, training, citations.

A generated card ends with a marker holding the sha256 of the rest of the card, so a later push can tell an
unedited ntkcl card (safe to replace) from one a person edited on the Hub (kept unless forced).
"""

from __future__ import annotations

import hashlib
import json
import re

from ntkcl.errors import BadInputError
from ntkcl.export.constants import LIBRARY_NAME, WEIGHTS_NAME

CARD_MARKER = "<!-- ntkcl-card-sha256:"
PAPER_CITATION = (
    "@article{liu2024ntkcl, title={Parameter-Efficient Fine-Tuning for Continual Learning: A Neural Tangent "
    "Kernel Perspective}, author={Liu, Jingren and Ji, Zhong and Pang, Yanwei and Yu, Yunlong}, "
    "journal={arXiv:2407.17120}, year={2024}}"
)


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


def render_card(document: dict, metrics: dict, license_id: str = "other", repo_id: str | None = None) -> str:
    """The README.md model card of an export (deterministic: the same run renders the same card)."""
    method, dataset = document["method"], document["stream"]["dataset"]
    data_info = _dataset_info(dataset)
    backbone = document["backbone"]
    tags = ["continual-learning", "class-incremental", LIBRARY_NAME, method, dataset, "vision", "timm"]
    front = [
        "---",
        f"library_name: {LIBRARY_NAME}",
        *([f"base_model: {document['base_model']}"] if document.get("base_model") else []),
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
        f"{_protocol(document)} The file `{WEIGHTS_NAME}` holds only what the method "
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

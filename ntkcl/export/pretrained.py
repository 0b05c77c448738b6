"""Export folder (or Hub repo) -> model: rebuild the backbone, the method and its learned state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ntkcl.engine.launch import check_device
from ntkcl.errors import BadInputError
from ntkcl.export.constants import CONFIG_NAME, WEIGHTS_NAME
from ntkcl.export.document import read_export_config, run_config_of, task_infos
from ntkcl.export.hub import download_export
from ntkcl.methods.base import ContinualMethod


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
    check_device(device)
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
    from ntkcl.engine.builders import build_backbone, build_method, build_run_transforms

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
    tasks = task_infos(document["task_sizes"], document.get("tasks"))
    finished = tasks[: document.get("finished_tasks", len(tasks))]
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
    _, test_transform = build_run_transforms(config, backbone)
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

"""Export folder (or Hub repo) -> model: a `torch.nn.Module` with the Hugging Face Hub API.

`ContinualModel.from_pretrained(folder_or_repo_id, revision=..., token=..., cache_dir=...,
local_files_only=..., force_download=...)` rebuilds the backbone (from its own source, its sha256 checked),
the method and the method's learned state; `save_pretrained(folder)` writes the export files back (what the
method learned, never the backbone) and `push_to_hub(repo_id)` uploads them in one commit. The class is a
`huggingface_hub.ModelHubMixin`; `ntkcl.load_pretrained` is a shortcut for `from_pretrained`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ntkcl.engine import rundir
from ntkcl.engine.launch import check_device
from ntkcl.errors import BadInputError
from ntkcl.export.card import render_card
from ntkcl.export.checksums import verify_export
from ntkcl.export.constants import CARD_NAME, CONFIG_NAME, LIBRARY_NAME, METRICS_NAME, WEIGHTS_NAME, export_path
from ntkcl.export.document import read_export_config, run_config_of, task_infos
from ntkcl.export.folder import write_export_files
from ntkcl.export.hub import download_export, push_export
from ntkcl.files import expand_user
from ntkcl.methods.base import ContinualMethod


class ContinualModel(
    nn.Module,
    ModelHubMixin,
    library_name=LIBRARY_NAME,
    pipeline_tag="image-classification",
    tags=["continual-learning", LIBRARY_NAME],
):
    """A continual-learning method on its frozen backbone, with the classes it has learned.

    `model(images)` and `model.predict(images)` return logits over `class_names` (stream order); `predict`
    also takes PIL images, `classify` returns names. Tensors are (B, 3, H, W) floats in [0, 1] at the
    backbone's input size (`transform` turns a PIL image into one). No dataset is needed.

    Args:
        continual_method: the method with its learned state loaded.
        class_names: the classes it knows, in stream order (the logits' columns).
        export_config: the export's `ntkcl_config.json` document.
        metrics: the run's `metrics.json`.
        card: the model card `save_pretrained` writes (rendered from the export when empty).
        source: where the model was loaded from.
    """

    def __init__(
        self,
        continual_method: ContinualMethod,
        class_names: list[str],
        export_config: dict,
        metrics: dict | None = None,
        card: str = "",
        source: str = "",
    ):
        from ntkcl.data.transforms import build_transforms

        super().__init__()
        self.method = continual_method.eval()
        self.class_names = list(class_names)
        self.config = export_config
        self.metrics = dict(metrics or {})
        self.card = card
        self.source = source
        augment, backbone = export_config["stream"]["augment"], continual_method.backbone
        timm_config = backbone.data_config() if augment == "timm" else None
        _, self.transform = build_transforms(augment, backbone.img_size, timm_config)

    @property
    def device(self) -> torch.device:
        return self.method.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.predict(images.to(self.device))

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """Logits over `class_names` for a tensor batch, a PIL image or a list of them."""
        if not isinstance(images, torch.Tensor):
            single = not isinstance(images, (list, tuple))
            images = torch.stack([self.transform(image.convert("RGB")) for image in ([images] if single else images)])
        self.eval()
        return self(images)

    def classify(self, images) -> list[str]:
        """The predicted class name of each image."""
        return [self.class_names[i] for i in self.predict(images).argmax(dim=1).tolist()]

    def _save_pretrained(self, save_directory: Path) -> None:
        card = self.card or render_card(self.config, self.metrics)
        write_export_files(save_directory, self.config, self.method.learned_state(), self.metrics, card)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs,
    ) -> ContinualModel:
        """Load an ntkcl export from a folder or a Hugging Face Hub repo id.

        Args:
            pretrained_model_name_or_path: an export folder (`ntkcl export --out DIR`) or `user/name` on the Hub.
            force_download: download the files again even when they are cached.
            token: Hub token for private repos (default: HF_TOKEN or the saved login).
            cache_dir: the Hugging Face cache folder to use.
            local_files_only: use the cache only (also implied by HF_HUB_OFFLINE).
            revision: Hub branch, tag or commit.
            model_kwargs: `weights` (a local file with the base backbone's weights, sha256-checked),
                `device` ("cpu", "cuda", "cuda:N" or "auto") and `method` (the export must be of this method).
        """
        folder = locate_export(
            pretrained_model_name_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        model_kwargs.setdefault("source", str(pretrained_model_name_or_path))
        return super().from_pretrained(folder, **model_kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        weights: str | Path | None = None,
        device: str = "cpu",
        method: str | None = None,
        source: str | None = None,
    ) -> ContinualModel:
        return load_folder(Path(model_id), weights=weights, device=device, method=method, source=source)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool = False,
        force: bool = False,
        config: dict | None = None,
        model_card_kwargs: dict | None = None,
    ) -> str:
        """Upload the export files to `repo_id` in one commit, creating the repo if needed.

        Args:
            repo_id: `user/name` or `org/name`.
            commit_message: default: method, stream, tasks and A_T.
            private: visibility of a repo created now; None leaves it to the Hub (the organisation's default).
            token: default: HF_TOKEN or the saved login.
            branch: the branch to commit to (created if missing).
            create_pr: open a pull request instead of committing to the branch.
            force: replace a README.md that was edited on the Hub.
            config: `ModelHubMixin.save_pretrained(push_to_hub=True)` passes it; the export's own files are used.
            model_card_kwargs: likewise unused: the card is the export's.

        Returns:
            The URL of the commit, or of the pull request.
        """
        with tempfile.TemporaryDirectory(prefix="ntkcl-push-") as workdir:
            folder = Path(workdir) / "export"
            self.save_pretrained(folder)
            pushed = push_export(
                folder,
                self.config,
                repo_id,
                private=private,
                revision=branch,
                token=token,
                force=force,
                create_pr=create_pr,
                commit_message=commit_message,
            )
        return pushed.pull_request or pushed.commit


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
) -> ContinualModel:
    """Rebuild the model of an export folder; the backbone's sha256 must match the one it was trained on."""
    from ntkcl.engine.builders import build_backbone, build_method

    document = read_export_config(folder)
    if method is not None and document["method"] != method:
        raise BadInputError(f"{folder} holds a {document['method']} export, not {method}")
    weights_file = export_path(folder, WEIGHTS_NAME)
    if not weights_file.is_file():
        raise BadInputError(f"{folder} is not an ntkcl export (no {WEIGHTS_NAME})")
    verify_export(folder, document.get("export_format", 0))
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
        state = load_file(weights_file)
        model.load_learned_state(state, finished)
    except BadInputError as error:
        raise BadInputError(f"{weights_file}: {error}") from error
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInputError(f"{weights_file} does not fit method {document['method']}: {reason}") from error
    model.to(resolve_device(device))
    seen = finished[-1].total_classes if finished else 0
    metrics = rundir.read_json(folder / METRICS_NAME) if (folder / METRICS_NAME).is_file() else {}
    if not isinstance(metrics, dict):
        raise BadInputError(f"{folder / METRICS_NAME} holds a JSON {type(metrics).__name__}, not an object")
    card = ""
    if (folder / CARD_NAME).is_file():
        card = (folder / CARD_NAME).read_text(encoding="utf-8", errors="replace")  # documentation only
    return ContinualModel(model, document["class_names"][:seen], document, metrics, card, source or str(folder))


def locate_export(path_or_repo_id: str | Path, **download_options) -> Path:
    """A local export folder, or the snapshot of a Hub repo holding one (downloaded or from the cache).

    Args:
        path_or_repo_id: a folder or `user/name`.
        download_options: `hub.download_export`'s revision, token, cache_dir, force_download, local_files_only.
    """
    text = str(path_or_repo_id)
    path = expand_user(text)
    if path.is_dir():
        if not export_path(path, CONFIG_NAME).is_file():
            raise BadInputError(f"{path} is not an ntkcl run directory or export (no run.json / {CONFIG_NAME})")
        return path
    if path.is_absolute() or text.startswith((".", "~")) or len(path.parts) != 2 or Path(path.parts[0]).is_dir():
        raise BadInputError(f"{path} does not exist (and is not a Hub repo id of the form user/name)")
    return download_export(text, **download_options)


def load_pretrained(path_or_repo_id: str | Path, **kwargs) -> ContinualModel:
    """`ContinualModel.from_pretrained`: an export folder or Hub repo id as a model (see its arguments)."""
    return ContinualModel.from_pretrained(path_or_repo_id, **kwargs)

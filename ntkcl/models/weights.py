"""timm backbones by any name `timm.create_model` accepts, with pre-trained weights loaded strictly.

Names: `arch.tag` (`vit_base_patch16_224.augreg_in21k`), a bare architecture (resolved to timm's default tag,
so the run records which weights it means), a deprecated timm name (mapped to its current `arch.tag`),
`hf-hub:<repo id>[@revision]`, `local-dir:<folder>` (a folder written by timm's `save_for_hf` / a Hub
snapshot: `config.json` plus weights) and the names of the backbones shipped in the package
(`ntkcl.models.shipped`, e.g. `ntkcl-tiny-fdsl`: a timm architecture with fixed arguments and its own weights).
A backbone without loaded weights is recorded as its bare architecture with `init: "random init"`, never
under the tag of weights it does not hold.

Weights come from the Hugging Face Hub cache (downloaded unless `HF_HUB_OFFLINE` is set), the local folder
of a `local-dir:` name, or a file given explicitly. The file is located here rather than inside timm so that
its path, sha256 and Hub revision can be recorded; it is then handed to timm, which adapts it to the model
(position-embedding resampling, format conversions) and loads it with `strict=True`: every tensor except the
classifier head must load, or the load fails naming the missing and unexpected keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.files import expand_user, sha256_file
from ntkcl.models.shipped import RANDOM_INIT, SHIPPED_BACKBONES, SHIPPED_SOURCE

logger = logging.getLogger(__name__)

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
HUB_WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
TIMM_SOURCES = ("hf-hub", "local-dir")
PRETRAINED_INIT = "pre-trained"
# The keys torch's strict `load_state_dict` lists when a checkpoint does not fit the model.
_LOAD_PROBLEMS = {
    "missing": re.compile(r'Missing key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)'),
    "unexpected": re.compile(r'Unexpected key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)'),
    "wrong shape": re.compile(r"size mismatch for ([^:\s]+):"),
}


@dataclass(frozen=True)
class BackboneOrigin:
    """Which architecture and which weights a backbone is: what `run.json` and exports record.

    Attributes:
        requested: the name as given (config, `--backbone`).
        name: the resolved timm `arch.tag`, a shipped backbone's name, or the bare architecture when no
            weights are loaded (random initialisation).
        source: "timm" (the registry), "hf-hub", "local-dir" or "ntkcl" (shipped in the package).
        hf_hub_id: the Hub repo the weights were downloaded from (None for random or local weights).
        revision: the Hub commit of those weights.
        weights_file / weights_file_sha256: the file the weights were read from, and its sha256.
        license: the licence of the pre-trained weights, from timm's pretrained config.
    """

    requested: str
    name: str
    architecture: str
    tag: str | None
    source: str
    pretrained: bool = False
    hf_hub_id: str | None = None
    revision: str | None = None
    weights_file: str | None = None
    weights_file_sha256: str | None = None
    license: str | None = None
    pretrained_cfg: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def timm_name(self) -> str:
        """What to pass to `timm.create_model`: the prefixed name for Hub and folder sources, the architecture
        of a shipped backbone, else `arch.tag`."""
        if self.source in TIMM_SOURCES:
            return self.requested
        return self.architecture if self.source == SHIPPED_SOURCE else self.name

    @property
    def init(self) -> str:
        """ "pre-trained" or "random init"."""
        return PRETRAINED_INIT if self.pretrained else RANDOM_INIT

    @property
    def label(self) -> str:
        """What a person reads: `ntkcl-tiny-fdsl`, or `vit_tiny_patch16_224 (random init)`."""
        return self.name if self.pretrained else f"{self.name} ({RANDOM_INIT})"

    def architecture_only(self) -> BackboneOrigin:
        """This architecture under its bare name, for weights that are not its tag's or shipped ones (random
        initialisation, another file), so that no name claims weights the model does not hold."""
        return BackboneOrigin(
            **{
                **asdict(self),
                "name": self.architecture,
                "tag": None,
                "source": "timm" if self.source == SHIPPED_SOURCE else self.source,
                "license": None,
            }
        )

    def record(self) -> dict:
        """The JSON-able provenance (without timm's full pretrained config)."""
        document = {key: value for key, value in asdict(self).items() if key != "pretrained_cfg"}
        return {**document, "init": self.init}


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def canonical_timm_name(name: str) -> str:
    """timm's current name for a deprecated one (`vit_base_patch16_224_in21k` -> `.augreg_in21k`), else `name`."""
    current = timm.models.get_deprecated_models().get(name)
    if current is None:
        return name
    logger.warning("%s is timm's deprecated name of %s; using %s", name, current, current)
    return current


def _timm_failure(name: str, error: BaseException) -> BadInputError:
    from huggingface_hub import is_offline_mode

    reason = first_line(error)
    if isinstance(error, RuntimeError) and reason.startswith("Unknown model"):
        return BadInputError(f"{name!r} is not a timm model (see `timm.list_models('vit*')`)")
    if is_offline_mode() and name.startswith("hf-hub:"):
        reason = "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    return BadInputError(f"cannot resolve backbone {name!r}: {reason}")


def timm_model_kwargs(name: str, model_kwargs: dict | None) -> dict:
    """The `timm.create_model` arguments of `name`: a shipped backbone's own, updated by `model_kwargs`."""
    shipped = SHIPPED_BACKBONES.get(name)
    return {**(shipped.model_kwargs if shipped else {}), **dict(model_kwargs or {})}


def _describe_shipped(name: str, model_kwargs: dict | None) -> tuple[nn.Module, BackboneOrigin]:
    shipped = SHIPPED_BACKBONES[name]
    model, origin = describe_timm_model(shipped.architecture, timm_model_kwargs(name, model_kwargs))
    return model, BackboneOrigin(
        requested=name,
        name=shipped.name,
        architecture=shipped.architecture,
        tag=None,
        source=SHIPPED_SOURCE,
        license=shipped.license,
        pretrained_cfg=origin.pretrained_cfg,
    )


# No vision transformer has blocks, heads or a patch grid anywhere near these; larger values are typos.
ARCHITECTURE_LIMITS = {"depth": 1024, "num_heads": 1024, "patch_size": 4096, "img_size": 16384, "embed_dim": 65536}


def check_architecture(model_kwargs: dict) -> None:
    """Degenerate ViT sizes in `backbone.model_kwargs`, refused before timm divides by them.

    Each size is a positive integer within `ARCHITECTURE_LIMITS`, the patch size divides the image size and
    the heads divide the width.
    """
    for key, limit in ARCHITECTURE_LIMITS.items():
        value = model_kwargs.get(key)
        values = value if key in ("patch_size", "img_size") and isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is None:
                continue
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= limit:
                raise BadInputError(f"backbone.model_kwargs.{key} must be an integer from 1 to {limit}, not {item!r}")
    image, patch = model_kwargs.get("img_size"), model_kwargs.get("patch_size")
    if isinstance(image, int) and isinstance(patch, int) and image % patch:
        raise BadInputError(
            f"backbone.model_kwargs.patch_size {patch} does not divide img_size {image}: the patch grid would "
            "drop the image's border"
        )
    width, heads = model_kwargs.get("embed_dim"), model_kwargs.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise BadInputError(f"backbone.model_kwargs.num_heads {heads} does not divide embed_dim {width}")


def describe_timm_model(name: str, model_kwargs: dict | None = None) -> tuple[nn.Module, BackboneOrigin]:
    """The architecture of `name` built on the meta device (no memory, no weights read) and where it comes from.

    Raises:
        BadInputError: the name is unknown, its `hf-hub:` config cannot be fetched, or its folder has no config.
    """
    from huggingface_hub.errors import EntryNotFoundError

    if name in SHIPPED_BACKBONES:
        return _describe_shipped(name, model_kwargs)
    requested = name
    name = canonical_timm_name(name)
    check_architecture(dict(model_kwargs or {}))
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0, **dict(model_kwargs or {}))
    except (RuntimeError, ValueError, OSError, TypeError, ArithmeticError, AssertionError, EntryNotFoundError) as error:
        raise _timm_failure(name, error) from error
    config = dict(model.pretrained_cfg or {})
    architecture = config.get("architecture") or name.split(".", 1)[0]
    tag = config.get("tag") or None
    source = config.get("source") or "timm"
    origin = BackboneOrigin(
        requested=requested,
        name=f"{architecture}.{tag}" if tag else architecture,
        architecture=architecture,
        tag=tag,
        source=source if source in TIMM_SOURCES else "timm",
        license=config.get("license"),
        pretrained_cfg=config,
    )
    return model, origin


def _weights_in_folder(folder: Path) -> Path:
    for file_name in WEIGHT_FILE_NAMES:
        if (folder / file_name).is_file():
            return folder / file_name
    raise BadInputError(f"{folder} holds none of {', '.join(WEIGHT_FILE_NAMES)}")


def weights_file(weights: str | Path) -> Path:
    """The file a `--weights` value names: the file itself, or the weights file inside a folder."""
    path = expand_user(weights)
    if path.is_dir():
        return _weights_in_folder(path)
    if not path.is_file():
        raise BadInputError(f"backbone weights {path} do not exist")
    return path


def _hub_revision(path: Path) -> str | None:
    """The commit of a file in the Hugging Face cache (`.../snapshots/<commit>/<file>`)."""
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def _download_from_hub(hub_id: str, file_names: tuple[str, ...]) -> Path:
    from huggingface_hub import hf_hub_download, is_offline_mode
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = hub_id.partition("@")
    reasons = []
    for file_name in file_names:
        try:
            return Path(hf_hub_download(repo_id, file_name, revision=revision or None))
        except LocalEntryNotFoundError as error:
            reasons.append(first_line(error))
            if is_offline_mode():
                break
        except EntryNotFoundError as error:
            reasons.append(first_line(error))
        except Exception as error:  # network, authentication, unknown repo: one line, the user decides
            raise BadInputError(
                f"cannot download the weights of {hub_id}: {first_line(error)} (pass --weights FILE or --no-pretrained)"
            ) from error
    if is_offline_mode():
        raise BadInputError(
            f"the weights of {hub_id} are not in the Hugging Face cache and HF_HUB_OFFLINE is set "
            "(pass --weights FILE or --no-pretrained)"
        )
    raise BadInputError(f"{hub_id} has none of {', '.join(file_names)} ({reasons[-1] if reasons else 'not found'})")


def _download_from_url(url: str) -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?", 1)[0]).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target))
        except Exception as error:  # any transport failure is one line
            raise BadInputError(f"cannot download {url}: {first_line(error)} (pass --weights FILE)") from error
    return target


def locate_weights(origin: BackboneOrigin, weights: str | Path | None) -> BackboneOrigin:
    """`origin` completed with the weights file to read: `weights` if given, else the pre-trained one."""
    config = origin.pretrained_cfg
    revision = hub_id = None
    if weights is not None:
        path = weights_file(weights)
        if origin.source == SHIPPED_SOURCE:
            origin = origin.architecture_only()
    elif origin.source == SHIPPED_SOURCE:
        path = SHIPPED_BACKBONES[origin.name].weights_file
        if not path.is_file():
            raise BadInputError(f"the {origin.name} weights are missing from this installation ({path})")
    elif origin.source == "local-dir":
        path = _weights_in_folder(Path(config["file"]))
    elif config.get("hf_hub_id"):
        hub_id = config["hf_hub_id"]
        file_names = (config["hf_hub_filename"],) if config.get("hf_hub_filename") else HUB_WEIGHT_FILE_NAMES
        path = _download_from_hub(hub_id, file_names)
        revision = _hub_revision(path)
    elif config.get("url"):
        path = _download_from_url(config["url"])
    else:
        raise BadInputError(
            f"timm has no pre-trained weights for {origin.name}; pass --weights FILE or --no-pretrained"
        )
    sha256 = sha256_file(path)
    if origin.source == SHIPPED_SOURCE and sha256 != SHIPPED_BACKBONES[origin.name].recorded_sha256():
        raise BadInputError(f"{path} differs from the {origin.name} weights ntkcl shipped (sha256); reinstall ntkcl")
    return BackboneOrigin(
        **{
            **asdict(origin),
            "pretrained": True,
            "hf_hub_id": hub_id.partition("@")[0] if hub_id else None,
            "revision": revision,
            "weights_file": str(path),
            "weights_file_sha256": sha256,
        }
    )


def _checkpoint_format(path: Path) -> str | None:
    """ "safetensors", "pytorch" (zip or pickle) or None, from the first bytes of the file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as error:  # a special file such as /proc/self/mem, or one without read permission
        raise BadInputError(f"backbone weights {path} cannot be read: {error.strerror or error}") from error
    if path.suffix == ".safetensors" and len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "pytorch"
    return None


def read_checkpoint(path: Path, architecture: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or PyTorch checkpoint file (timm's reader: unwraps `state_dict`/`model`)."""
    if _checkpoint_format(path) is None:
        raise BadInputError(
            f"{path} is not a readable checkpoint of {architecture} (neither a .safetensors nor a PyTorch file)"
        )
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as error:  # whatever the parser chokes on, the file is not a checkpoint
        raise BadInputError(f"{path} is not a readable checkpoint of {architecture} ({first_line(error)})") from error
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"{path} is not a readable checkpoint of {architecture} (it holds no tensors by name)")
    return state


def check_checkpoint(weights: str | Path, architecture: str) -> None:
    """Before a run: `weights` reads as a checkpoint (a safetensors file by its header alone)."""
    path = weights_file(weights)
    if _checkpoint_format(path) != "safetensors":
        read_checkpoint(path, architecture)
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as opened:
            names = list(opened.keys())
    except Exception as error:  # whatever the parser chokes on, the file is not a checkpoint
        raise BadInputError(f"{path} is not a readable checkpoint of {architecture} ({first_line(error)})") from error
    if not names:
        raise BadInputError(f"{path} is not a readable checkpoint of {architecture} (it holds no tensors)")


def _classifier_keys(config: dict) -> set[str]:
    classifiers = config.get("classifier") or ()
    names = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    return {f"{name}.{suffix}" for name in names for suffix in ("weight", "bias")}


def _key_groups(keys: list[str], universe: Iterable[str], shown: int = 6) -> str:
    """`blocks.4.*, blocks.5.*, norm.weight`: a numbered sub-module is folded into one entry only when every
    one of its tensors in `universe` is listed; otherwise its keys are named exactly."""
    listed = set(keys)
    members: dict[str, set[str]] = {}
    for key in universe:
        match = re.match(r"^(\w+\.\d+)\.", key)
        if match:
            members.setdefault(match.group(1), set()).add(key)
    entries = []
    for key in keys:
        match = re.match(r"^(\w+\.\d+)\.", key)
        whole = match is not None and members.get(match.group(1), {key}) <= listed
        entries.append(f"{match.group(1)}.*" if whole else key)
    groups = list(dict.fromkeys(entries))
    more = f" (+{len(groups) - shown} more)" if len(groups) > shown else ""
    return ", ".join(groups[:shown]) + more


def load_problems(error: RuntimeError, model_keys: Iterable[str], file_keys: Iterable[str]) -> str:
    """`missing blocks.5.*, norm.weight; unexpected head.fc.weight` from torch's strict-load error; a block is
    folded only when all of it is missing (model keys) or unexpected (file keys)."""
    text = str(error)
    model_keys, file_keys = set(model_keys), set(file_keys)
    parts = []
    for label, pattern in _LOAD_PROBLEMS.items():
        keys = [key for match in pattern.findall(text) for key in re.findall(r'"([^"]+)"', match) or [match]]
        if keys:
            parts.append(f"{label} {_key_groups(keys, file_keys if label == 'unexpected' else model_keys)}")
    return "; ".join(parts) or first_line(error)


def create_timm_model(
    origin: BackboneOrigin,
    model_kwargs: dict | None,
    init_seed: int,
    allow_partial: bool = False,
) -> nn.Module:
    """The timm model of `origin` with `num_classes=0`: random (seeded) or with its weights file loaded strictly.

    Args:
        origin: from `describe_timm_model`, completed by `locate_weights` when weights are loaded.
        model_kwargs: extra `timm.create_model` arguments (img_size, patch_size, depth, ...).
        init_seed: seed of the random initialisation (also of layers a partial load leaves untouched).
        allow_partial: load what fits and warn about the rest instead of refusing.
    """
    name = origin.timm_name
    kwargs = {**dict(model_kwargs or {}), "num_classes": 0}
    overlay = {}
    if origin.weights_file is not None:
        state = read_checkpoint(Path(origin.weights_file), origin.architecture)
        for key in _classifier_keys(origin.pretrained_cfg):
            state.pop(key, None)
        # The file goes to timm as a state dict, so timm adapts it but cannot fetch anything else; num_classes 0
        # on both sides keeps timm from relaxing `strict` for a classifier it would otherwise drop.
        overlay = {"source": "", "file": None, "state_dict": state, "num_classes": 0, "label_offset": 0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        if not overlay:
            return timm.create_model(name, pretrained=False, **kwargs)
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, pretrained_strict=True, **kwargs
            )
        except RuntimeError as error:
            if "state_dict" not in str(error):
                raise BadInputError(
                    f"cannot load {origin.weights_file} into {origin.name}: {first_line(error)}"
                ) from error
            with torch.device("meta"):
                model_keys = timm.create_model(name, pretrained=False, **kwargs).state_dict().keys()
            problems = load_problems(error, model_keys, state.keys())
            if not allow_partial or "wrong shape" in problems:
                raise BadInputError(
                    f"{origin.weights_file} does not fit {origin.name} with {kwargs}: {problems}"
                    + ("" if allow_partial else " (set backbone.allow_partial=true to load what fits)")
                ) from error
        logger.warning(
            "PARTIAL WEIGHTS: %s does not cover %s (%s); what is missing keeps its random initialisation",
            origin.weights_file,
            origin.name,
            problems,
        )
        torch.manual_seed(init_seed)
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, pretrained_strict=False, **kwargs
        )

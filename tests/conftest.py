"""Shared fixtures: an isolated data root, a tiny random ViT, and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# A timm ViT small enough for CPU tests: 32-pixel input, 8-pixel patches (16 tokens + CLS), width 64, 2 blocks.
TINY_BACKBONE = {"name": "test_vit", "pretrained": False, "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
TINY_BACKBONE_FLAGS = [
    "--backbone",
    "test_vit",
    "--no-pretrained",
    "--set",
    "backbone.model_kwargs={img_size=32, patch_size=8, depth=2}",
]

# An open_clip CLIP small enough for CPU tests: 32-pixel images in 8-pixel patches, width 64, 2 blocks per
# tower, a 16-token context; random weights with the OpenAI ViT-B/16 layout (QuickGELU).
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP = {"name": "clip:ViT-B-16/openai", "pretrained": False, "model_kwargs": TINY_CLIP_CONFIG, "normalize": "clip"}
TINY_CLIP_FLAGS = [
    "--backbone",
    "clip:ViT-B-16/openai",
    "--no-pretrained",
    "--set",
    "backbone.model_kwargs={embed_dim=32, vision_cfg={image_size=32, patch_size=8, width=64, layers=2, head_width=32}, "
    "text_cfg={context_length=16, vocab_size=49408, width=64, heads=2, layers=2}}",
]


# The backbone shipped in the package, pre-trained on generated fractals: what tests of learning ("forgets less
# than finetune") run on, since every method they compare assumes pre-trained features.
SHIPPED_BACKBONE_FLAGS = ["--backbone", "ntkcl-tiny-fdsl"]


def tiny_digits_run(
    *,
    init_classes: int,
    increment: int,
    epochs: int = 1,
    batch_size: int | None = None,
    backbone: list[str] = TINY_BACKBONE_FLAGS,
) -> list:
    """`ntkcl train` arguments for a quiet digits run on the tiny ViT (or `backbone`'s flags), in this process,
    with JSON output."""
    batch = ["--batch-size", str(batch_size)] if batch_size else []
    return [
        "train",
        "--stream",
        "digits",
        *backbone,
        "--init-classes",
        str(init_classes),
        "--increment",
        str(increment),
        "--epochs",
        str(epochs),
        *batch,
        "--num-workers",
        "0",
        "--set",
        "runtime.no_training_reference=false",
        "-q",
        "--json",
    ]


FAKE_HUB_REPO = "timm/test_vit.r160_in1k"
FAKE_HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHubCache:
    root: Path
    snapshot: Path

    @property
    def weights(self) -> Path:
        return self.snapshot / "model.safetensors"


@pytest.fixture
def fake_hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding timm's `test_vit.r160_in1k` (random weights with a 1000-class head).

    The layout is the cache's own (`models--timm--test_vit.r160_in1k/{refs/main, snapshots/<commit>/}`), so
    `hf_hub_download` and timm's `hf-hub:` names find the files without a network; the snapshot folder also
    serves as a `local-dir:` folder.
    """
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    root = tmp_path / "hf-cache"
    repo = root / f"models--{FAKE_HUB_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / FAKE_HUB_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_HUB_COMMIT)
    torch.manual_seed(7)
    model = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("hf_hub_id", "url", "file", "source")}
    config = {"architecture": "test_vit", "num_classes": 1000, "num_features": 64, "pretrained_cfg": pretrained_cfg}
    (snapshot / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return FakeHubCache(root, snapshot)


# The protocol of the runs `run_of` trains once per session and the tests that compare against them.
SHARED_RUN_PROTOCOL = {"init_classes": 5, "increment": 5, "batch_size": 64}
_SHARED_RUNS: dict[tuple[str, bool], object] = {}


def trained_run(method, base, data_root, shipped: bool = False):
    """A finished two-task digits run of `method` on the tiny ViT (the tiny CLIP for CLIP methods; the shipped
    pre-trained backbone with `shipped`), trained once per test session."""
    key = (method, shipped)
    if key not in _SHARED_RUNS:
        from ntkcl.cli import main
        from ntkcl.methods.registry import get_method
        from ntkcl.models.backbone import CLIP_TOWERS

        out = base / (f"{method}-shipped" if shipped else method)
        clip = CLIP_TOWERS in get_method(method).required_backbone_features
        backbone = SHIPPED_BACKBONE_FLAGS if shipped else TINY_BACKBONE_FLAGS
        argv = [*tiny_digits_run(**SHARED_RUN_PROTOCOL, backbone=backbone), "--method", method, "--out", str(out)]
        if clip:
            start = argv.index(backbone[0])
            argv[start : start + len(backbone)] = TINY_CLIP_FLAGS
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("NTKCL_DATA_ROOT", str(data_root))
            if clip:
                # The CLIP methods' small SVDs and QRs crawl on two threads of a busy machine.
                torch.set_num_threads(1)
            try:
                main(argv)
            finally:
                torch.set_num_threads(threads)
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        _SHARED_RUNS[key] = run
    return _SHARED_RUNS[key]


@pytest.fixture(scope="session")
def session_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-runs"), tmp_path_factory.mktemp("shared-data")


@pytest.fixture
def run_of(session_dirs, monkeypatch):
    """`run_of(method, shipped=False)`: the session's shared digits run of that method (see `trained_run`)."""
    base, data = session_dirs
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(data))
    return lambda method, shipped=False: trained_run(method, base, data, shipped)


class FakeData:
    """TaskData over fixed tensors in one process, in batches of `batch_size`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 4):
        self.device = images.device
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def batches(self):
        for images, labels, _ in self.indexed_batches():
            yield images, labels

    def indexed_batches(self):
        for start in range(0, len(self.labels), self.batch_size):
            stop = min(start + self.batch_size, len(self.labels))
            yield self.images[start:stop], self.labels[start:stop], torch.arange(start, stop)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class ListData:
    """TaskData over fixed batches (single process)."""

    def __init__(self, batches):
        self._batches = batches
        self.device = torch.device("cpu")

    def batches(self):
        yield from self._batches

    def all_reduce_sum(self, tensor):
        return tensor


def finish_first_task(method) -> tuple[torch.Tensor, torch.Tensor]:
    """Begin and end a first task of two classes on six random 32-pixel images given as two batches."""
    from ntkcl.methods.base import TaskInfo

    images = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    first = TaskInfo(0, 2, 0, 2)
    method.begin_task(first)
    method.end_task(first, ListData([(images[:4], labels[:4]), (images[4:], labels[4:])]))
    return images, labels


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One torch thread: the tiny SVDs, QRs and eigen-decompositions of subspace methods run far slower on two
    threads of a busy machine than on one."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(root))
    return root


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def run_cli(*args) -> CliResult:
    """Run `ntkcl ARGS...` in this process; returns exit code, stdout and stderr."""
    from ntkcl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def only_run(out) -> Path:
    """The one run folder under `out`."""
    runs = [path for path in out.iterdir() if path.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def metrics_of(run: Path) -> dict:
    """A run folder's metrics.json."""
    from ntkcl.engine import rundir

    return rundir.read_json(run / rundir.METRICS_FILE)


def two_process_run(cli, run_of, method: str, out: Path):
    """`method`'s shared digits run again under `--nproc 2` (gloo): (one-process run, the two-process result,
    the last checkpoint's state of each)."""
    from ntkcl.engine import rundir

    one = run_of(method)
    arguments = [*tiny_digits_run(**SHARED_RUN_PROTOCOL), "--method", method, "--nproc", "2", "--device", "cpu"]
    result = cli(*arguments, "--out", out)
    assert result.code == 0, result.err
    (two,) = out.iterdir()
    state_one, _ = rundir.load_checkpoint(rundir.finished_checkpoints(one)[-1])
    state_two, _ = rundir.load_checkpoint(rundir.finished_checkpoints(two)[-1])
    assert set(state_one) == set(state_two)
    return one, result, state_one, state_two


def train_once(root: Path, runs: dict[str, list]) -> dict[str, tuple[Path, dict]]:
    """`ntkcl train ARGS` for each name under `root` (its own data root); name -> (run folder, metrics).

    For module-scoped fixtures: runs that several tests of a module compare against are trained once.
    """
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NTKCL_DATA_ROOT", str(root / "data"))
        for name, arguments in runs.items():
            result = run_cli(*arguments, "--out", root / name)
            assert result.code == 0, result.err
            found[name] = (only_run(root / name), result.json()["metrics"])
    return found


@pytest.fixture
def cli():
    """`run_cli` as a fixture."""
    return run_cli


@contextlib.contextmanager
def crashing_at_task(method_class, index: int):
    """Inside the block, `method_class.begin_task` raises "simulated crash" when task `index` begins (a crash
    after the earlier tasks' checkpoints were written); the method is restored on leaving."""
    original = method_class.begin_task

    def crash(self, task):
        if task.index == index:
            raise RuntimeError("simulated crash")
        return original(self, task)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(method_class, "begin_task", crash)
        yield

"""The device feed against the loader feed: the same matrix and epoch losses bit for bit on CPU (digits and a
folder of JPEGs of several sizes), resumes across feeds, phase times that cover the task, and an array dataset
larger than a memory cap trained without being loaded whole."""

import json
import resource
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ntkcl.config import RunConfig
from ntkcl.data.batched_transforms import build_batched_transforms, seeded_draws
from ntkcl.data.decoded import DecodedImages
from ntkcl.data.loaders import seeded_generators
from ntkcl.data.plugin import Samples
from ntkcl.data.stream import Stream
from ntkcl.data.transforms import build_transforms
from ntkcl.engine import rundir
from ntkcl.engine.feed import choose_feed
from ntkcl.engine.phases import OTHER, PHASES
from tests.conftest import TINY_BACKBONE_FLAGS, only_run, run_cli, tiny_digits_run, train_once

SMALLER = ["--set", "backbone.model_kwargs={img_size=16, patch_size=8, depth=1}"]
DIGITS = [*tiny_digits_run(init_classes=5, increment=5, epochs=2, batch_size=128), *SMALLER, "--method", "finetune"]

# A third-party dataset of JPEG files of several sizes (some larger than the test resize, some smaller).
JPEG_PLUGIN = textwrap.dedent(
    """
    import numpy as np
    from PIL import Image
    from ntkcl.data import DatasetPlugin, write_manifest

    class Shapes(DatasetPlugin):
        name = "jpeg-shapes"
        num_classes = 4
        class_names = ("a", "b", "c", "d")
        default_init_classes = 2
        default_increment = 2

        def prepare(self, root, source=None, force=False):
            folder = self.dataset_dir(root)
            rng = np.random.default_rng(0)
            rows = []
            for index in range(96):
                label = index % 4
                height, width = [(30, 40), (52, 44), (24, 36), (37, 37)][index % 3 + (index % 7 == 0)]
                pixels = rng.integers(0, 60, (height, width, 3)) + 60 * label
                path = folder / f"c{label}" / f"{index:03d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
                rows.append((f"c{label}/{index:03d}.jpg", label))
            return write_manifest(folder, self.name, self.class_names,
                                  {"train": [r for i, r in enumerate(rows) if i % 5],
                                   "test": [r for i, r in enumerate(rows) if not i % 5]})

    plugin = Shapes()
    """
)

# A memory-mapped `.npy` array dataset of 64 classes: 4,096 training images of 128 x 128 x 3 (192 MiB), one test
# image per class. Runs train only the first task, of one class, so that few of its pixels are transformed on CPU.
NPY_PLUGIN = textwrap.dedent(
    """
    import numpy as np
    from ntkcl.data import DatasetPlugin, write_manifest

    class Large(DatasetPlugin):
        name = "large-npy"
        num_classes = 64
        class_names = tuple(f"c{i}" for i in range(64))
        default_init_classes = 1
        default_increment = 63

        def prepare(self, root, source=None, force=False):
            folder = self.dataset_dir(root)
            folder.mkdir(parents=True, exist_ok=True)
            rows = {}
            for split, count in (("train", 4096), ("test", 64)):
                images = np.lib.format.open_memmap(folder / f"{split}.npy", "w+", np.uint8, (count, 128, 128, 3))
                labels = np.arange(count) % 64
                for start in range(0, count, 512):
                    part = labels[start : start + 512, None, None, None]
                    images[start : start + 512] = (4 * part + np.arange(128)[:, None, None] % 4).astype(np.uint8)
                images.flush()
                rows[split] = [(f"{split}.npy#{i:04d}", int(label)) for i, label in enumerate(labels)]
            return write_manifest(folder, self.name, self.class_names, rows)

    plugin = Large()
    """
)


def install_plugin(site, name, source):
    (site / f"{name}.py").write_text(source)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    dataset = name.replace("_", "-")
    (info / "entry_points.txt").write_text(f"[ntkcl.datasets]\n{dataset} = {name}:plugin\n")


@pytest.fixture(scope="module")
def plugins_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    install_plugin(site, "jpeg_shapes", JPEG_PLUGIN)
    install_plugin(site, "large_npy", NPY_PLUGIN)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        yield site


def log_records(run, event):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == event]


def epoch_losses(run):
    return [(r["task"], r["epoch"], r["loss"]) for r in log_records(run, "epoch_end")]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    return train_once(
        tmp_path_factory.mktemp("digits"), {feed: [*DIGITS, "--feed", feed] for feed in ("loader", "device")}
    )


def test_device_feed_gives_the_loader_feeds_run_on_digits(digits_runs):
    (loader_run, loader), (device_run, device) = digits_runs["loader"], digits_runs["device"]
    assert device["correct"] == loader["correct"]
    assert epoch_losses(device_run) == epoch_losses(loader_run)
    assert [r["feed"] for r in log_records(device_run, "feed")] == ["device"]
    assert log_records(loader_run, "feed")[0]["reason"] == "data.feed is loader"


def test_phase_times_cover_each_task(digits_runs):
    for run, _ in digits_runs.values():
        for record in log_records(run, "task_end"):
            phases = record["phases"]
            assert set(phases) == {*PHASES, OTHER}
            assert all(seconds >= 0 for seconds in phases.values())
            assert phases["data_wait"] > 0 and phases["forward_backward"] > 0 and phases["evaluation"] > 0
            assert phases["checkpoint"] > 0 and phases["statistics"] >= 0
            # every second of the task but a few percent is in a named phase
            assert phases[OTHER] <= 0.05 * record["wall_s"]
            assert sum(phases.values()) == pytest.approx(record["wall_s"], rel=1e-6)
        epochs = log_records(run, "epoch_end")
        assert all(r["phases"]["data_wait"] > 0 for r in epochs)


@pytest.mark.parametrize(("first", "second"), [("loader", "device"), ("device", "loader")])
def test_resume_from_a_snapshot_of_either_feed(cli, data_root, tmp_path, monkeypatch, digits_runs, first, second):
    original = rundir.save_snapshot

    def save_then_die(run_dir, position, state):
        path = original(run_dir, position, state)
        if (position["task"], position["epoch"]) == (1, 1):
            raise RuntimeError("killed after epoch 1 of task 1")
        return path

    monkeypatch.setattr(rundir, "save_snapshot", save_then_die)
    crashed = cli(*DIGITS, "--feed", first, "--out", tmp_path / "crash")
    assert crashed.code == 1 and "killed after epoch 1" in crashed.err
    monkeypatch.setattr(rundir, "save_snapshot", original)
    run = only_run(tmp_path / "crash")
    resumed = cli("train", "--resume", run, "--feed", second, "-q", "--json")
    assert resumed.code == 0, resumed.err
    reference_run, reference = digits_runs["loader"]
    assert resumed.json()["metrics"]["correct"] == reference["correct"]
    assert epoch_losses(run) == epoch_losses(reference_run)


def test_device_feed_gives_the_loader_feeds_run_on_jpeg_files(plugins_site, tmp_path):
    arguments = [
        "train",
        "--stream",
        "jpeg-shapes",
        "--method",
        "finetune",
        *TINY_BACKBONE_FLAGS,
        "--set",
        "stream.augment=paper",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "-q",
        "--json",
    ]
    runs = train_once(tmp_path, {feed: [*arguments, "--feed", feed] for feed in ("loader", "device")})
    (loader_run, loader), (device_run, device) = runs["loader"], runs["device"]
    assert device["correct"] == loader["correct"]
    assert epoch_losses(device_run) == epoch_losses(loader_run)
    assert (tmp_path / "data" / "decoded" / "jpeg-shapes" / "train.u8").is_file()


def data_segment_bytes() -> int:
    """This process's data segment (what RLIMIT_DATA caps: private writable memory, not file maps)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmData"].split()[0]) * 1024


@pytest.fixture(scope="module")
def large_npy_root(plugins_site, tmp_path_factory):
    root = tmp_path_factory.mktemp("large") / "data"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NTKCL_DATA_ROOT", str(root))
        assert run_cli("prepare", "large-npy").code == 0
    return root


@pytest.mark.parametrize("feed", ["device", "loader"])
def test_array_dataset_larger_than_the_memory_cap_trains(large_npy_root, cli, tmp_path, monkeypatch, feed):
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(large_npy_root))
    arguments = [
        "train",
        "--stream",
        "large-npy",
        "--method",
        "finetune",
        *TINY_BACKBONE_FLAGS,
        "--set",
        "stream.augment=resize",
        "--set",
        "optim.eval_batch_size=8",
        "--batch-size",
        "8",
        "--set",
        "optim.task_epochs=[1, 0]",
        "--num-workers",
        "0",
        "--feed",
        feed,
        "--out",
        tmp_path / "runs",
        "-q",
        "--json",
    ]
    train_bytes = (large_npy_root / "large-npy" / "train.npy").stat().st_size
    # What the run may add to the data segment: the model, the batches and the feed's thread, not the data.
    cap = 128 * 2**20
    assert train_bytes > 1.5 * cap
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (data_segment_bytes() + cap, hard))
    try:
        result = cli(*arguments)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    assert result.code == 0, result.err
    assert result.json()["metrics"]["total"][-1] == [1, 63]


def test_per_image_and_batched_training_crops_agree_for_a_seed():
    rng = np.random.default_rng(0)
    shapes = [(30, 40), (60, 45), (20, 20), (37, 37), (52, 44)] * 8  # crops that shrink and stretch included
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    per_image, _ = build_transforms("paper", 32)
    batched, _ = build_batched_transforms("paper", 32)
    seeds = rng.integers(0, 2**32, len(images))
    expected = []
    for image, seed in zip(images, seeds, strict=True):
        with seeded_generators(int(seed)):
            expected.append(per_image(Image.fromarray(image)))
    decoded = DecodedImages.from_images(images)
    pixels, sizes = decoded.gather(np.arange(len(images)))
    assert torch.equal(batched.apply(pixels, batched.plan(sizes, seeded_draws(seeds))), torch.stack(expected))


def test_auto_feed_takes_the_device_on_cuda_when_the_decoded_splits_fit():
    arrays = np.zeros((10, 8, 8, 3), np.uint8)
    samples = Samples(np.arange(10) % 2, arrays=arrays)
    stream = Stream.build(samples, samples, 2, 1, 1, None)
    config = RunConfig()
    assert choose_feed(config, stream, torch.device("cpu")).feed == "loader"
    assert choose_feed(config, stream, torch.device("cuda")).feed == "device"
    config.data.feed_memory_fraction = 1e-12
    tight = choose_feed(config, stream, torch.device("cuda"))
    assert tight.feed == "loader" and "0.00 GiB" in tight.reason
    config.stream.augment = "timm"
    config.data.feed_memory_fraction = 0.5
    assert "no batched form" in choose_feed(config, stream, torch.device("cuda")).reason


def test_device_feed_with_an_unbatched_augmentation_is_bad_input(cli, data_root, tmp_path):
    result = cli(*DIGITS, "--feed", "device", "--set", "stream.augment=timm", "--out", tmp_path)
    assert result.code == 2
    assert "data.feed=device" in result.err and "Traceback" not in result.err

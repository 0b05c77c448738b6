"""A dataset plugin shipped as its own distribution is discovered, listed and trainable; a broken one is isolated."""

import textwrap

import pytest

from tests.conftest import TINY_BACKBONE_FLAGS

PLUGIN_SOURCE = textwrap.dedent(
    """
    import numpy as np
    from ntkcl.data import DatasetPlugin, write_manifest

    class Stripes(DatasetPlugin):
        name = "stripes"
        num_classes = 4
        class_names = ("horizontal", "vertical", "diagonal", "dots")
        default_init_classes = 2
        default_increment = 2

        def prepare(self, root, source=None, force=False):
            folder = self.dataset_dir(root)
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(0)
            images = np.zeros((80, 16, 16, 3), np.uint8)
            labels = np.repeat(np.arange(4), 20)
            for i, label in enumerate(labels):
                if label == 0:
                    images[i, ::4] = 255
                elif label == 1:
                    images[i, :, ::4] = 255
                elif label == 2:
                    images[i][np.eye(16, dtype=bool)] = 255
                else:
                    images[i, ::5, ::5] = 255
                images[i] = np.clip(images[i] + rng.integers(0, 40, images[i].shape), 0, 255)
            np.savez(folder / "images.npz", images=images)
            rows = [(f"images.npz#{i:03d}", int(label)) for i, label in enumerate(labels)]
            return write_manifest(folder, self.name, self.class_names,
                                  {"train": [r for i, r in enumerate(rows) if i % 5],
                                   "test": [r for i, r in enumerate(rows) if not i % 5]})

    plugin = Stripes()
    """
)


def make_distribution(site, name, module, source, entry_points):
    (site / f"{module}.py").write_text(source)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ntkcl.datasets]\n" + entry_points + "\n")


@pytest.fixture
def third_party_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "ntkcl_stripes", "ntkcl_stripes", PLUGIN_SOURCE, "stripes = ntkcl_stripes:plugin")
    make_distribution(
        site, "ntkcl_broken", "ntkcl_broken", "raise ImportError('needs libfoo 9')\n", "broken = ntkcl_broken:plugin"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_datasets_lists_third_party_and_broken_plugins(cli, data_root, third_party_site):
    result = cli("datasets", "--json")
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in result.json()["datasets"]}
    assert rows["stripes"]["distribution"] == "ntkcl_stripes"
    assert rows["stripes"]["classes"] == 4
    assert rows["broken"]["status"] == "broken"
    assert rows["broken"]["distribution"] == "ntkcl_broken"
    assert "needs libfoo 9" in rows["broken"]["error"]
    assert rows["digits"]["status"] in ("generated on first use", "prepared")


def test_third_party_stream_is_trainable(cli, data_root, third_party_site, tmp_path):
    result = cli("prepare", "stripes", "--json")
    assert result.code == 0, result.err
    result = cli(
        "train",
        "--stream",
        "stripes",
        "--method",
        "simplecil",
        *TINY_BACKBONE_FLAGS,
        "--out",
        tmp_path / "runs",
        "--json",
        "-q",
    )
    assert result.code == 0, result.err
    metrics = result.json()["metrics"]
    assert metrics["num_tasks"] == 2
    assert metrics["total"][-1] == [8, 8]


def test_broken_plugin_is_a_one_line_error(cli, data_root, third_party_site):
    result = cli("prepare", "broken")
    assert result.code == 2
    assert "needs libfoo 9" in result.err and "ntkcl_broken" in result.err

"""The MTIL / VTAB dataset plugins: metadata, text side, and `ntkcl prepare` on tiny archives in the real
formats (served on 127.0.0.1, or imported with --from for Stanford Cars)."""

from __future__ import annotations

import gzip
import io
import json
import re

import numpy as np
import pytest

from ntkcl.data.prepared import PreparedDataset
from ntkcl.data.registry import get_dataset
from tests._dataserver import DataServer, jpeg_bytes, tar_bytes, zip_bytes
from tests.test_prepare_plugins import one_line_error, serve, with_md5

# name: (classes, acquisition, checksum kinds, first template)
NEW = {
    "fgvc-aircraft": (100, "download", {"sha256"}, "a photo of a {}, a type of aircraft."),
    "caltech101": (101, "download", {"md5"}, "a photo of a {}."),
    "dtd": (47, "download", {"sha256"}, "a photo of a {} texture."),
    "flowers102": (102, "download", {"sha256"}, "a photo of a {}, a type of flower."),
    "food101": (101, "download", {"sha256"}, "a photo of {}, a type of food."),
    "mnist": (10, "download", {"sha256"}, 'a photo of the number: "{}".'),
    "stanford-cars": (196, "manual", {"sha256"}, "a photo of a {}."),
    "sun397": (397, "download", {"sha256"}, "a photo of a {}."),
    "patch-camelyon": (2, "download", {"md5"}, "this is a photo of {}"),
    "resisc45": (45, "download", {"md5", "sha256"}, "satellite imagery of {}."),
    "cifar100": (100, "download", {"md5"}, "a photo of a {}."),
    "eurosat": (10, "download", {"sha256"}, "a centered satellite photo of {}."),
    "oxford-pets": (37, "download", {"sha256"}, "a photo of a {}, a type of pet."),
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_metadata_and_text_side(name):
    classes, acquisition, kinds, first_template = NEW[name]
    plugin = get_dataset(name)
    assert isinstance(plugin, PreparedDataset) and plugin.name == name and plugin.num_classes == classes
    assert plugin.homepage.startswith("http") and plugin.license and plugin.citation.startswith("@")
    assert plugin.needs_manual_file == (acquisition == "manual")
    assert {remote.checksum_kind for remote in plugin.files} == kinds
    for remote in plugin.files:
        assert remote.md5 is None or re.fullmatch(r"[0-9a-f]{32}", remote.md5)
        assert remote.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
        assert remote.manual or remote.url.startswith("http")
    templates = plugin.prompt_templates()
    assert templates[0] == first_template and all(t.count("{}") == 1 for t in templates)
    for names in (plugin.class_names, plugin.prompt_names):
        assert not names or len(names) == classes == len(set(names))
    assert 1 <= plugin.default_init_classes <= classes


def test_class_name_overrides_follow_zscl():
    eurosat = get_dataset("eurosat").text_class_names(get_dataset("eurosat").class_names)
    assert eurosat[0] == "annual crop land" and eurosat[-1] == "lake or sea"
    caltech = get_dataset("caltech101")
    assert caltech.text_class_names(caltech.class_names)[:2] == ("off-center face", "centered face")
    assert get_dataset("flowers102").class_names[0] == "pink primrose"
    assert get_dataset("cifar100").text_class_names(["aquarium_fish"]) == ("aquarium fish",)
    assert get_dataset("sun397").text_class_names(["apartment_building/outdoor"]) == ("apartment building outdoor",)
    assert get_dataset("digits").prompt_templates() == ("a photo of a {}.",)


def test_published_checksums_are_pinned():
    assert get_dataset("caltech101").files[0].md5 == "3138e1922a9193bfa496528edbbc45d0"
    assert get_dataset("dtd").files[0].md5 == "fff73e5086ae6bdbea199a49dfb8a4c1"
    assert [r.md5 for r in get_dataset("flowers102").files][0] == "52808999861908f626f3c1f4e79d11fa"
    assert get_dataset("food101").files[0].md5 == "85eeb15f3717b99a5da872d97d918f87"
    assert get_dataset("sun397").files[0].md5 == "8ca2778205c41d23104230ba66911c7a"
    assert get_dataset("resisc45").files[0].md5 == "75206b2e16446591afa88e2628744886"
    assert {r.md5 for r in get_dataset("stanford-cars").files} >= {"065e5b463ae28d29e77c1b4b166cfe61"}
    assert get_dataset("fgvc-aircraft").files[0].sha256.startswith("d5f68b1b")
    assert get_dataset("patch-camelyon").files[0].md5 == "1571f514728f59376b705fc836ff4b63"


# -- tiny archives in each dataset's real layout -------------------------------------------------------------


def savemat_bytes(**arrays) -> bytes:
    from scipy.io import savemat

    buffer = io.BytesIO()
    savemat(buffer, arrays)
    return buffer.getvalue()


def aircraft_bodies():
    variants = [f"Model {v}-{v}00" for v in range(100)]
    members = {"fgvc-aircraft-2013b/data/variants.txt": "\n".join(variants).encode()}
    lines = {"train": [], "test": []}
    for i, split in enumerate(["train"] * 4 + ["test"] * 2):
        members[f"fgvc-aircraft-2013b/data/images/{1000 + i}.jpg"] = jpeg_bytes(i)
        lines[split].append(f"{1000 + i} {variants[i * 7]}")
    for split, rows in lines.items():
        members[f"fgvc-aircraft-2013b/data/images_variant_{split}.txt"] = "\n".join(rows).encode()
    return {"fgvc-aircraft-2013b.tar.gz": tar_bytes(members)}


def caltech_bodies():
    from ntkcl.plugins.caltech101 import CLASS_NAMES

    images = {
        f"101_ObjectCategories/{name}/image_{i:04d}.jpg": jpeg_bytes(c * 10 + i)
        for c, name in enumerate((*CLASS_NAMES, "BACKGROUND_Google"))
        for i in range(1, 3)
    }
    inner = tar_bytes(images)
    return {"caltech-101.zip": zip_bytes({"caltech-101/101_ObjectCategories.tar.gz": inner, "caltech-101/x.txt": b""})}


def dtd_bodies():
    from ntkcl.plugins.dtd import CLASS_NAMES

    members, lines = {}, {"train1": [], "test1": [], "val1": []}
    for c, name in enumerate(CLASS_NAMES):
        for i, split in enumerate(("train1", "test1", "val1")):
            members[f"dtd/images/{name}/{name}_{i:04d}.jpg"] = jpeg_bytes(c * 3 + i)
            lines[split].append(f"{name}/{name}_{i:04d}.jpg")
    for split, rows in lines.items():
        members[f"dtd/labels/{split}.txt"] = "\n".join(rows).encode()
    return {"dtd-r1.0.1.tar.gz": tar_bytes(members)}


def flowers_bodies():
    images = {f"jpg/image_{i:05d}.jpg": jpeg_bytes(i) for i in range(1, 7)}
    return {
        "102flowers.tgz": tar_bytes(images),
        "imagelabels.mat": savemat_bytes(labels=np.array([[1, 102, 5, 1, 7, 102]])),
        "setid.mat": savemat_bytes(trnid=np.array([[1, 2, 3]]), valid=np.array([[4]]), tstid=np.array([[5, 6]])),
    }


def food_bodies():
    classes = sorted(f"dish_{c:03d}" for c in range(101))
    members, listings = {}, {"train": {}, "test": {}}
    for c, name in enumerate(classes):
        for split in listings:
            listings[split][name] = [f"{name}/{c}{split}"] if c < 3 else []
            if c < 3:
                members[f"food-101/images/{name}/{c}{split}.jpg"] = jpeg_bytes(c)
    for split, listing in listings.items():
        members[f"food-101/meta/{split}.json"] = json.dumps(listing).encode()
    return {"food-101.tar.gz": tar_bytes(members)}


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def mnist_bodies():
    rng = np.random.default_rng(0)
    bodies = {}
    for prefix, count in (("train", 6), ("t10k", 3)):
        bodies[f"{prefix}-images-idx3-ubyte.gz"] = idx_bytes(rng.integers(0, 255, (count, 28, 28)))
        bodies[f"{prefix}-labels-idx1-ubyte.gz"] = idx_bytes(np.arange(count) % 10)
    return bodies


def sun_bodies():
    classes = [f"/{chr(97 + c % 26)}/place_{c:03d}" for c in range(396)] + ["/a/apartment_building/outdoor"]
    classes.sort()
    members = {"SUN397/ClassName.txt": ("\n".join(classes) + "\n").encode()}
    for c, path in enumerate(classes[:3] + [p for p in classes if "outdoor" in p]):
        for i in range(5):
            members[f"SUN397{path}/sun_{c}{i:03d}.jpg"] = jpeg_bytes(c * 10 + i)
    return {"SUN397.tar.gz": tar_bytes(members)}


def pcam_bodies():
    import h5py

    bodies = {}
    for split, count in (("train", 6), ("test", 4)):
        for key, array in (
            ("x", np.random.default_rng(count).integers(0, 255, (count, 8, 8, 3), dtype=np.uint8)),
            ("y", (np.arange(count) % 2).astype(np.uint8).reshape(count, 1, 1, 1)),
        ):
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as handle:
                handle.create_dataset(key, data=array)
            bodies[f"camelyonpatch_level_2_split_{split}_{key}.h5.gz"] = gzip.compress(buffer.getvalue())
    return bodies


def resisc_bodies():
    from ntkcl.plugins.resisc45 import CLASS_NAMES

    members = {
        f"NWPU-RESISC45/{name}/{name}_{i:03d}.jpg": jpeg_bytes(c * 3 + i)
        for c, name in enumerate(CLASS_NAMES)
        for i in range(1, 4)
    }
    return {
        "NWPU-RESISC45.zip": zip_bytes(members),
        "resisc45-train.txt": "\n".join(f"{n}_001.jpg\n{n}_002.jpg" for n in CLASS_NAMES).encode(),
        "resisc45-test.txt": "\n".join(f"{n}_003.jpg" for n in CLASS_NAMES).encode(),
    }


# name: (archives, checksum kind served, expected split sizes)
CASES = {
    "fgvc-aircraft": (aircraft_bodies, "sha256", {"train": 4, "test": 2}),
    "caltech101": (caltech_bodies, "md5", {"train": 161, "test": 41}),
    "dtd": (dtd_bodies, "both", {"train": 47, "test": 47}),
    "flowers102": (flowers_bodies, "both", {"train": 3, "test": 2}),
    "food101": (food_bodies, "both", {"train": 3, "test": 3}),
    "mnist": (mnist_bodies, "both", {"train": 6, "test": 3}),
    "sun397": (sun_bodies, "both", {"train": 16, "test": 4}),
    "patch-camelyon": (pcam_bodies, "md5", {"train": 6, "test": 4}),
    "resisc45": (resisc_bodies, "both", {"train": 90, "test": 45}),
}


@pytest.fixture
def server():
    running = DataServer()
    yield running
    running.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_prepare_from_the_real_layout(cli, data_root, server, monkeypatch, name):
    build, checksum, sizes = CASES[name]
    plugin = serve(server, monkeypatch, name, build(), checksum=checksum)
    result = cli("prepare", name, "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["splits"] == sizes and all("matches" in s["verified"] for s in summary["sources"])
    manifest = plugin.manifest(data_root)
    assert len(manifest.classes) == plugin.num_classes
    for split in ("train", "test"):
        samples = plugin.load(data_root, split)
        assert len(samples) == sizes[split] and samples.labels.max() < plugin.num_classes
        image = samples.image(len(samples) - 1)
        assert image.ndim >= 2 if isinstance(image, np.ndarray) else image.is_file()
    assert sorted(manifest.splits["train"]) == manifest.splits["train"]  # manifests are sorted listings


def test_derived_splits_are_recorded_and_repeatable(cli, data_root, server, monkeypatch):
    plugin = serve(server, monkeypatch, "sun397", sun_bodies(), checksum="both")
    first = cli("prepare", "sun397", "--json").json()["manifest_sha256"]
    manifest = plugin.manifest(data_root)
    split = manifest.extra["split"]
    assert split["seed"] == 42 and len(split["test_indices"]) == 4
    assert "apartment_building/outdoor" in manifest.classes
    assert cli("prepare", "sun397", "--force", "--json").json()["manifest_sha256"] == first
    caltech = serve(server, monkeypatch, "caltech101", caltech_bodies(), checksum="md5")
    assert cli("prepare", "caltech101").code == 0
    assert caltech.manifest(data_root).extra["split"]["ignored_folders"] == ["BACKGROUND_Google"]


def test_stanford_cars_is_a_verified_manual_import(cli, data_root, tmp_path, monkeypatch):
    message = one_line_error(cli("prepare", "stanford-cars"))
    assert "cars_train.tgz" in message and "ntkcl prepare stanford-cars --from" in message
    names = np.array([f"Make {c} Model" for c in range(196)], dtype=object)
    records = np.array([("00001.jpg", 3), ("00002.jpg", 196)], dtype=[("fname", "O"), ("class", "O")])
    test_records = np.array([("00001.jpg", 1)], dtype=[("fname", "O"), ("class", "O")])
    bodies = {
        "cars_train.tgz": tar_bytes({"cars_train/00001.jpg": jpeg_bytes(1), "cars_train/00002.jpg": jpeg_bytes(2)}),
        "cars_test.tgz": tar_bytes({"cars_test/00001.jpg": jpeg_bytes(3)}),
        "car_devkit.tgz": tar_bytes(
            {
                "devkit/cars_meta.mat": savemat_bytes(class_names=names),
                "devkit/cars_train_annos.mat": savemat_bytes(annotations=records),
            }
        ),
        "cars_test_annos_withlabels.mat": savemat_bytes(annotations=test_records),
    }
    folder = tmp_path / "cars"
    folder.mkdir()
    for file_name, data in bodies.items():
        (folder / file_name).write_bytes(data)
    plugin = get_dataset("stanford-cars")
    message = one_line_error(cli("prepare", "stanford-cars", "--from", folder))
    assert "failed verification" in message
    monkeypatch.setattr(plugin, "files", tuple(with_md5(r, bodies[r.name]) for r in plugin.files))
    result = cli("prepare", "stanford-cars", "--from", folder, "--json")
    assert result.code == 0, result.err
    manifest = plugin.manifest(data_root)
    assert manifest.classes[0] == "Make 0 Model"
    assert manifest.splits["train"] == [("cars_train/00001.jpg", 2), ("cars_train/00002.jpg", 195)]
    assert manifest.splits["test"] == [("cars_test/00001.jpg", 0)]

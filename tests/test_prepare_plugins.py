"""`ntkcl prepare` end to end for the nine benchmark plugins, against archives served on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from ntkcl.data.plugin import RemoteFile
from ntkcl.data.registry import get_dataset
from tests._dataserver import DataServer, cifar_tarball, image_tree, jpeg_bytes, tar_bytes, zip_bytes


@pytest.fixture
def server():
    running = DataServer()
    yield running
    running.close()


def one_line_error(result, code=2, logs=False):
    """The single error line; with `logs`, download progress lines may come before it."""
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.err, result.err
    if not logs:
        assert len(lines) == 1, result.err
    return errors[0]


def leftovers(root):
    """Everything under the data root except finished dataset folders' contents."""
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def serve(server, monkeypatch, name, bodies, checksum="md5"):
    """Point plugin `name` at `bodies` (file name -> bytes) on the local server."""
    plugin = get_dataset(name)
    files = tuple(server.remote(remote, bodies[remote.name], checksum) for remote in plugin.files)
    monkeypatch.setattr(plugin, "files", files)
    return plugin


def with_md5(remote: RemoteFile, data: bytes) -> RemoteFile:
    return replace(remote, md5=hashlib.md5(data).hexdigest(), sha256=None, size=None)


def test_cifar100_full_prepare_then_noop(cli, data_root, server, monkeypatch):
    classes = [f"class{c:03d}" for c in range(100)]
    plugin = serve(server, monkeypatch, "cifar100", {"cifar-100-python.tar.gz": cifar_tarball(classes)})
    result = cli("prepare", "cifar100", "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["splits"] == {"train": 300, "test": 100} and not summary["already_prepared"]
    assert summary["sources"][0]["verified"].startswith("md5 matches")
    train = plugin.load(data_root, "train")
    assert train.arrays.shape == (300, 32, 32, 3) and train.class_names == classes
    assert leftovers(data_root) == ["cifar100"]  # the download folder is gone
    requests = len(server.requests)
    again = cli("prepare", "cifar100", "--json")
    assert again.code == 0 and again.json()["already_prepared"]
    assert again.json()["manifest_sha256"] == summary["manifest_sha256"]
    assert len(server.requests) == requests


def test_prepare_resumes_a_dropped_download(cli, data_root, server, monkeypatch):
    body = cifar_tarball([f"c{c}" for c in range(100)], train_per_class=1, test_per_class=1)
    serve(server, monkeypatch, "cifar100", {"cifar-100-python.tar.gz": body})
    server.drop_after["/cifar-100-python.tar.gz"] = len(body) // 3
    monkeypatch.setattr("ntkcl.data.download.time.sleep", lambda seconds: None)
    result = cli("prepare", "cifar100", "--json")
    assert result.code == 0, result.err
    assert [spec for _, spec in server.requests] == [None, f"bytes={len(body) // 3}-"]
    assert "retry 1/5" in result.err


def test_wrong_checksum_fails_and_leaves_nothing(cli, data_root, server, monkeypatch):
    body = cifar_tarball([f"c{c}" for c in range(100)], 1, 1)
    plugin = serve(server, monkeypatch, "cifar100", {"cifar-100-python.tar.gz": body})
    monkeypatch.setattr(plugin, "files", (replace(plugin.files[0], md5="f" * 32),))
    message = one_line_error(cli("prepare", "cifar100"), code=1, logs=True)
    assert "failed verification" in message and "deleted the partial file" in message
    assert not list(data_root.rglob("*.partial")) and not (data_root / "cifar100").exists()


def test_path_traversal_member_refuses_the_archive(cli, data_root, server, monkeypatch):
    evil = tar_bytes({"imagenet-r/n01/a.jpg": jpeg_bytes(0), "../../escaped.txt": b"x"}, mode="w")
    serve(server, monkeypatch, "imagenet-r", {"imagenet-r.tar": evil}, checksum="both")
    message = one_line_error(cli("prepare", "imagenet-r"), logs=True)
    assert "refusing member '../../escaped.txt'" in message
    assert not (data_root / "imagenet-r").exists() and not list(data_root.parent.rglob("escaped.txt"))
    assert not [p for p in data_root.iterdir() if "staging" in p.name]


def test_truncated_archive_leaves_nothing(cli, data_root, tmp_path):
    data = zip_bytes(image_tree("kvasir-dataset-v2/", list(get_dataset("kvasir").class_names), 5))
    archive = tmp_path / "kvasir-dataset-v2.zip"
    archive.write_bytes(data[: len(data) // 2])
    message = one_line_error(cli("prepare", "kvasir", "--from", archive))
    assert "truncated" in message
    assert leftovers(data_root) == []


def test_imagenet_r_tarball_gets_the_deterministic_80_20_split(cli, data_root, server, monkeypatch):
    wnids = [f"n{i:08d}" for i in range(200)]
    members = {**image_tree("imagenet-r/", wnids, 3), "imagenet-r/README.txt": b"readme"}
    plugin = serve(server, monkeypatch, "imagenet-r", {"imagenet-r.tar": tar_bytes(members, mode="w")}, "both")
    result = cli("prepare", "imagenet-r", "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 480, "test": 120}
    manifest = plugin.manifest(data_root)
    assert manifest.classes == wnids and manifest.extra["split"]["seed"] == 0
    train = {path for path, _ in manifest.splits["train"]}
    assert not train & {path for path, _ in manifest.splits["test"]}
    first = manifest.sha256
    assert cli("prepare", "imagenet-r", "--force", "--json").json()["manifest_sha256"] == first


def test_manual_import_good_and_bad_md5(cli, data_root, tmp_path, monkeypatch):
    wnids = [f"n{i:08d}" for i in range(200)]
    data = zip_bytes({**image_tree("imagenet-a/train/", wnids, 2), **image_tree("imagenet-a/test/", wnids, 1, 7)})
    archive = tmp_path / "ina.zip"
    archive.write_bytes(data)
    plugin = get_dataset("imagenet-a")
    message = one_line_error(cli("prepare", "imagenet-a", "--from", archive))
    assert "failed verification" in message and "md5" in message and "7f4aaf0b" in message
    assert leftovers(data_root) == []
    monkeypatch.setattr(plugin, "files", (with_md5(plugin.files[0], data),))
    result = cli("prepare", "imagenet-a", "--from", archive, "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 400, "test": 200}
    assert result.json()["sources"][0]["verified"] == "md5 matches the published value"


def test_imagenet_r_author_zip_uses_its_folders(cli, data_root, tmp_path, monkeypatch):
    wnids = [f"n{i:08d}" for i in range(200)]
    data = zip_bytes({**image_tree("imagenet-r/train/", wnids, 2), **image_tree("imagenet-r/test/", wnids, 1, 5)})
    archive = tmp_path / "imagenet-r.zip"
    archive.write_bytes(data)
    plugin = get_dataset("imagenet-r")
    monkeypatch.setattr(plugin, "alternates", (with_md5(plugin.alternates[0], data),))
    result = cli("prepare", "imagenet-r", "--from", archive, "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 400, "test": 200}
    assert plugin.manifest(data_root).extra["split"]["recipe"].startswith("train/ and test/")


def test_vtab_author_zip(cli, data_root, tmp_path, monkeypatch):
    classes = [f"{d}_{c}" for d in ("a", "b", "c", "d", "e") for c in range(10)]
    data = zip_bytes({**image_tree("vtab/train/", classes, 2), **image_tree("vtab/test/", classes, 1, 9)})
    archive = tmp_path / "vtab.zip"
    archive.write_bytes(data)
    plugin = get_dataset("vtab")
    monkeypatch.setattr(plugin, "files", (with_md5(plugin.files[0], data),))
    assert cli("prepare", "vtab", "--from", archive).code == 0
    assert plugin.manifest(data_root).classes == classes


def test_oxford_pets_official_lists(cli, data_root, server, monkeypatch):
    from ntkcl.plugins.oxford_pets import CLASS_NAMES

    images, trainval, test = {}, ["#Image CLASS-ID SPECIES BREED ID"], []
    for label, breed in enumerate(CLASS_NAMES):
        for i in range(1, 4):
            images[f"images/{breed}_{i}.jpg"] = jpeg_bytes(label * 10 + i)
            (trainval if i < 3 else test).append(f"{breed}_{i} {label + 1} 1 1")
    annotations = {
        "annotations/trainval.txt": "\n".join(trainval).encode(),
        "annotations/test.txt": "\n".join(test).encode(),
    }
    bodies = {"images.tar.gz": tar_bytes(images), "annotations.tar.gz": tar_bytes(annotations)}
    plugin = serve(server, monkeypatch, "oxford-pets", bodies, checksum="both")
    result = cli("prepare", "oxford-pets", "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 74, "test": 37}
    samples = plugin.load(data_root, "test")
    names = [path.name for path in samples.paths]
    assert samples.class_names[0] == "Abyssinian" and samples.labels[names.index("american_bulldog_3.jpg")] == 1


def test_eurosat_split_is_recorded(cli, data_root, server, monkeypatch):
    from ntkcl.plugins.eurosat import CLASS_NAMES

    archive = zip_bytes(image_tree("2750/", list(CLASS_NAMES), 10))
    plugin = serve(server, monkeypatch, "eurosat", {"EuroSAT.zip": archive})
    result = cli("prepare", "eurosat", "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 80, "test": 20}
    split = plugin.manifest(data_root).extra["split"]
    assert split["seed"] == 42 and len(split["test_indices"]) == 20


def test_domainnet_labels_from_split_files(cli, data_root, server, monkeypatch):
    from ntkcl.plugins.domainnet import DOMAINS

    classes = sorted([f"class{c:03d}" for c in range(344)] + ["The_Eiffel_Tower"], key=str.lower)
    bodies = {}
    for d, domain in enumerate(DOMAINS):
        members, lines = {}, {"train": [], "test": []}
        for label, name in enumerate(classes):
            if (label + d) % 6:  # every domain holds some of the classes, together all of them
                continue
            for i, split in enumerate(("train", "train", "test")):
                path = f"{domain}/{name}/{domain}_{label:03d}_{i}.jpg"
                members[path] = jpeg_bytes(label + i)
                lines[split].append(f"{path} {label}")
        bodies[f"{domain}.zip"] = zip_bytes(members)
        for split in ("train", "test"):
            bodies[f"{domain}_{split}.txt"] = ("\n".join(lines[split]) + "\n").encode()
    plugin = serve(server, monkeypatch, "domainnet", bodies, checksum="sha256")
    result = cli("prepare", "domainnet", "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 690, "test": 345}
    manifest = plugin.manifest(data_root)
    assert manifest.classes == classes and manifest.classes.index("The_Eiffel_Tower") > 300


def test_kvasir_without_from_says_where_to_get_it(cli, data_root):
    message = one_line_error(cli("prepare", "kvasir"))
    assert "https://datasets.simula.no/downloads/kvasir/kvasir-dataset-v2.zip" in message
    assert "ntkcl prepare kvasir --from" in message
    assert leftovers(data_root) == []


def test_kvasir_zip_is_recorded_as_unverified(cli, data_root, tmp_path):
    classes = list(get_dataset("kvasir").class_names)
    archive = tmp_path / "kvasir-dataset-v2.zip"
    archive.write_bytes(zip_bytes(image_tree("kvasir-dataset-v2/", classes, 10)))
    result = cli("prepare", "kvasir", "--from", archive, "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 64, "test": 16}
    source = result.json()["sources"][0]
    assert source["verified"] == "unverified" and source["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert "could not be verified" in result.err


def test_plantvillage_folder_with_nested_duplicate(cli, data_root, tmp_path):
    classes = list(get_dataset("plantvillage").class_names)
    for relative, data in {
        **image_tree("PlantVillage/", classes, 5),
        **image_tree("PlantVillage/PlantVillage/", classes, 1),
    }.items():
        path = tmp_path / "import" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    result = cli("prepare", "plantvillage", "--from", tmp_path / "import", "--json")
    assert result.code == 0, result.err
    assert result.json()["splits"] == {"train": 60, "test": 15}
    extra = get_dataset("plantvillage").manifest(data_root).extra["split"]
    assert extra["ignored_folders"] == ["PlantVillage"] and extra["seed"] == 0


def test_full_disk_is_one_line_and_leaves_nothing(cli, data_root, tmp_path, monkeypatch):
    classes = list(get_dataset("kvasir").class_names)
    archive = tmp_path / "kvasir.zip"
    archive.write_bytes(zip_bytes(image_tree("", classes, 5)))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(data_root / ".kvasir.staging-1" / "x.jpg"))

    monkeypatch.setattr("ntkcl.data.folder.extract_archive", no_space)
    message = one_line_error(cli("prepare", "kvasir", "--from", archive))
    assert "no space left" in message
    assert leftovers(data_root) == []


def test_unwritable_root_is_one_line(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    archive = tmp_path / "kvasir.zip"
    archive.write_bytes(zip_bytes(image_tree("", list(get_dataset("kvasir").class_names), 5)))
    message = one_line_error(cli("prepare", "kvasir", "--from", archive, "--data-root", blocker / "data"))
    assert "data root" in message and "cannot be created" in message  # checked like train's data root


def test_unknown_dataset_and_missing_source(cli, data_root, tmp_path):
    assert "unknown dataset 'imagenet-z'" in one_line_error(cli("prepare", "imagenet-z"))
    assert "no such file" in one_line_error(cli("prepare", "kvasir", "--from", tmp_path / "absent.zip"))


def test_resize_cache_is_used_by_load(cli, data_root, tmp_path):
    classes = list(get_dataset("kvasir").class_names)
    source = tmp_path / "import"
    for c, name in enumerate(classes):
        (source / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (120, 90), (c * 20, i * 40, 0)).save(source / name / f"{i}.jpg")
    assert cli("prepare", "kvasir", "--from", source).code == 0
    assert cli("prepare", "kvasir", "--resize-cache", "48").code == 0
    samples = get_dataset("kvasir").load(data_root, "train")
    assert all("resized-48" in str(p) for p in samples.paths)
    with Image.open(samples.paths[0]) as image:
        assert min(image.size) == 48
    assert json.loads((data_root / "kvasir/resized-48/complete.json").read_text())["images"] == 40
    assert np.all(samples.labels >= 0)


def test_datasets_lists_status(cli, data_root, tmp_path):
    archive = tmp_path / "kvasir.zip"
    archive.write_bytes(zip_bytes(image_tree("", list(get_dataset("kvasir").class_names), 5)))
    assert cli("prepare", "kvasir", "--from", archive).code == 0
    rows = {row["name"]: row for row in cli("datasets", "--json").json()["datasets"]}
    assert rows["kvasir"]["status"] == "prepared" and rows["kvasir"]["prepared_bytes"] > 0
    assert rows["imagenet-a"]["status"] == "needs manual file"
    assert rows["cifar100"]["status"] == "not prepared" and rows["cifar100"]["download_bytes"] == 169_001_437

"""Safe extraction (traversal, absolute names, links out, truncation) and all-or-nothing folders."""

from __future__ import annotations

import tarfile

import pytest

from ntkcl.data.extract import DamagedArchiveError, UnsafeArchiveError, extract_archive
from ntkcl.files import FOLDER_MARKER, staged_folder
from tests._dataserver import tar_bytes, zip_bytes


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "members,extra",
    [
        ({"ok.txt": b"x", "../evil.txt": b"x"}, None),
        ({"ok.txt": b"x", "/tmp/evil.txt": b"x"}, None),
        ({"a/../../evil.txt": b"x"}, None),
        ({"ok.txt": b"x"}, [_link("escape", "../../etc/passwd")]),
        ({"ok.txt": b"x"}, [_link("absolute", "/etc/passwd")]),
        ({"ok.txt": b"x"}, [_link("hard", "../outside", tarfile.LNKTYPE)]),
    ],
)
def test_tar_members_outside_the_target_are_refused(tmp_path, members, extra):
    archive = _write(tmp_path, "bad.tar.gz", tar_bytes(members, extra=extra))
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        extract_archive(archive, target)
    assert not any(target.iterdir())
    assert not (tmp_path / "evil.txt").exists()


def test_zip_traversal_is_refused(tmp_path):
    archive = _write(tmp_path, "bad.zip", zip_bytes({"fine.txt": b"x", "../evil.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_links_inside_the_target_are_fine(tmp_path):
    archive = _write(tmp_path, "ok.tar", tar_bytes({"d/a.txt": b"a"}, mode="w", extra=[_link("d/b.txt", "a.txt")]))
    extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out/d/b.txt").read_bytes() == b"a"


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_truncated_archive_is_reported(tmp_path, kind):
    members = {f"f{i}.bin": bytes(range(256)) * 40 for i in range(20)}
    data = tar_bytes(members) if kind == "tar.gz" else zip_bytes(members)
    archive = _write(tmp_path, f"cut.{kind}", data[: len(data) // 2])
    with pytest.raises(DamagedArchiveError, match="damaged|truncated"):
        extract_archive(archive, tmp_path / "out")


def test_staged_folder_is_all_or_nothing(tmp_path):
    final = tmp_path / "dataset"
    with pytest.raises(RuntimeError), staged_folder(final, "dataset") as stage:
        (stage / "half.txt").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with staged_folder(final, "dataset") as stage:
        (stage / "done.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]
    with staged_folder(final, "dataset") as stage:
        (stage / "new.txt").write_text("y")
    assert sorted(p.name for p in final.iterdir()) == [FOLDER_MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_extraction_without_tarfile_filters(tmp_path, monkeypatch):
    """Python 3.10 before 3.10.12 has no extraction filters: the member checks alone keep extraction safe."""
    original = tarfile.TarFile.extractall

    def extractall_without_filter(self, path=".", members=None, *, numeric_owner=False):
        return original(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall_without_filter)
    good = _write(tmp_path, "ok.tar", tar_bytes({"d/a.txt": b"a"}, mode="w", extra=[_link("d/b.txt", "a.txt")]))
    extract_archive(good, tmp_path / "out")
    assert (tmp_path / "out/d/b.txt").read_bytes() == b"a"
    bad = _write(tmp_path, "bad.tar.gz", tar_bytes({"ok.txt": b"x"}, extra=[_link("escape", "../../etc/passwd")]))
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        extract_archive(bad, tmp_path / "bad")

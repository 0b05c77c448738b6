"""Staged folders replace only a folder of their own kind and refuse every other existing path untouched.

Every special file is made inside the test's temporary folder; nothing outside it is touched.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from ntkcl.errors import BadInputError
from ntkcl.files import FOLDER_MARKER, read_marker, remove_interrupted_writes, staged_folder, verify_checksums


def _fifo(path):
    os.mkfifo(path)


def _socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays


def _file(path):
    path.write_text("precious")


def _link_to_file(path):
    target = path.parent / "target.txt"
    target.write_text("precious")
    path.symlink_to(target)


def _link_to_folder(path):
    target = path.parent / "target"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    path.symlink_to(target, target_is_directory=True)


def _link_to_own_folder(path):
    """Even a link to a folder of the right kind is refused: the routine never follows links."""
    target = path.parent / "target"
    with staged_folder(target, "export") as stage:
        (stage / "a.txt").write_text("old")
    path.symlink_to(target, target_is_directory=True)


def _dangling_link(path):
    path.symlink_to(path.parent / "nowhere")


def _foreign_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("precious")


def _other_kind(path):
    with staged_folder(path, "checkpoint") as stage:
        (stage / "a.txt").write_text("old")


def _character_device(path):
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a null device, inside the temporary folder


EXISTING = {
    "fifo": _fifo,
    "socket": _socket,
    "file": _file,
    "symlink to a file": _link_to_file,
    "symlink to a folder": _link_to_folder,
    "symlink to an own folder": _link_to_own_folder,
    "dangling symlink": _dangling_link,
    "foreign folder": _foreign_folder,
    "folder of another kind": _other_kind,
    "character device": _character_device,
}


def _snapshot(folder):
    """Every entry under `folder` (links and special files as they are, never followed) with its type and content."""
    state = {}
    for parent, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            content = None
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = Path(path).read_bytes()
            state[os.path.relpath(path, folder)] = (stat.S_IFMT(info.st_mode), info.st_ino, content)
    return state


@pytest.mark.parametrize("kind", sorted(EXISTING))
def test_every_other_existing_path_is_refused_and_left_untouched(tmp_path, kind):
    target = tmp_path / "out"
    EXISTING[kind](target)
    before = _snapshot(tmp_path)
    entered = False
    with pytest.raises(BadInputError, match="refusing to replace") as error, staged_folder(target, "export") as stage:
        entered = True
        (stage / "a.txt").write_text("new")
    assert not entered  # refused before anything was written
    assert "\n" not in str(error.value)
    assert _snapshot(tmp_path) == before


def test_a_folder_of_its_own_kind_is_replaced_and_its_files_recorded(tmp_path):
    target = tmp_path / "out"
    with staged_folder(target, "export") as stage:
        (stage / "a.txt").write_text("old")
    with staged_folder(target, "export") as stage:
        (stage / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [FOLDER_MARKER, "b.txt"]
    assert read_marker(target)["kind"] == "export"
    assert verify_checksums(target) == []
    (target / "b.txt").write_text("edited")
    assert verify_checksums(target) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_taken_over_and_a_legacy_folder_recognised(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_folder(empty, "export") as stage:
        (stage / "a.txt").write_text("new")
    assert (empty / "a.txt").read_text() == "new"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text("{}")
    with staged_folder(legacy, "dataset", lambda folder: (folder / "manifest.json").is_file()) as stage:
        (stage / "manifest.json").write_text(json.dumps({"new": True}))
    assert json.loads((legacy / "manifest.json").read_text()) == {"new": True}


def test_a_path_that_changes_kind_while_building_is_refused_at_the_rename(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(BadInputError, match="FIFO"), staged_folder(target, "export") as stage:
        (stage / "a.txt").write_text("new")
        os.mkfifo(target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder is gone


def test_cleanup_of_killed_writes_never_follows_or_deletes_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".task-00.staging-1").symlink_to(outside, target_is_directory=True)
    (run / ".metrics.json.tmp-1").write_text("{")
    removed = remove_interrupted_writes(run)
    assert [path.name for path in removed] == [".metrics.json.tmp-1"]
    assert (outside / "keep.txt").read_text() == "precious"
    assert (run / ".task-00.staging-1").is_symlink()


def test_export_refuses_a_fifo_without_blocking(cli, run_of, tmp_path):
    from tests.test_cli_bad_input import assert_one_line_error

    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    assert_one_line_error(cli("export", run_of("simplecil"), "--out", fifo), "is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

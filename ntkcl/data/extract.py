"""Safe archive extraction and all-or-nothing folder creation.

Every member of a tar or zip archive is checked before anything is written: absolute names, `..`
components, links whose target leaves the destination, and device or fifo members refuse the whole
archive. Extraction goes into a `ntkcl.files.staged_folder`, so an interrupted prepare never leaves a folder
that looks ready.
"""

from __future__ import annotations

import contextlib
import errno
import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from ntkcl.errors import BadInputError

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class UnsafeArchiveError(BadInputError):
    """An archive member would be written outside the destination."""


class DamagedArchiveError(BadInputError):
    """The archive is truncated or not an archive at all."""


def _inside(name: str) -> bool:
    """True when the archive path `name` stays inside the destination once joined to it."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    normalised = posixpath.normpath(name.replace("\\", "/"))
    return normalised != ".." and not normalised.startswith("../")


def _check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    if not _inside(member.name):
        raise UnsafeArchiveError(f"{archive.name}: refusing member {member.name!r} (outside the target folder)")
    if member.issym():
        target = posixpath.join(posixpath.dirname(member.name), member.linkname)
        if member.linkname.startswith("/") or not _inside(target):
            raise UnsafeArchiveError(
                f"{archive.name}: refusing link {member.name!r} -> {member.linkname!r} (points outside the target folder)"
            )
    elif member.islnk():
        if not _inside(member.linkname):
            raise UnsafeArchiveError(
                f"{archive.name}: refusing hard link {member.name!r} -> {member.linkname!r} (points outside the target folder)"
            )
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{archive.name}: refusing special member {member.name!r} (device or fifo)")


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def extraction_filter() -> dict:
    """`filter="data"` where `tarfile` has extraction filters (Python 3.10.12+, 3.11.4+); older 3.10 and 3.11
    releases lack the argument, and the member checks above are what keeps extraction inside the target."""
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def extract_archive(archive: Path, destination: Path) -> None:
    """Extract a tar (any compression) or zip archive into `destination` after checking every member.

    Raises:
        UnsafeArchiveError: a member would land outside `destination`; nothing is extracted.
        DamagedArchiveError: the archive is truncated or unreadable.
    """
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                members = bundle.infolist()
                for info in members:
                    if not _inside(info.filename):
                        raise UnsafeArchiveError(
                            f"{archive.name}: refusing member {info.filename!r} (outside the target folder)"
                        )
                    if _zip_is_symlink(info):
                        raise UnsafeArchiveError(f"{archive.name}: refusing symbolic link member {info.filename!r}")
                bundle.extractall(destination)
            return
        if not tarfile.is_tarfile(archive):
            raise DamagedArchiveError(f"{archive} is not a tar or zip archive (or is truncated)")
        with tarfile.open(archive) as bundle:
            members = bundle.getmembers()
            for member in members:
                _check_tar_member(member, archive)
            bundle.extractall(destination, members=members, **extraction_filter())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DamagedArchiveError(f"{archive} is damaged or truncated ({error})") from error


@contextlib.contextmanager
def disk_errors(root: Path) -> Iterator[None]:
    """Turn "disk full" and "not writable" errors under `root` into a one-line BadInputError."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        reason = (
            "no space left on the device" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "not a writable folder"
        )
        where = error.filename or root
        raise BadInputError(f"data root {root}: {reason} ({where}); nothing was left half-written") from error

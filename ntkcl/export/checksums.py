"""`checksums.sha256`: the sha256 of an export's files, written with them and verified wherever they are read.

The file has the `sha256sum` format (`<hex>  <name>` per line), so `sha256sum -c checksums.sha256` checks an
export by hand too. It covers every export file but the model card, which the Hub lets a repo's owner edit
(and `ntkcl export --hub` keeps such an edit). Exports older than format 3 have no such file: they are read
unverified, as they were written.
"""

from __future__ import annotations

import re
from pathlib import Path

from ntkcl.errors import BadInputError
from ntkcl.export.constants import CHECKED_FILES, CHECKSUMS_FORMAT, CHECKSUMS_NAME, export_path
from ntkcl.files import atomic_write_text, sha256_file

_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S+)")


def _checked_names(folder: Path) -> list[str]:
    """The checked files' names in `folder` (an export from before format 4 has two of them by older names)."""
    return [export_path(folder, name).name for name in CHECKED_FILES]


def write_checksums(folder: Path) -> None:
    """Record the sha256 of the checked files of the export in `folder`."""
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in sorted(_checked_names(folder))]
    atomic_write_text(folder / CHECKSUMS_NAME, "".join(lines))


def read_checksums(folder: Path) -> dict[str, str]:
    """The recorded sha256 of each checked file; BadInputError when the file is damaged."""
    path = folder / CHECKSUMS_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path} cannot be read: {getattr(error, 'strerror', None) or error}") from error
    recorded = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise BadInputError(f"{path} line {number} is not `<sha256>  <file>`; the export is damaged")
        recorded[match.group(2)] = match.group(1)
    missing = sorted(set(_checked_names(folder)) - set(recorded))
    if missing:
        raise BadInputError(f"{path} records no sha256 for {', '.join(missing)}; the export is damaged")
    return recorded


def verify_export(folder: Path, export_format: int) -> None:
    """Check every checked file of the export against `checksums.sha256` (one line naming the first mismatch).

    Args:
        folder: the export folder.
        export_format: its ntkcl_config.json's `export_format`; formats before 3 carry no checksums.
    """
    if export_format < CHECKSUMS_FORMAT:
        return
    if not (folder / CHECKSUMS_NAME).is_file():
        raise BadInputError(f"{folder} lacks {CHECKSUMS_NAME} (export format {export_format}); the export is damaged")
    for name, digest in read_checksums(folder).items():
        if name not in _checked_names(folder):
            continue
        path = folder / name
        if not path.is_file():
            raise BadInputError(f"{path} is missing or not a file; the export is damaged, export the run again")
        if sha256_file(path) != digest:
            raise BadInputError(
                f"{path} does not match the sha256 recorded in {CHECKSUMS_NAME} (damaged or edited); "
                "export the run again"
            )

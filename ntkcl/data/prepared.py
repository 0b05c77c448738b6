"""The shared `prepare` of file-based datasets: obtain, verify, lay out in a staging folder, manifest, rename.

A plugin built on `PreparedDataset` declares its files (`files`: what a plain `ntkcl prepare NAME` fetches,
or the manual file it asks for; `alternates`: other files `--from` accepts, such as an author's split zip)
and implements `build`, which turns the verified inputs into split rows inside the staging folder. This
class does everything else, the same way for every dataset:

- no `--from`: download every file (see `ntkcl.data.download`), or exit 2 with where to get a manual file;
- `--from FILE`: identify the file by checksum or name, verify it (md5/sha256 where published; otherwise
  record its sha256 and say it is unverified);
- `--from DIR`: a folder holding the archives by name, or (where `accepts_image_folder`) a folder of images;
- lay out in `<root>/.<name>.staging-<pid>` and rename to `<root>/<name>` only when the manifest is written;
- a full disk or unwritable root is one line and exit 2, with the staging folder removed.

Downloads go to `<root>/.downloads/<name>/` and are deleted after a successful prepare unless
`keep_downloads` is set (they are reused by a later prepare while they are there).
"""

from __future__ import annotations

import contextlib
import shutil
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntkcl.data.download import download, file_digests, mismatch, verification_record
from ntkcl.data.extract import disk_errors
from ntkcl.data.manifest import Manifest, read_manifest, staged_dataset_folder, write_manifest
from ntkcl.data.plugin import DatasetPlugin, RemoteFile, Samples
from ntkcl.data.resize_cache import find_cache, write_resize_cache
from ntkcl.errors import BadInputError
from ntkcl.files import expand_user

DOWNLOADS_DIR = ".downloads"


@dataclass
class Inputs:
    """Verified inputs of one prepare: archives by file name, or a folder of images."""

    archives: dict[str, Path] = field(default_factory=dict)
    folder: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        return set(self.archives)


@dataclass
class Layout:
    """What `build` returns: class names in base-label order, split rows, and notes for the manifest."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    extra: dict[str, Any] = field(default_factory=dict)


class PreparedDataset(DatasetPlugin):
    """Base of the file-based dataset plugins (see the module docstring).

    Attributes:
        alternates: further files `--from` accepts (e.g. an author's split archive); `build` sees which
            one it got through `Inputs.archives`.
        accepts_image_folder: `--from DIR` may be a folder of class sub-folders (with or without
            `train/` and `test/`), imported as ImageFolder data.
        obtain_hint: where to get the data, for the message of a manual dataset run without `--from`.
    """

    alternates: tuple[RemoteFile, ...] = ()
    accepts_image_folder: bool = False
    obtain_hint: str = ""

    @property
    def accepted(self) -> tuple[RemoteFile, ...]:
        return tuple(self.files) + tuple(self.alternates)

    @abstractmethod
    def build(self, stage: Path, inputs: Inputs) -> Layout:
        """Lay the inputs out inside `stage` (the future dataset folder) and return the splits."""

    def manual_message(self) -> str:
        manual = [remote for remote in self.files if remote.manual]
        wanted = manual[0] if manual else self.files[0]
        checksum = f" ({wanted.checksum_kind} {wanted.md5 or wanted.sha256})" if wanted.checksum_kind != "none" else ""
        return (
            f"{self.name} needs a file you download yourself: {wanted.name}{checksum}. {self.obtain_hint} "
            f"Then run: ntkcl prepare {self.name} --from /path/to/{wanted.name}"
        )

    def prepare(
        self,
        root: Path,
        source: Path | None = None,
        force: bool = False,
        keep_downloads: bool = False,
        resize_cache: int | None = None,
    ) -> Manifest:
        """See `DatasetPlugin.prepare`; `resize_cache` also writes `ntkcl.data.resize_cache` copies."""
        root = Path(root)
        folder = self.dataset_dir(root)
        with disk_errors(root):
            root.mkdir(parents=True, exist_ok=True)
            if self.is_prepared(root) and not force:
                manifest = self.verify_prepared(root)
            else:
                inputs, downloaded = self.obtain(root, source)
                with staged_dataset_folder(folder) as stage:
                    layout = self.build(stage, inputs)
                    manifest = write_manifest(
                        stage, self.name, layout.classes, layout.splits, inputs.records, layout.extra
                    )
                if downloaded is not None and not keep_downloads:
                    shutil.rmtree(downloaded, ignore_errors=True)
                    with contextlib.suppress(OSError):
                        downloaded.parent.rmdir()  # only when no other dataset's downloads are kept there
                manifest = read_manifest(folder)
            if resize_cache:
                write_resize_cache(folder, manifest, resize_cache)
        return manifest

    def load(self, root: Path, split: str) -> Samples:
        """Samples of `split`; paths point into the resize cache when `prepare --resize-cache` wrote one."""
        samples = super().load(root, split)
        cache = find_cache(self.dataset_dir(root))
        if cache is not None and samples.paths is not None:
            folder = self.dataset_dir(root)
            samples.paths = [cache / path.relative_to(folder) for path in samples.paths]
        return samples

    def verify_prepared(self, root: Path) -> Manifest:
        """The manifest, after checking its split files' sha256 and that every listed file exists."""
        folder = self.dataset_dir(root)
        manifest = read_manifest(folder)
        files = {relative.split("#", 1)[0] for rows in manifest.splits.values() for relative, _ in rows}
        missing = sorted(name for name in files if not (folder / name).is_file())
        if missing:
            raise BadInputError(
                f"{folder} lacks {len(missing)} file(s) its manifest lists (e.g. {missing[0]}); "
                f"run `ntkcl prepare {self.name} --force`"
            )
        return manifest

    # -- obtaining inputs -------------------------------------------------------------------------------------

    def obtain(self, root: Path, source: Path | None) -> tuple[Inputs, Path | None]:
        """(verified inputs, the download folder to clean up afterwards or None)."""
        if source is None:
            if any(remote.manual for remote in self.files):
                raise BadInputError(self.manual_message())
            directory = root / DOWNLOADS_DIR / self.name
            inputs = Inputs()
            for remote in self.files:
                path, record = download(remote, directory, self.name)
                inputs.archives[remote.name] = path
                inputs.records.append(record)
            return inputs, directory
        source = expand_user(source)
        if source.is_file():
            return self._from_file(source), None
        if source.is_dir():
            return self._from_directory(source), None
        raise BadInputError(f"--from {source}: no such file or folder")

    def _verify_local(self, remote: RemoteFile, path: Path, digests=None) -> dict[str, Any]:
        digests = digests or file_digests(path)
        problem = mismatch(remote, digests)
        if problem:
            raise BadInputError(f"{path} failed verification as {remote.name} ({problem}); nothing was prepared")
        return verification_record(remote, digests, str(path))

    def _from_file(self, path: Path) -> Inputs:
        needed = [remote for remote in self.files if not remote.manual]
        if len(needed) > 1 and not self.alternates:
            names = ", ".join(remote.name for remote in needed)
            raise BadInputError(f"{self.name} needs {len(needed)} files ({names}); pass the folder that holds them")
        digests = file_digests(path)
        candidates = [r for r in self.accepted if len(self.files) == 1 or r in self.alternates]
        chosen = next(
            (r for r in candidates if (r.md5 and r.md5 == digests.md5) or (r.sha256 and r.sha256 == digests.sha256)),
            None,
        )
        if chosen is None:
            chosen = next((r for r in candidates if r.name == path.name), None)
        if chosen is None:
            same_kind = [r for r in candidates if _archive_kind(r.name) == _archive_kind(path.name)]
            chosen = same_kind[0] if len(same_kind) == 1 else None
        if chosen is None:
            names = " or ".join(r.name for r in candidates)
            raise BadInputError(f"--from {path}: not a file {self.name} knows (expected {names})")
        record = self._verify_local(chosen, path, digests)
        return Inputs(archives={chosen.name: path}, records=[record])

    def _from_directory(self, directory: Path) -> Inputs:
        present = {
            remote.name: directory / remote.name for remote in self.accepted if (directory / remote.name).is_file()
        }
        complete = [r for r in self.files if r.name in present]
        if complete and len(complete) == len(self.files):
            chosen = list(self.files)
        else:
            alternates = [r for r in self.alternates if r.name in present]
            chosen = alternates[:1]
        if chosen:
            inputs = Inputs()
            for remote in chosen:
                inputs.archives[remote.name] = present[remote.name]
                inputs.records.append(self._verify_local(remote, present[remote.name]))
            return inputs
        if self.accepts_image_folder:
            return Inputs(
                folder=directory, records=[{"origin": str(directory), "verified": "unverified (folder import)"}]
            )
        names = ", ".join(remote.name for remote in self.accepted)
        raise BadInputError(f"--from {directory}: holds none of the files {self.name} needs ({names})")


def require_listed_files(stage: Path, rows: list[tuple[str, int]], source: str) -> None:
    """A one-line BadInputError when a split lists files that the extracted `source` does not hold."""
    missing = [path for path, _ in rows if not (stage / path).is_file()]
    if missing:
        raise BadInputError(f"{source} lacks {len(missing)} listed image(s), e.g. {missing[0]}")


def read_mat(path: Path, key: str):
    """Variable `key` of a MATLAB file, squeezed (scipy); a one-line BadInputError when it cannot be read."""
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=True)[key]
    except (ValueError, KeyError, OSError) as error:
        raise BadInputError(f"{path.name} has no readable {key!r} ({error})") from error


def _archive_kind(name: str) -> str:
    lowered = name.lower()
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip", ".txt"):
        if lowered.endswith(suffix):
            return suffix
    return Path(lowered).suffix

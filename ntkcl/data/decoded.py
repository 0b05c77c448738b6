"""A split decoded once into uint8 RGB pixels, for the batched transforms of `ntkcl.data.batched_transforms`.

Array datasets (CIFAR-100, digits, synthetic) are used as they are, a memory map included (grey ones are
expanded to RGB per batch). File datasets are decoded
once into `<dataset>/decoded-<S>/<split>.u8`, a flat uint8 file read through a memory map, with each
image's shape and offset beside it; a `complete` marker written last makes it usable, and the list of files
it was made from is fingerprinted, so another selection of files is decoded again.

Images whose shorter side exceeds S are stored after torchvision's `Resize(S, bicubic)`, the first step of
the test transform (S = 256 for 224-pixel models), so the test path from the cache equals the one from the
originals exactly. As with `prepare --resize-cache`, training crops of large images are then taken from
that copy rather than from the full-resolution file (softer for crops of a small region of a large image).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from ntkcl.data.plugin import Samples
from ntkcl.files import atomic_write_text

COMPLETE_FILE = "complete.json"


def decoded_dir(dataset_dir: Path, shorter_side: int) -> Path:
    return Path(dataset_dir) / f"decoded-{shorter_side}"


def rgb_pixels(image: Image.Image, shorter_side: int | None) -> np.ndarray:
    """(H, W, 3) uint8 of `image` as the per-image path sees it: RGB, shrunk by `Resize(shorter_side)` when larger."""
    image = image.convert("RGB")
    if shorter_side is not None and min(image.size) > shorter_side:
        image = TF.resize(image, shorter_side, interpolation=TF.InterpolationMode.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _decode_file(job: tuple[str, int | None]) -> np.ndarray:
    path, shorter_side = job
    with Image.open(path) as opened:
        return rgb_pixels(opened, shorter_side)


@dataclass
class DecodedImages:
    """uint8 images of one split: one flat buffer plus each image's (height, width) and start offset.

    `gather` returns a batch of RGB images zero-padded to its largest image together with the true sizes,
    the input the batched transforms take. Grey array datasets keep one channel (`channels`) and are
    expanded to RGB per batch, as PIL's conversion does.
    """

    pixels: np.ndarray
    shapes: np.ndarray  # (N, 2) int64
    offsets: np.ndarray  # (N,) int64
    channels: int = 3

    def __post_init__(self) -> None:
        first = self.shapes[0] if len(self.shapes) else np.zeros(2, dtype=np.int64)
        uniform = bool((self.shapes == first).all())
        # equal sizes (array datasets): a 4-D view makes a batch one fancy-indexing copy
        dense_shape = (len(self.shapes), int(first[0]), int(first[1]), self.channels)
        self._dense = self.pixels.reshape(dense_shape) if uniform else None
        if self._dense is None and self.channels != 3:
            raise ValueError("images of different sizes are stored as RGB")

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.size)

    @classmethod
    def from_arrays(cls, arrays: np.ndarray) -> DecodedImages:
        """N x H x W x 3 and grey N x H x W uint8 arrays as they are (a memory map stays one); others (RGBA,
        other dtypes, images of different sizes) through PIL's RGB conversion, in memory."""
        rgb = arrays.ndim == 4 and arrays.shape[3] == 3
        if arrays.dtype != np.uint8 or not (rgb or arrays.ndim == 3):
            return cls.from_images([rgb_pixels(Image.fromarray(array), None) for array in arrays])
        count, height, width = arrays.shape[:3]
        channels = 3 if rgb else 1
        shapes = np.tile(np.array([height, width], dtype=np.int64), (count, 1))
        offsets = np.arange(count, dtype=np.int64) * height * width * channels
        return cls(np.ascontiguousarray(arrays).reshape(-1), shapes, offsets, channels)

    @classmethod
    def from_images(cls, images: list[np.ndarray]) -> DecodedImages:
        """(H, W, 3) uint8 images of any sizes, copied into one buffer in memory."""
        shapes = np.array([image.shape[:2] for image in images], dtype=np.int64).reshape(-1, 2)
        sizes = np.array([image.size for image in images], dtype=np.int64)
        offsets = (np.cumsum(sizes) - sizes).astype(np.int64)
        pixels = np.concatenate([image.reshape(-1) for image in images]) if images else np.zeros(0, np.uint8)
        return cls(pixels, shapes, offsets)

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, 3) uint8 images zero-padded to the batch's largest, and (B, 2) int64 (height, width)."""
        indices = np.asarray(indices, dtype=np.int64)
        shapes = self.shapes[indices]
        if self._dense is not None:
            batch = self._dense[indices]
            if self.channels == 1:
                batch = np.repeat(batch, 3, axis=3)
            return torch.from_numpy(batch), torch.from_numpy(shapes)
        height, width = (int(v) for v in shapes.max(axis=0)) if len(indices) else (0, 0)
        batch = np.zeros((len(indices), height, width, 3), dtype=np.uint8)
        for row, (index, (h, w)) in enumerate(zip(indices, shapes, strict=True)):
            start = self.offsets[index]
            batch[row, :h, :w] = self.pixels[start : start + h * w * 3].reshape(h, w, 3)
        return torch.from_numpy(batch), torch.from_numpy(shapes)


def files_fingerprint(paths: list[Path], shorter_side: int | None) -> str:
    """Identifies the decoded content: the resize, and every file's path, size and modification time."""
    digest = hashlib.sha256(f"shorter_side={shorter_side}\n".encode())
    for path in paths:
        status = os.stat(path)
        digest.update(f"{path}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(folder: Path, split: str, fingerprint: str) -> DecodedImages | None:
    marker = folder / COMPLETE_FILE
    if not marker.is_file():
        return None
    if json.loads(marker.read_text(encoding="utf-8")).get(split) != fingerprint:
        return None
    index = np.load(folder / f"{split}.index.npz")
    size = int(index["size"])
    pixels = (
        np.memmap(folder / f"{split}.u8", dtype=np.uint8, mode="r", shape=(size,)) if size else np.zeros(0, np.uint8)
    )
    return DecodedImages(pixels, index["shapes"], index["offsets"])


def _write_cache(folder: Path, split: str, fingerprint: str, paths: list[Path], shorter_side, workers: int) -> None:
    """Decode `paths` into `<folder>/<split>.u8` (via a temporary name) and record them as complete."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{split}.u8.tmp-{os.getpid()}"
    shapes = np.zeros((len(paths), 2), dtype=np.int64)
    offsets = np.zeros(len(paths), dtype=np.int64)
    jobs = [(str(path), shorter_side) for path in paths]
    try:
        with open(staging, "wb") as handle:
            if workers > 1 and len(jobs) > 64:
                with ProcessPoolExecutor(workers) as pool:
                    decoded = pool.map(_decode_file, jobs, chunksize=32)
                    size = _append_all(handle, decoded, shapes, offsets)
            else:
                size = _append_all(handle, map(_decode_file, jobs), shapes, offsets)
        np.savez(folder / f"{split}.index.npz", shapes=shapes, offsets=offsets, size=np.int64(size))
        os.replace(staging, folder / f"{split}.u8")
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    marker = folder / COMPLETE_FILE
    done = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    atomic_write_text(marker, json.dumps({**done, split: fingerprint}, indent=2) + "\n")


def _append_all(handle, images, shapes: np.ndarray, offsets: np.ndarray) -> int:
    position = 0
    for row, pixels in enumerate(images):
        shapes[row] = pixels.shape[:2]
        offsets[row] = position
        handle.write(pixels.tobytes())
        position += pixels.size
    return position


def decode_split(
    samples: Samples,
    split: str,
    shorter_side: int | None,
    cache_folder: Path | None,
    workers: int = 1,
    write: bool = True,
) -> DecodedImages:
    """The split's images decoded once (see the module docstring).

    Args:
        samples: the split (arrays or files).
        split: its name, the cache's file name.
        shorter_side: shrink larger images with the test transform's Resize(shorter_side); None keeps sizes.
            Array datasets are kept as they are unless an image is larger than that.
        cache_folder: where file datasets keep their decoded copy (`decoded_dir`); None decodes in memory.
        workers: decoding processes for file datasets.
        write: whether this process may write the cache (rank 0 in a group); others wait and read it.
    """
    if samples.paths is not None and samples.arrays is not None:  # a composite of file and array datasets
        return DecodedImages.from_images([_decode_sample(samples.image(i), shorter_side) for i in range(len(samples))])
    if samples.arrays is not None:
        arrays = samples.arrays
        if shorter_side is not None and arrays.ndim >= 3 and min(arrays.shape[1:3]) > shorter_side:
            arrays = np.stack([rgb_pixels(Image.fromarray(array), shorter_side) for array in arrays])
        return DecodedImages.from_arrays(arrays)
    paths = list(samples.paths)
    if cache_folder is None:
        return _in_memory(paths, shorter_side)
    fingerprint = files_fingerprint(paths, shorter_side)
    cached = _read_cache(cache_folder, split, fingerprint)
    if cached is None and write:
        _write_cache(cache_folder, split, fingerprint, paths, shorter_side, workers)
        cached = _read_cache(cache_folder, split, fingerprint)
    if cached is None:
        raise RuntimeError(f"the decoded cache {cache_folder} of split {split!r} is missing or stale")
    return cached


def _in_memory(paths: list[Path], shorter_side: int | None) -> DecodedImages:
    return DecodedImages.from_images([_decode_file((str(path), shorter_side)) for path in paths])


def _decode_sample(source: Path | np.ndarray, shorter_side: int | None) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return rgb_pixels(Image.fromarray(source), shorter_side)
    return _decode_file((str(source), shorter_side))

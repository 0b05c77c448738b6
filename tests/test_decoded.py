"""The uint8 cache of a split (`ntkcl.data.decoded`): decoded once, shrunk like the test resize, refreshed."""

import os

import numpy as np
from PIL import Image

from ntkcl.data.decoded import decode_split
from ntkcl.data.plugin import Samples
from ntkcl.data.transforms import build_transforms


def image_files(folder, shapes):
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate(shapes):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_file_split_is_decoded_once_shrunk_like_the_test_resize_and_refreshed_when_a_file_changes(tmp_path):
    paths = image_files(tmp_path, [(20, 30), (90, 60), (18, 18)])
    samples = Samples(labels=[0, 1, 2], paths=paths)
    cache = tmp_path / "decoded-24"
    decoded = decode_split(samples, "train", 24, cache)
    assert decoded.shapes.tolist() == [[20, 30], [36, 24], [18, 18]]  # Resize(24): int(24 * 90 / 60) = 36
    pixels, sizes = decoded.gather(np.array([2, 1]))
    assert pixels.shape == (2, 36, 24, 3) and sizes.tolist() == [[18, 18], [36, 24]]
    assert pixels[0, 18:].sum() == 0 and pixels[0, :, 18:].sum() == 0  # zero padding
    with Image.open(paths[1]) as opened:
        shrunk = np.asarray(build_transforms("paper", 21)[1].transforms[0](opened.convert("RGB")))
    assert np.array_equal(pixels[1].numpy(), shrunk)
    written = (cache / "train.u8").stat().st_mtime_ns
    assert decode_split(samples, "train", 24, cache).shapes.tolist() == decoded.shapes.tolist()
    assert (cache / "train.u8").stat().st_mtime_ns == written  # read back, not decoded again
    Image.new("RGB", (10, 12)).save(paths[0])
    os.utime(paths[0], ns=(written + 10**9, written + 10**9))
    assert decode_split(samples, "train", 24, cache).shapes[0].tolist() == [12, 10]

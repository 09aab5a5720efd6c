"""A scan file reaches a model at inference (load_scan) exactly as a prepared dataset holds it, for every format:
a model sees a file as it saw the images it was trained and evaluated on."""

from __future__ import annotations

import numpy as np
import pytest

from medvl.data.mimic import prepare_mimic
from medvl.data.prepared import from_uint8, read_index
from medvl.data.scans import load_scan
from medvl.data.testing import synthetic_chest, write_mimic_tree


@pytest.mark.parametrize("fmt", ["jpg", "dcm", "mixed"])
def test_load_scan_gives_the_prepared_image(tmp_path, fmt):
    # 640 x 560 JPGs: decoded at a quarter of their size for 128 px, as prepare decodes them
    spec = write_mimic_tree(tmp_path / "tree", image_format=fmt, shape=(640, 560))
    prepare_mimic(spec.root, tmp_path / "out", size=128)
    index = read_index(tmp_path / "out")
    images = np.load(tmp_path / "out" / "images.npy")
    suffixes = {s.rsplit(".", 1)[-1] for s in index["source"]}
    assert len(index) >= 3 and suffixes == ({"jpg", "dcm"} if fmt == "mixed" else {fmt})
    for row, source in zip(index["row"], index["source"], strict=True):
        got = load_scan(spec.root / source, 128)[0].numpy()
        np.testing.assert_array_equal(got, from_uint8(images[row]), err_msg=source)


def test_a_png_too(tmp_path):
    from medvl.data.ingest import build_image_cache
    from medvl.data.testing import write_png

    paths = [str(write_png(tmp_path / f"{i}.png", synthetic_chest(90, 70, seed=i))) for i in range(2)]
    build_image_cache(tmp_path / "out", paths, size=48)
    images = np.load(tmp_path / "out" / "images.npy")
    for row, path in enumerate(paths):
        np.testing.assert_array_equal(load_scan(path, 48)[0].numpy(), from_uint8(images[row]))


def test_an_array_is_taken_as_given():
    arr = synthetic_chest(64, 64, seed=0) * 2048.0 - 1024.0
    np.testing.assert_array_equal(load_scan(arr, 64)[0].numpy(), arr.astype(np.float32))

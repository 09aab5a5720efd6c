"""A scan file reaches a model at inference (load_scan) exactly as a prepared dataset holds it, for every format:
a model sees a file as it saw the images it was trained and evaluated on."""

from __future__ import annotations

import numpy as np
import pytest

from medvl.data.mimic import prepare_mimic
from medvl.data.prepared import from_uint8, read_index
from medvl.data.scans import load_scan
from medvl.data.testing import synthetic_chest, write_mimic_tree


@pytest.mark.parametrize("fmt", ["jpg", "mixed"])
def test_load_scan_gives_the_prepared_image(tmp_path, fmt):
    # 640 x 560 JPGs: decoded at a quarter of their size for 128 px, as prepare decodes them
    spec = write_mimic_tree(tmp_path / "tree", image_format=fmt, shape=(640, 560))
    prepare_mimic(spec.root, tmp_path / "out", size=128)
    index = read_index(tmp_path / "out")
    images = np.load(tmp_path / "out" / "images.npy")
    assert len(index) >= 3 and {s.rsplit(".", 1)[-1] for s in index["source"]} >= {"jpg"}
    for row, source in zip(index["row"], index["source"], strict=True):
        got = load_scan(spec.root / source, 128)[0].numpy()
        np.testing.assert_array_equal(got, from_uint8(images[row]), err_msg=source)


def test_an_array_is_taken_as_given():
    arr = synthetic_chest(64, 64, seed=0) * 2048.0 - 1024.0
    np.testing.assert_array_equal(load_scan(arr, 64)[0].numpy(), arr.astype(np.float32))

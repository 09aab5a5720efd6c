"""A scan reaching a model (medvl.data.scans): a file as a prepared dataset holds it, an array as given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvl.data.images import read_xray, resize_xray
from medvl.data.prepared import from_uint8, to_uint8
from medvl.data.scans import load_scan
from medvl.data.testing import synthetic_chest, write_png
from medvl.errors import InvalidImageError


def test_a_path_is_read_as_prepared_and_an_array_as_given(tmp_path):
    path = write_png(tmp_path / "a.png", synthetic_chest(48, 40, seed=3))
    by_path = load_scan(path, 32)
    assert by_path.shape == (1, 32, 32) and by_path.dtype == torch.float32
    resized = resize_xray(read_xray(path), 32)
    # a file: as a prepared dataset holds it (8 bits a pixel); str and Path alike
    np.testing.assert_array_equal(by_path[0].numpy(), from_uint8(to_uint8(resized)))
    torch.testing.assert_close(load_scan(str(path), 32), by_path, rtol=0, atol=0)
    # an array: resized, not quantised, whatever its container; within half a grey level of the file's tensor
    pixels = read_xray(path)
    by_array = load_scan(pixels, 32)
    np.testing.assert_array_equal(by_array[0].numpy(), resized)
    for given in (torch.from_numpy(pixels), pixels[None]):
        torch.testing.assert_close(load_scan(given, 32), by_array, rtol=0, atol=0)
    assert float((by_array - by_path).abs().max()) <= 1024 / 255 + 1e-3


def test_a_scan_of_the_size_is_kept_and_bad_shapes_raise(tmp_path):
    x = np.linspace(-1024, 1024, 16 * 16, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(load_scan(x, 16)[0].numpy(), x)
    path = write_png(tmp_path / "b.png", synthetic_chest(16, 16, seed=1))
    np.testing.assert_array_equal(load_scan(path, 16)[0].numpy(), from_uint8(to_uint8(read_xray(path))))
    with pytest.raises(InvalidImageError, match="must be"):
        load_scan(np.zeros((2, 8, 8), np.float32), 8)
    with pytest.raises(FileNotFoundError):
        load_scan(tmp_path / "missing.png", 8)

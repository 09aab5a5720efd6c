"""A scan given as a file or as an array reaches a model as the same tensor (medvl.data.scans)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvl.data.images import read_xray, resize_xray
from medvl.data.scans import load_scan
from medvl.data.testing import synthetic_chest, write_png
from medvl.errors import InvalidImageError


def test_path_and_array_give_the_same_tensor(tmp_path):
    path = write_png(tmp_path / "a.png", synthetic_chest(48, 40, seed=3))
    by_path = load_scan(path, 32)
    assert by_path.shape == (1, 32, 32) and by_path.dtype == torch.float32
    np.testing.assert_array_equal(by_path[0].numpy(), resize_xray(read_xray(path), 32))
    pixels = read_xray(path)
    for given in (pixels, torch.from_numpy(pixels), pixels[None], str(path)):
        torch.testing.assert_close(load_scan(given, 32), by_path, rtol=0, atol=0)


def test_a_scan_of_the_size_is_kept_and_bad_shapes_raise(tmp_path):
    x = np.linspace(-1024, 1024, 16 * 16, dtype=np.float32).reshape(16, 16)
    np.testing.assert_array_equal(load_scan(x, 16)[0].numpy(), x)
    path = write_png(tmp_path / "b.png", synthetic_chest(16, 16, seed=1))
    np.testing.assert_array_equal(load_scan(path, 16)[0].numpy(), read_xray(path))
    with pytest.raises(InvalidImageError, match="must be"):
        load_scan(np.zeros((2, 8, 8), np.float32), 8)
    with pytest.raises(FileNotFoundError):
        load_scan(tmp_path / "missing.png", 8)

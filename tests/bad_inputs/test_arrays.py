"""Arrays given to the Python API: colour (H, W, 3) is one scan (its grey, or refused when truly colour), never H
scans; integer arrays are accepted; NaN, infinity, constant, tiny, bool and non-numeric arrays are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvl.api import Pipeline
from medvl.data.scans import load_scan
from medvl.data.testing import synthetic_chest
from medvl.errors import InvalidImageError

GREY = (synthetic_chest(48, 40, seed=2) * 2048 - 1024).astype(np.float32)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_grey_saved_as_colour_is_one_scan():
    rgb = np.repeat(GREY[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((48, 40, 1), 1024.0, np.float32)], axis=-1)
    for arr in (rgb, rgba, torch.from_numpy(rgb)):
        _same(load_scan(arr, 32), load_scan(GREY, 32))
        images, single = Pipeline({})._batch(arr, 32)
        assert single and images.shape == (1, 1, 32, 32)
    images, single = Pipeline({})._batch(np.stack([rgb, rgb]), 32)  # (B, H, W, 3): B scans
    assert not single and images.shape == (2, 1, 32, 32)


def test_true_colour_array_is_refused():
    rgb = np.stack([GREY, GREY[::-1], GREY], axis=-1)
    with pytest.raises(InvalidImageError, match="colour"):
        load_scan(rgb, 32)
    with pytest.raises(InvalidImageError, match="colour"):
        Pipeline({})._batch(rgb, 32)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.int64])
def test_integer_arrays_are_accepted(dtype):
    arr = np.clip(GREY, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    expected = load_scan(arr.astype(np.float32), 32)
    _same(load_scan(arr, 32), expected)
    _same(load_scan(torch.from_numpy(arr.astype(np.int64)), 32), expected)


@pytest.mark.parametrize(
    "arr,says",
    [
        (np.where(np.eye(48, 40, dtype=bool), np.nan, GREY), "not finite"),
        (np.where(np.eye(48, 40, dtype=bool), np.inf, GREY), "not finite"),
        (np.full((48, 40), 100.0, np.float32), "blank"),
        (GREY[:8, :8], "each side"),
        (np.zeros((48, 40), bool), "numbers"),
        (np.array([["a"] * 40] * 48), "numbers"),
        (np.zeros((2, 3, 48, 40), np.float32), "must be"),
        (b"\x89PNG not an array", "numbers"),
    ],
    ids=["nan", "inf", "constant", "tiny", "bool", "strings", "4-d", "bytes"],
)
def test_bad_arrays(arr, says):
    with pytest.raises(InvalidImageError, match=says) as info:
        load_scan(arr, 32)
    assert type(info.value) is InvalidImageError

"""A chest X-ray handed to a model at inference: a file path or an array in, the model's input tensor out.

Used by :class:`medvl.Pipeline` and :class:`medvl.inference.generate.ReportGenerator` alike, so that a scan given
as a file and the same scan given as an array reach a model as the same tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medvl.data.images import read_xray, resize_xray
from medvl.errors import InvalidImageError

__all__ = ["ScanLike", "load_scan"]

#: A scan: a DICOM / PNG / JPG path, or an (H, W) array in [-1024, 1024] (numpy or torch).
ScanLike = str | Path | np.ndarray | torch.Tensor


def load_scan(scan: ScanLike, size: int) -> torch.Tensor:
    """A path (read with :func:`~medvl.data.images.read_xray`) or an (H, W) array in [-1024, 1024] (axes of
    length 1 are dropped) -> (1, size, size) float32 tensor in medvl's convention, padded to a square by
    :func:`~medvl.data.images.resize_xray` unless it is ``size`` x ``size`` already.

    Raises :class:`~medvl.errors.InvalidImageError` naming the problem (``FileNotFoundError`` for a missing file).
    """
    if isinstance(scan, (str, Path)):
        pixels = read_xray(scan)
    else:
        pixels = scan.detach().cpu().numpy() if isinstance(scan, torch.Tensor) else np.asarray(scan)
        pixels = np.squeeze(pixels).astype(np.float32)
        if pixels.ndim != 2:
            raise InvalidImageError(f"a scan array must be (H, W), got shape {pixels.shape}")
    if pixels.shape != (size, size):
        pixels = resize_xray(pixels, size)
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).unsqueeze(0)

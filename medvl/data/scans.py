"""A chest X-ray handed to a model at inference: a file path or an array in, the model's input tensor out.

Used by :class:`medvl.Pipeline` and :class:`medvl.inference.generate.ReportGenerator` alike. A file is read as
``medvl prepare`` stores it in a prepared dataset (:func:`read_scan_file`: a big JPEG decoded at reduced
resolution, resized, 8 bits a pixel), so a model sees a file at inference exactly as it saw the images it was
trained and evaluated on. An array is taken as given (resized, not quantised).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medvl.data.images import ResizeFit, read_xray_with_meta, resize_xray
from medvl.data.prepared import from_uint8, to_uint8
from medvl.data.xray import MAX_SIDE, MIN_SIDE
from medvl.errors import InvalidImageError

__all__ = ["ScanLike", "load_scan", "read_scan_file", "scan_array"]

#: A scan: a DICOM / PNG / JPG path, or an (H, W) array in [-1024, 1024] (numpy or torch).
ScanLike = str | Path | np.ndarray | torch.Tensor


def load_scan(scan: ScanLike, size: int, *, jpg_compatible: bool = False) -> torch.Tensor:
    """A path or an (H, W) array in [-1024, 1024] (axes of length 1 are dropped) -> (1, size, size) float32 tensor
    in medvl's convention, padded to a square by :func:`~medvl.data.images.resize_xray` unless it is ``size`` x
    ``size`` already. A path is read by :func:`read_scan_file`: the tensor is the prepared dataset's image of that
    file, bit for bit (``jpg_compatible``: of a dataset prepared with ``--jpg-compatible``).

    An array may be float or integer (bool is refused); an (H, W, 3) or (H, W, 4) array whose colour channels
    agree (a grey image saved as colour) is read as its grey, one whose channels differ is refused. The array must
    be finite, not constant, and between :data:`~medvl.data.xray.MIN_SIDE` and
    :data:`~medvl.data.xray.MAX_SIDE` pixels a side, as a file must.

    Raises :class:`~medvl.errors.InvalidImageError` naming the problem (its subclass
    :class:`~medvl.errors.ImageNotFoundError`, also a ``FileNotFoundError``, for a missing file).
    """
    if isinstance(scan, (str, Path)):
        pixels = from_uint8(read_scan_file(scan, size, jpg_compatible=jpg_compatible)[0])
    else:
        pixels = scan_array(scan)
        if pixels.shape != (size, size):
            pixels = resize_xray(pixels, size)
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).unsqueeze(0)


def read_scan_file(
    path: str | Path, size: int, *, fit: ResizeFit | str = ResizeFit.PAD, jpg_compatible: bool = False
) -> tuple[np.ndarray, tuple[int, int]]:
    """A scan file as a prepared dataset holds it: (size, size) uint8 and the file's full-resolution (H, W).

    Decoded at reduced resolution where the format allows (a JPEG through libjpeg's DCT scaling, keeping at least
    ``size`` pixels a side), resized by :func:`~medvl.data.images.resize_xray` in the full-resolution frame, then
    8 bits a pixel. ``medvl prepare`` writes exactly this into ``images.npy``.
    """
    xray = read_xray_with_meta(path, jpg_compatible=jpg_compatible, min_side=size)
    img = resize_xray(xray.pixels, size, fit=fit, source_shape=xray.shape)
    return to_uint8(img), xray.shape


def scan_array(scan: np.ndarray | torch.Tensor | object, name: str = "scan array") -> np.ndarray:
    """A scan given as an array -> float32 (H, W), checked as :func:`load_scan` says."""
    try:
        arr = scan.detach().cpu().numpy() if isinstance(scan, torch.Tensor) else np.asarray(scan)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidImageError(
            f"a scan must be a file path or an (H, W) array, not {type(scan).__name__} ({exc})"
        ) from None
    if arr.dtype.kind not in "fiu":
        raise InvalidImageError(f"a {name} must hold numbers (float or integer), got dtype {arr.dtype}")
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) >= MIN_SIDE:
        rgb = arr[..., :3].astype(np.float32)
        spread = rgb.max(axis=-1) - rgb.min(axis=-1)
        if np.isfinite(spread).all() and float(spread.max(initial=0.0)) > 0:
            raise InvalidImageError(
                f"a {name} of shape {arr.shape} is colour (its channels differ by up to "
                f"{float(spread.max()):g}); give a greyscale (H, W) array"
            )
        arr = rgb[..., 0]
    if arr.ndim != 2:
        raise InvalidImageError(f"a {name} must be (H, W), got shape {arr.shape}")
    h, w = arr.shape
    if h > MAX_SIDE or w > MAX_SIDE or h < MIN_SIDE or w < MIN_SIDE:
        raise InvalidImageError(
            f"a {name} of shape {arr.shape}: each side must be {MIN_SIDE} to {MAX_SIDE} pixels"
        )
    pixels = arr.astype(np.float32)
    finite = np.isfinite(pixels)
    if not finite.all():
        raise InvalidImageError(
            f"a {name} holds {int(pixels.size - finite.sum())} values that are not finite (NaN or infinity)"
        )
    if float(pixels.max()) <= float(pixels.min()):
        raise InvalidImageError(f"a {name} is blank: every pixel has the same value")
    return pixels

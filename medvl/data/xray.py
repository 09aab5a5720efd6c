"""The chest X-ray as medvl holds it in memory: one intensity convention, a record of what its file said, and the
error for an unusable image.

Every image medvl reads comes out as float32 ``(H, W)`` in torchxrayvision's ``[-1024, 1024]`` range
(:data:`LOW`, :data:`HIGH`) with the lungs dark (air low, bone high), in the pixel order the file stores.
Readers: :mod:`medvl.data.images` (any format) and :mod:`medvl.data.dicom` (DICOM).
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvl.errors import InvalidImageError

LOW, HIGH = -1024.0, 1024.0


class ImageFormat(str, enum.Enum):
    DICOM = "dicom"
    PNG = "png"
    JPEG = "jpeg"
    OTHER = "other"  # another raster format PIL reads (TIFF, BMP...)


@dataclass
class XRay:
    """A chest X-ray and what its file says about it.

    ``pixels``: float32 (H, W) in [-1024, 1024], lungs dark, stored orientation. ``shape``: the full-resolution
    (rows, columns) of the file (``pixels`` is smaller when read with ``min_side``). ``pixel_spacing``: (row, column)
    spacing in mm of the full-resolution image, or None where the file does not say (or says 0).
    """

    pixels: np.ndarray
    path: Path
    format: ImageFormat
    shape: tuple[int, int]
    photometric: str = ""
    view_position: str = ""
    body_part: str = ""
    modality: str = ""
    pixel_spacing: tuple[float, float] | None = None
    bits_stored: int | None = None
    patient_orientation: tuple[str, ...] = ()
    transfer_syntax: str = ""
    #: how intensities were normalised: "window", "voi-lut", "bits-stored", "data-range", "jpg-compatible",
    #: "8-bit", "16-bit/4095"...
    intensity: str = ""
    notes: list[str] = field(default_factory=list)


def invalid(path: str | Path, problem: str) -> InvalidImageError:
    """The error for an unusable image; the message is ``"<path>: <problem>"``."""
    return InvalidImageError(f"{path}: {problem}")


def problem_of(error: Exception, path: str | Path) -> str:
    """The message of ``error`` without the ``"<path>: "`` prefix :func:`invalid` adds (for skipped.csv)."""
    text = str(error)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def check_xray_range(pixels: np.ndarray, source: str = "image") -> None:
    """Warn when an array does not look like medvl's [-1024, 1024] convention (as torchxrayvision does)."""
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < LOW - 1 or hi > HIGH + 1:
        warnings.warn(
            f"{source} has values in [{lo:.1f}, {hi:.1f}], outside [-1024, 1024]: is it normalised?",
            stacklevel=2,
        )
    elif hi - lo < 16:
        warnings.warn(f"{source} spans only [{lo:.1f}, {hi:.1f}]: is it normalised?", stacklevel=2)

"""The chest X-ray as medvl holds it in memory: one intensity convention, a record of what its file said, and the
error for an unusable image.

Every image medvl reads comes out as float32 ``(H, W)`` in torchxrayvision's ``[-1024, 1024]`` range
(:data:`LOW`, :data:`HIGH`) with the lungs dark (air low, bone high), in the pixel order the file stores.
Readers: :mod:`medvl.data.images` (any format) and :mod:`medvl.data.dicom` (DICOM).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvl.errors import ImageNotFoundError, InvalidImageError

LOW, HIGH = -1024.0, 1024.0

#: The largest image side medvl decodes. Chest radiographs are at most about 4,300 pixels a side; a file that
#: declares more is refused before its pixels are decoded (a few hundred kilobytes of compressed data can
#: declare gigabytes of pixels).
MAX_SIDE = 8192
#: The smallest image side medvl accepts: a smaller "radiograph" (a one-pixel PNG, a 2 x 2 DICOM) holds nothing
#: a model can read.
MIN_SIDE = 16


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


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def check_regular_file(path: str | Path) -> int:
    """Refuse, before opening it, anything at ``path`` that is not a readable, non-empty regular file (reading a
    FIFO would wait forever); returns its size in bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageNotFoundError(
                f"{path}: broken symbolic link (it points to {os.readlink(path)}, which does not exist)"
            ) from None
        raise ImageNotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise invalid(path, "symbolic link loop (the link leads back to itself)") from None
        raise invalid(path, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise invalid(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise invalid(path, f"{kind}, not a regular file: refused without opening it")
    if st.st_size == 0:
        raise invalid(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise invalid(path, "permission denied: the file cannot be read")
    return int(st.st_size)


def check_declared_size(path: str | Path, rows: int, columns: int, what: str = "image") -> None:
    """Refuse an image whose declared (rows, columns) fall outside [:data:`MIN_SIDE`, :data:`MAX_SIDE`], before
    anything is decoded."""
    if rows > MAX_SIDE or columns > MAX_SIDE:
        raise invalid(
            path,
            f"{what} declares {columns} x {rows} pixels (columns x rows), more than medvl's limit of {MAX_SIDE} "
            "pixels a side (chest radiographs have at most about 4,300); not decoded",
        )
    if rows < MIN_SIDE or columns < MIN_SIDE:
        raise invalid(
            path,
            f"{what} is {columns} x {rows} pixels (columns x rows), smaller than medvl's minimum of {MIN_SIDE} "
            "pixels a side: not a radiograph",
        )


def check_pixels(path: str | Path, pixels: np.ndarray) -> None:
    """Refuse decoded pixels that are not finite or all the same value."""
    finite = np.isfinite(pixels)
    if not finite.all():
        raise invalid(path, f"{int(pixels.size - finite.sum())} pixels are not finite (NaN or infinity)")
    if pixels.size and float(pixels.max()) <= float(pixels.min()):
        raise invalid(path, "blank image: every pixel has the same value")


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

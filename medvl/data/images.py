"""Reading chest X-rays from DICOM, PNG and JPG into one intensity convention, and resizing them.

Every image medvl reads comes out as float32 ``(H, W)`` in torchxrayvision's ``[-1024, 1024]`` range with the
lungs dark (air low, bone high), in the pixel order the file stores: nothing is ever transposed or flipped (EXIF
orientation tags are ignored; chest X-ray files do not use them). The convention and the :class:`XRay` record
live in :mod:`medvl.data.xray`.

* DICOM: see :mod:`medvl.data.dicom` (modality LUT, VOI LUT or window, MONOCHROME1 inverted after VOI, normalised
  by the VOI output range, else by BitsStored or the data range).
* PNG / JPG: 8-bit grey ``/ 255``; 16-bit grey divided by the smallest ``2**b - 1`` (b = 8, 10, 12, 14, 16) that
  holds the image's maximum, because 12-bit detector data is often stored in 16-bit PNGs. RGB(A) or palette files
  whose channels agree (a grey image saved in colour) are accepted; truly colour images raise
  :class:`~medvl.errors.InvalidImageError`.
* Big JPGs can be decoded at a reduced resolution (``min_side``): libjpeg's DCT scaling (PIL ``draft``) decodes at
  1/2, 1/4 or 1/8 size directly, keeping at least ``min_side`` pixels on each side, which is how
  ``medvl prepare`` reaches its throughput (``benchmarks/prepare_throughput.py``).

:func:`resize_xray` keeps the aspect ratio by **padding** (default) to a square with the darkest value (-1024, air):
centre-cropping a portrait chest film would cut the apices or the costophrenic angles, where effusions and
pneumothoraces are seen. ``fit="crop"`` is available for callers that prefer it. Both map boxes through
:class:`ResizeGeometry`.
"""

from __future__ import annotations

import enum
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medvl.data.dicom import read_dicom
from medvl.data.xray import (
    HIGH,
    LOW,
    MAX_SIDE,
    ImageFormat,
    XRay,
    check_declared_size,
    check_pixels,
    check_regular_file,
    invalid,
)
from medvl.errors import InvalidImageError

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# A grey image saved as RGB JPEG keeps a few levels of chroma noise; a colour photo differs by far more.
_GREY_SPREAD_TOLERANCE = 10.0  # 8-bit levels, 99th percentile of per-pixel max-min over channels


class ResizeFit(str, enum.Enum):
    PAD = "pad"  # keep everything, pad the short side with air (-1024)
    CROP = "crop"  # fill the square, centre-crop the long side


def sniff_format(path: str | Path, head: bytes) -> ImageFormat | None:
    """Recognise a file by its first bytes (at least 132 of them), never by its name alone."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ImageFormat.DICOM
    if head.startswith(_PNG_MAGIC):
        return ImageFormat.PNG
    if head.startswith(_JPEG_MAGIC):
        return ImageFormat.JPEG
    # A DICOM stream without the 128-byte preamble starts with a group 0002 or 0008 tag.
    if Path(path).suffix.lower() in (".dcm", ".dicom", "") and head[:2] in (b"\x02\x00", b"\x08\x00"):
        return ImageFormat.DICOM
    return None


def read_xray_with_meta(
    path: str | Path, *, jpg_compatible: bool = False, min_side: int | None = None
) -> XRay:
    """Read a DICOM, PNG or JPG chest X-ray with what its file says about it.

    ``jpg_compatible`` (DICOM only) reproduces how MIMIC-CXR-JPG was made from the DICOMs (min-max to 8 bits,
    MONOCHROME1 inverted, histogram equalisation), for models trained on the JPGs. ``min_side`` lets a big JPG
    decode at reduced resolution with at least ``min_side`` pixels on each side.
    Raises :class:`~medvl.errors.InvalidImageError` naming the file and saying what is wrong, for every failure
    (:class:`~medvl.errors.ImageNotFoundError`, also a ``FileNotFoundError``, when it is missing); nothing that
    is not a regular file is opened, and a size declared over :data:`~medvl.data.xray.MAX_SIDE` is refused before
    decoding.
    """
    path = Path(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise invalid(path, f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise invalid(path, "empty file (0 bytes)")
    kind = sniff_format(path, head)
    if kind is ImageFormat.DICOM:
        return read_dicom(path, jpg_compatible=jpg_compatible)
    if kind is None and path.suffix.lower() in (".dcm", ".dicom"):
        raise invalid(path, "not a DICOM file: no 'DICM' marker at byte 128 and no DICOM tag at the start")
    return _read_raster(path, min_side=min_side)


def read_xray(path: str | Path, *, jpg_compatible: bool = False, min_side: int | None = None) -> np.ndarray:
    """A chest X-ray as float32 (H, W) in [-1024, 1024], lungs dark, stored orientation.

    DICOM, PNG or JPG (recognised by content). See :func:`read_xray_with_meta` for the options and errors.
    """
    return read_xray_with_meta(path, jpg_compatible=jpg_compatible, min_side=min_side).pixels


# ---------------------------------------------------------------------------------------------------------- raster


def _read_raster(path: Path, *, min_side: int | None) -> XRay:
    try:
        return _read_raster_file(path, min_side=min_side)
    except InvalidImageError:
        raise
    except MemoryError:
        raise invalid(path, "not enough memory to decode this image") from None
    except Exception as exc:  # PIL's plugins raise assorted errors on damaged files
        raise invalid(path, f"corrupt or unusable image file ({type(exc).__name__}: {exc})") from None


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a PNG's IHDR chunk, read before PIL sees the file."""
    if head.startswith(_PNG_MAGIC) and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">2I", head[16:24])
        return int(height), int(width)
    return None


def _read_raster_file(path: Path, *, min_side: int | None) -> XRay:
    with open(path, "rb") as fh:
        size = _png_size(fh.read(24))
    if size is not None:
        check_declared_size(path, *size, what="PNG header")
    try:
        with warnings.catch_warnings():
            # medvl's own limit (MAX_SIDE) is checked below, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise invalid(
            path, f"declares too many pixels ({exc}); medvl's limit is {MAX_SIDE} pixels a side; not decoded"
        ) from None
    except Image.UnidentifiedImageError:
        raise invalid(
            path, "not an image: neither DICOM nor a format PIL reads (PNG, JPG, TIFF...)"
        ) from None
    except OSError as exc:
        raise invalid(path, f"unreadable image file ({exc})") from None
    with im:
        fmt = {"PNG": ImageFormat.PNG, "JPEG": ImageFormat.JPEG}.get(im.format or "", ImageFormat.OTHER)
        full_shape = (int(im.size[1]), int(im.size[0]))
        check_declared_size(path, *full_shape, what=f"{im.format or 'image'} header")
        if min_side and fmt is ImageFormat.JPEG and im.mode in ("L", "RGB", "YCbCr"):
            # DCT-domain downscale inside libjpeg: 1/2, 1/4 or 1/8, both sides staying >= min_side.
            im.draft(im.mode, (int(min_side), int(min_side)))
        try:
            im.load()
        except OSError as exc:
            text = str(exc)
            if "truncated" in text.lower():
                raise invalid(path, f"truncated {fmt.value.upper()} file ({text})") from None
            raise invalid(path, f"corrupt {fmt.value.upper()} file ({text})") from None
        except (SyntaxError, ValueError) as exc:
            raise invalid(path, f"corrupt image file ({exc})") from None
        pixels, how = _raster_to_xray_range(path, im)
    check_pixels(path, pixels)
    return XRay(
        pixels=pixels, path=path, format=fmt, shape=full_shape, photometric="MONOCHROME2", intensity=how
    )


def _raster_to_xray_range(path: Path, im: Image.Image) -> tuple[np.ndarray, str]:
    mode = im.mode
    if mode == "1":
        raise invalid(path, "a 1-bit black-and-white image, not a radiograph")
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        mode = im.mode
    if mode == "CMYK":
        im = im.convert("RGB")
        mode = im.mode
    if mode in ("RGB", "RGBA", "YCbCr", "LA"):
        if mode == "YCbCr":
            im = im.convert("RGB")
        arr = np.asarray(im)
        if mode == "LA":
            grey = arr[..., 0].astype(np.float32)
        else:
            rgb = arr[..., :3]
            spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)
            if float(np.percentile(spread, 99)) > _GREY_SPREAD_TOLERANCE:
                raise invalid(
                    path,
                    f"colour image ({mode}, channels differ by up to {int(spread.max())} levels);"
                    " a chest X-ray is greyscale",
                )
            grey = rgb.astype(np.float32).mean(axis=-1)
        return _scale(grey, 255.0), "8-bit (grey saved as colour)"
    if mode == "L":
        return _scale(np.asarray(im, dtype=np.float32), 255.0), "8-bit"
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.dtype.kind not in "iu":
            arr = arr.astype(np.int64)
        if arr.min() < 0:
            lo, hi = float(arr.min()), float(arr.max())
            if hi <= lo:
                raise invalid(path, "blank image (every pixel has the same value)")
            return _scale(arr.astype(np.float32) - lo, hi - lo), "signed integer, data range"
        top = float(arr.max())
        maxval = next((2.0**b - 1 for b in (8, 10, 12, 14, 16) if top <= 2.0**b - 1), top)
        return _scale(arr.astype(np.float32), maxval), f"16-bit/{int(maxval)}"
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        finite = np.isfinite(arr)
        if not finite.all():
            raise invalid(path, f"{int(arr.size - finite.sum())} pixels are not finite (NaN or infinity)")
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            raise invalid(path, "blank image: every pixel has the same value")
        return _scale(arr - lo, hi - lo), "float, data range"
    raise invalid(path, f"unsupported image mode {mode!r}")


def _scale(arr: np.ndarray, maxval: float) -> np.ndarray:
    """[0, maxval] -> float32 [-1024, 1024]."""
    out = arr.astype(np.float32, copy=False) * np.float32(2048.0 / maxval) - np.float32(1024.0)
    return np.clip(out, LOW, HIGH, out=out)


# ---------------------------------------------------------------------------------------------------------- resize


@dataclass(frozen=True)
class ResizeGeometry:
    """How :func:`resize_xray` placed an (H, W) image into (S, S): ``resized`` = (h, w) after scaling,
    ``offset`` = (top, left) of the scaled image in the square (negative when cropped)."""

    source_shape: tuple[int, int]
    size: int
    resized: tuple[int, int]
    offset: tuple[int, int]

    def map_box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """A box in normalised coordinates of the source image -> normalised coordinates of the square
        (clipped to [0, 1]); x runs to the image's right, y down."""
        h, w = self.resized
        top, left = self.offset
        s = float(self.size)

        def fx(x: float) -> float:
            return float(np.clip((x * w + left) / s, 0.0, 1.0))

        def fy(y: float) -> float:
            return float(np.clip((y * h + top) / s, 0.0, 1.0))

        return fx(x0), fy(y0), fx(x1), fy(y1)


def resize_geometry(
    shape: tuple[int, int], size: int, fit: ResizeFit | str = ResizeFit.PAD
) -> ResizeGeometry:
    """Where an image of ``shape`` (H, W) lands in a ``size`` x ``size`` square."""
    fit = ResizeFit(fit)
    h, w = int(shape[0]), int(shape[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"cannot resize an empty image of shape {shape}")
    scale = size / (max(h, w) if fit is ResizeFit.PAD else min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if fit is ResizeFit.PAD:
        nh, nw = min(nh, size), min(nw, size)
    return ResizeGeometry(
        source_shape=(h, w), size=size, resized=(nh, nw), offset=((size - nh) // 2, (size - nw) // 2)
    )


def resize_xray(
    img: np.ndarray,
    size: int,
    *,
    fit: ResizeFit | str = ResizeFit.PAD,
    source_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resize a float32 (H, W) X-ray to (size, size) keeping its aspect ratio.

    ``fit="pad"`` (default) scales the long side to ``size`` and pads the short side symmetrically with -1024;
    ``fit="crop"`` scales the short side to ``size`` and centre-crops. Downscaling is anti-aliased (PIL's Lanczos
    filter with a support widened by the scale factor, after an exact box pre-reduction when the factor is large);
    the result is clipped to [-1024, 1024]. Orientation is preserved.
    ``source_shape``: the full-resolution shape when ``img`` was decoded at reduced resolution (so the geometry
    matches :func:`resize_geometry` of the original).
    """
    if img.ndim != 2:
        raise ValueError(f"resize_xray needs a 2-D (H, W) array, got shape {img.shape}")
    geom = resize_geometry(source_shape or img.shape, size, fit)
    nh, nw = geom.resized
    arr = np.ascontiguousarray(img, dtype=np.float32)
    if (nh, nw) == arr.shape:
        scaled = arr
    else:
        pil = Image.fromarray(arr)  # float32 -> PIL mode "F"
        scaled = np.asarray(
            pil.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.float32
        )
    out = np.full((size, size), LOW, dtype=np.float32)
    top, left = geom.offset
    # Paste the scaled image into the square; negative offsets crop.
    sy0, sx0 = max(0, -top), max(0, -left)
    dy0, dx0 = max(0, top), max(0, left)
    hh, ww = min(nh - sy0, size - dy0), min(nw - sx0, size - dx0)
    out[dy0 : dy0 + hh, dx0 : dx0 + ww] = scaled[sy0 : sy0 + hh, sx0 : sx0 + ww]
    return np.clip(out, LOW, HIGH, out=out)

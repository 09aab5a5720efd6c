"""Checks of a DICOM file made from its header before any pixel data are decoded: the declared size against
medvl's limits (:data:`~medvl.data.xray.MAX_SIDE`, :data:`~medvl.data.xray.MIN_SIDE`), from the image pixel
module and from a compressed frame's own codestream header (JPEG 2000 SIZ, JPEG SOF); a deflated data set
inflated in a stream, header first, never all at once; the image pixel module's elements present and sane;
rescale and window values finite. Each failure is an :class:`~medvl.errors.InvalidImageError` naming the file.
Used by :mod:`medvl.data.dicom`."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medvl.data.xray import check_declared_size, invalid

#: How much of a deflated data set is inflated to read its header (the image pixel module comes first).
_DEFLATED_HEADER_BYTES = 4 << 20
#: What a deflated data set may inflate to beyond the pixel data its header declares (other elements).
_DEFLATED_SLACK_BYTES = 64 << 20
_PIXEL_DATA_TAG = 0x7FE00010


def check_deflated(path: Path) -> None:
    """A Deflated Explicit VR Little Endian file: pydicom inflates the whole data set at once when reading it,
    so a few hundred kilobytes can declare gigabytes. Inflate it in a stream instead: read the header from its
    first megabytes, refuse a declared size over the limit, then refuse the file as soon as it inflates past
    what the header declares (plus room for other elements), never holding more than a chunk in memory."""
    with open(path, "rb") as fp:
        try:
            read_preamble(fp, False)
            file_meta = _read_file_meta_info(fp)
        except Exception:
            return  # not a file with a preamble and file meta: pydicom's own reading says what is wrong
        if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = bytearray()
        try:
            while len(head) < _DEFLATED_HEADER_BYTES:
                chunk = fp.read(1 << 16)
                if not chunk:
                    break
                head += inflater.decompress(chunk, _DEFLATED_HEADER_BYTES - len(head))
                if inflater.unconsumed_tail:
                    break
        except zlib.error as exc:
            raise invalid(path, f"corrupt deflated data set ({exc})") from None
        try:
            header = read_dataset(
                DicomBytesIO(bytes(head)),
                is_implicit_VR=False,
                is_little_endian=True,
                stop_when=lambda tag, vr, length: tag == _PIXEL_DATA_TAG,
                defer_size=1 << 16,
            )
        except Exception:
            header = pydicom.Dataset()
        if "Rows" not in header or "Columns" not in header:
            raise invalid(
                path, "deflated data set whose header (its first megabytes) has no Rows and Columns"
            )
        rows, columns, bits, samples, frames = geometry(path, header)
        declared = rows * columns * samples * frames * max(1, bits // 8)
        budget = declared + _DEFLATED_SLACK_BYTES
        total = len(head)
        pending = inflater.unconsumed_tail
        try:
            while True:
                while pending:
                    total += len(inflater.decompress(pending, 1 << 20))
                    pending = inflater.unconsumed_tail
                    if total > budget:
                        raise invalid(
                            path,
                            f"deflated data set inflates to more than {budget} bytes, though its header declares "
                            f"{columns} x {rows} pixels ({declared} bytes); not decoded",
                        )
                chunk = fp.read(1 << 16)
                if not chunk:
                    break
                pending = chunk
        except zlib.error as exc:
            raise invalid(path, f"corrupt deflated data set ({exc})") from None


def _integer(path: Path, ds: pydicom.Dataset, key: str, default: int | None = None) -> int:
    if key not in ds or ds[key].value in (None, "", b""):
        if default is not None:
            return default
        raise invalid(path, f"no {key} in the DICOM header: cannot read the pixel data")
    value = ds[key].value
    try:
        number = int(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise invalid(path, f"{key} is {str(value)[:40]!r}, not an integer") from None
    if number < 1:
        raise invalid(path, f"{key} is {number}; it must be at least 1")
    return number


def geometry(path: Path, ds: pydicom.Dataset) -> tuple[int, int, int, int, int]:
    """(rows, columns, bits allocated, samples per pixel, frames) from the header, checked against medvl's
    limits before anything is decoded."""
    rows = _integer(path, ds, "Rows")
    columns = _integer(path, ds, "Columns")
    bits = _integer(path, ds, "BitsAllocated")
    samples = _integer(path, ds, "SamplesPerPixel", default=1)
    frames = _integer(path, ds, "NumberOfFrames", default=1)
    check_declared_size(path, rows, columns, what="DICOM header")
    if bits not in (8, 16, 32):
        raise invalid(path, f"BitsAllocated is {bits}: medvl reads 8, 16 or 32 bits per sample")
    return rows, columns, bits, samples, frames


def has_pixel_data_tag(path: Path) -> bool:
    """Whether the file's bytes hold a Pixel Data tag (7FE0,0010) that pydicom did not read (a cut file)."""
    tag = b"\xe0\x7f\x10\x00"
    with open(path, "rb") as fh:
        tail = b""
        while chunk := fh.read(1 << 20):
            if tag in tail + chunk:
                return True
            tail = chunk[-3:]
    return False


def _finite_values(path: Path, ds: pydicom.Dataset, key: str) -> list[float] | None:
    """The numbers of ``key`` (None when absent or not numbers); a NaN or an infinity is an error."""
    if key not in ds:
        return None
    value = ds[key].value
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        numbers = [float(v) for v in items if v not in (None, "")]
    except (TypeError, ValueError):
        return None
    bad = [v for v in numbers if not np.isfinite(v)]
    if bad:
        raise invalid(path, f"{key} is {bad[0]}: not a finite number")
    return numbers


def check_numbers(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse non-finite rescale and window values, and a rescale that is not a number at all."""
    for key in ("RescaleSlope", "RescaleIntercept"):
        if key in ds and ds[key].value not in (None, "") and _finite_values(path, ds, key) is None:
            raise invalid(path, f"{key} is {str(ds[key].value)[:40]!r}, not a number")
    for key in ("WindowCenter", "WindowWidth"):
        _finite_values(path, ds, key)


_J2K_SIZ = re.compile(rb"\xff\x4f\xff\x51")  # SOC then SIZ: the start of every JPEG 2000 codestream
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) of the first frame header of a JPEG codestream in ``head``, walking its segments."""
    i = head.find(b"\xff\xd8")
    if i < 0:
        return None
    i += 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            fields = head[i + 5 : i + 9]
            return struct.unpack(">2H", fields) if len(fields) == 4 else None
        i += 2 + struct.unpack(">H", head[i + 2 : i + 4])[0]
    return None


def check_codestream_size(path: Path, ds: pydicom.Dataset) -> None:
    """The size a compressed frame declares in its own header (JPEG 2000 SIZ, JPEG SOF), checked against the
    limits and the DICOM header before the decoder allocates it."""
    head = bytes(ds.PixelData[:65536])
    size = None
    if m := _J2K_SIZ.search(head):
        fields = head[m.end() + 4 : m.end() + 20]
        if len(fields) == 16:
            x, y, x0, y0 = struct.unpack(">4I", fields)
            size = (y - y0, x - x0) if x > x0 and y > y0 else None
    else:
        size = _jpeg_size(head)
    if size is None or 0 in size:
        return  # no codestream header found (RLE, a JPEG whose height comes later): the decoder checks it
    rows, columns = int(size[0]), int(size[1])
    check_declared_size(path, rows, columns, what="its compressed pixel data")
    if rows > int(ds.Rows) or columns > int(ds.Columns):
        raise invalid(
            path,
            f"its compressed pixel data are {columns} x {rows} pixels but the header says "
            f"{int(ds.Columns)} x {int(ds.Rows)} (columns x rows)",
        )

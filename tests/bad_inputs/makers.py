"""Bad input files made on the spot (no binary blobs in the repository): decompression bombs, damaged DICOM
headers, non-finite and degenerate images, and files that are not regular files."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit

from medvl.data.dicom import write_dicom
from medvl.data.testing import chest_dataset, synthetic_chest
from medvl.errors import InvalidImageError

UNIT = synthetic_chest(48, 40, seed=5)  # a small chest film, display values in [0, 1]


def chest_dicom(path: Path, unit: np.ndarray = UNIT, **kwargs) -> Path:
    """A good uncompressed chest DICOM (12 bits) at ``path``."""
    return write_dicom(chest_dataset(unit, **kwargs), path)


def edited_dicom(path: Path, edit: Callable[[pydicom.Dataset], None], unit: np.ndarray = UNIT) -> Path:
    """A chest DICOM changed by ``edit`` before writing (written without pydicom's value validation)."""
    ds = chest_dataset(unit)
    ds["PixelData"].VR = "OW"  # so that it is written even when ``edit`` removes BitsAllocated
    edit(ds)
    return write_unvalidated(ds, path)


def write_unvalidated(ds: pydicom.Dataset, path: Path) -> Path:
    """``ds`` written with medvl's writer, without pydicom's value validation (bad values are the point)."""
    before = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        return write_dicom(ds, path)
    finally:
        pydicom.config.settings.writing_validation_mode = before


def dicom_with_text_value(path: Path, keyword: str, vr: str, text: bytes) -> Path:
    """A chest DICOM whose ``keyword`` element (VR ``vr``) holds the raw bytes ``text`` (e.g. b"abc" in an IS),
    which pydicom would not write itself."""
    placeholder = b"9" * len(text)
    ds = chest_dataset(UNIT)
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), vr, placeholder.decode())
    write_dicom(ds, path)
    tag = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(keyword))
    element = struct.pack("<HH2sH", tag.group, tag.element, vr.encode(), len(placeholder)) + placeholder
    data = path.read_bytes()
    assert data.count(element) == 1
    path.write_bytes(data.replace(element, element[: -len(placeholder)] + text))
    return path


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _meta_bytes(ds: pydicom.Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def deflated_dicom_bomb(path: Path, rows: int, columns: int, inflated_pixels: int | None = None) -> Path:
    """A Deflated Explicit VR Little Endian chest DICOM whose header declares ``columns`` x ``rows`` 8-bit pixels
    and whose Pixel Data inflate to ``inflated_pixels`` zero bytes (default: what the header declares), a few
    hundred kilobytes on disk."""
    ds = chest_dataset(UNIT, bits=8)
    ds.Rows, ds.Columns = rows, columns
    del ds.PixelData
    n = rows * columns if inflated_pixels is None else inflated_pixels
    header = _dataset_bytes(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, n)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [_meta_bytes(ds, DeflatedExplicitVRLittleEndian), deflater.compress(header)]
    zeros = bytes(1 << 22)
    left = n
    while left > 0:
        parts.append(deflater.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    parts.append(deflater.flush())
    path.write_bytes(b"".join(parts))
    return path


def j2k_dicom(path: Path, *, header_size: tuple[int, int] | None = None, codestream_size=None) -> Path:
    """A JPEG 2000 Lossless chest DICOM, with its header's (rows, columns) and its codestream's SIZ size
    optionally replaced (the pixel data stay those of a small image)."""
    ds = chest_dataset(UNIT)
    ds.compress(JPEG2000Lossless)
    if codestream_size is not None:
        data = bytearray(ds.PixelData)
        at = data.find(b"\xff\x4f\xff\x51") + 4 + 4  # SOC, SIZ, Lsiz, Rsiz -> Xsiz
        rows, columns = codestream_size
        data[at : at + 16] = struct.pack(">4I", columns, rows, 0, 0)
        ds.PixelData = bytes(data)
    if header_size is not None:
        ds.Rows, ds.Columns = header_size
    return write_dicom(ds, path)


def jpeg_dicom(path: Path, *, codestream_size: tuple[int, int] | None = None) -> Path:
    """A JPEG Baseline chest DICOM (the JPEG made by PIL), its SOF size optionally replaced."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.rint(UNIT * 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    data = bytearray(buf.getvalue())
    if codestream_size is not None:
        at = data.find(b"\xff\xc0")
        data[at + 5 : at + 9] = struct.pack(">2H", *codestream_size)
    ds = chest_dataset(UNIT, bits=8)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([bytes(data)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return write_dicom(ds, path)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_claiming(path: Path, width: int, height: int, rows_of_data: int = 4) -> Path:
    """A greyscale PNG whose header says ``width`` x ``height`` but that holds a few rows of data."""
    raw = b"".join(b"\0" + bytes(width) for _ in range(rows_of_data))
    ihdr = struct.pack(">2I5B", width, height, 8, 0, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def bmp_claiming(path: Path, width: int, height: int) -> Path:
    """An 8-bit BMP whose header says ``width`` x ``height`` (no pixel data after its palette)."""
    palette = b"".join(bytes((v, v, v, 0)) for v in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", offset, 0, 0, offset) + info + palette)
    return path


def tiff_claiming(path: Path, width: int, height: int) -> Path:
    """An uncompressed 8-bit greyscale TIFF whose header says ``width`` x ``height`` (a few bytes of data)."""
    entries = [
        (256, 4, 1, width),  # ImageWidth, LONG
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: BlackIsZero
        (273, 4, 1, 8 + 2 + 12 * 8 + 4),  # StripOffsets: right after the IFD
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, width * height),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHII", tag, kind, count, value)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(64))
    return path


def refused(read: Callable[[], object], *names: str, max_bytes: int = 64 << 20) -> InvalidImageError:
    """Call ``read``; it must raise :class:`InvalidImageError` whose message holds every one of ``names``, with
    Python allocating at most ``max_bytes`` on the way. Returns the error."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImageError) as info:
            read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    for name in names:
        assert str(name) in message, f"{name!r} not in {message!r}"
    assert peak <= max_bytes, f"allocated {peak / 2**20:.0f} MiB before refusing: {message}"
    return info.value

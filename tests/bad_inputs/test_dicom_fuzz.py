"""Property test of the DICOM reader over random header values: whatever the image pixel module, rescale,
window, modality and transfer syntax say, reading gives a finite, non-constant image in [-1024, 1024] of an
accepted size, or an InvalidImageError naming the file; never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medvl.data.images import read_xray_with_meta  # noqa: E402
from medvl.data.testing import chest_dataset  # noqa: E402
from medvl.data.xray import MAX_SIDE, MIN_SIDE  # noqa: E402
from medvl.errors import InvalidImageError  # noqa: E402

from .makers import UNIT, write_unvalidated  # noqa: E402

NUMBERS = st.one_of(
    st.none(),
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 4096.0, -1024.0, 1e30, float("nan"), float("inf"), float("-inf")]),
    st.floats(-1e6, 1e6, allow_nan=False),
)
SIDES = st.sampled_from([0, 1, 2, 15, 16, 40, 47, 48, 49, 64, 8193, 20000, 65535])

FIELDS = {
    "Rows": SIDES,
    "Columns": SIDES,
    "BitsAllocated": st.sampled_from([None, 0, 1, 7, 8, 12, 16, 24, 32, 64]),
    "BitsStored": st.sampled_from([None, 0, 1, 8, 12, 16, 17, 33]),
    "HighBit": st.sampled_from([None, 0, 7, 11, 15, 40]),
    "PixelRepresentation": st.sampled_from([None, 0, 1, 2]),
    "SamplesPerPixel": st.sampled_from([None, 0, 1, 2, 3, 4]),
    "PhotometricInterpretation": st.sampled_from(
        [None, "MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "", "XYZ"]
    ),
    "NumberOfFrames": st.sampled_from([None, "0", "1", "2", "-1", "1000000"]),
    "RescaleSlope": NUMBERS,
    "RescaleIntercept": NUMBERS,
    "WindowCenter": NUMBERS,
    "WindowWidth": NUMBERS,
    "VOILUTFunction": st.sampled_from([None, "LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]),
    "Modality": st.sampled_from([None, "DX", "CR", "CT", "", "SR"]),
    "BodyPartExamined": st.sampled_from([None, "CHEST", "HAND", "", "PORTABLE"]),
}


@st.composite
def headers(draw) -> dict:
    """A few header elements of a good chest DICOM changed (None: removed), the rest left as they were."""
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=0, max_size=4, unique=True))
    return {key: draw(FIELDS[key]) for key in keys}


def _build(path: Path, header: dict, pixel_bytes: float, syntax: str) -> Path:
    ds = chest_dataset(UNIT)
    ds["PixelData"].VR = "OW"
    data = ds.PixelData
    ds.PixelData = data[: int(len(data) * pixel_bytes)] if pixel_bytes < 1 else data + data[:64]
    for key, value in header.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        elif isinstance(value, float):
            setattr(ds, key, repr(value) if not np.isfinite(value) else value)
        else:
            setattr(ds, key, value)
    ds.file_meta.TransferSyntaxUID = syntax
    return write_unvalidated(ds, path)


@settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    header=headers(),
    pixel_bytes=st.sampled_from([1.0, 0.0, 0.5, 0.999, 1.5]),
    syntax=st.sampled_from(
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
    ),
)
def test_dicom_reader_over_random_header_values(header, pixel_bytes, syntax):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = _build(Path(tmp) / "fuzz.dcm", header, pixel_bytes, syntax)
        except Exception:  # a header pydicom itself cannot write: not a file anyone can give medvl
            hypothesis.assume(False)
        try:
            xray = read_xray_with_meta(path)
        except InvalidImageError as exc:
            assert str(exc).startswith(f"{path}: "), str(exc)
            return
        pixels = xray.pixels
        assert pixels.dtype == np.float32 and pixels.ndim == 2
        assert MIN_SIDE <= min(pixels.shape) and max(pixels.shape) <= MAX_SIDE
        assert np.isfinite(pixels).all()
        assert -1024.0 <= float(pixels.min()) < float(pixels.max()) <= 1024.0

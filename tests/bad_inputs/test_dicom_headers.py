"""Damaged DICOM headers: every failure is an InvalidImageError naming the file (and the element where medvl
checks it), never an AttributeError, KeyError or ValueError from pydicom; truncated files say so."""

from __future__ import annotations

import numpy as np
import pytest

from medvl.data.dicom import read_dicom
from medvl.data.images import read_xray
from medvl.errors import InvalidImageError

from .makers import chest_dicom, dicom_with_text_value, edited_dicom, j2k_dicom


def _remove(keyword):
    return lambda ds: delattr(ds, keyword)


def _set(keyword, value):
    return lambda ds: setattr(ds, keyword, value)


@pytest.mark.parametrize(
    "edit,says",
    [
        (_remove("Rows"), "no Rows"),
        (_remove("Columns"), "no Columns"),
        (_remove("BitsAllocated"), "no BitsAllocated"),
        (_remove("BitsStored"), "Bits Stored"),
        (_remove("PixelRepresentation"), "Pixel Representation"),
        (_remove("SamplesPerPixel"), "Samples per Pixel"),
        (_remove("PhotometricInterpretation"), "Photometric Interpretation"),
        (_set("Rows", 0), "Rows is 0"),
        (_set("SamplesPerPixel", 0), "SamplesPerPixel is 0"),
        (_set("BitsAllocated", 12), "BitsAllocated is 12"),
        (_set("BitsAllocated", 1), "BitsAllocated is 1"),
        (_set("BitsStored", 40), "Bits Stored"),
        (_set("PixelRepresentation", 2), "Pixel Representation"),
        (_set("PhotometricInterpretation", "XYZ"), "XYZ"),
        (_set("Rows", 60), "truncated"),  # more rows than the pixel data hold
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_damaged_image_pixel_module(tmp_path, edit, says):
    path = edited_dicom(tmp_path / "damaged.dcm", edit)
    for read in (read_xray, read_dicom):
        with pytest.raises(InvalidImageError) as info:
            read(path)
        assert type(info.value) is InvalidImageError
        assert str(info.value).startswith(f"{path}: ") and says in str(info.value)


@pytest.mark.parametrize(
    "keyword,vr,text",
    [("NumberOfFrames", "IS", b"abc "), ("RescaleSlope", "DS", b"abc "), ("Rows", "US", b"\xff")],
    ids=["frames-text", "slope-text", "rows-one-byte"],
)
def test_values_that_are_not_numbers(tmp_path, keyword, vr, text):
    if keyword == "Rows":
        path = chest_dicom(tmp_path / "x.dcm")
        data = path.read_bytes()
        element = b"\x28\x00\x10\x00US\x02\x00" + data.split(b"\x28\x00\x10\x00US\x02\x00", 1)[1][:2]
        path.write_bytes(data.replace(element, b"\x28\x00\x10\x00US\x01\x00\xff", 1))
    else:
        path = dicom_with_text_value(tmp_path / "x.dcm", keyword, vr, text)
    with pytest.raises(InvalidImageError) as info:
        read_xray(path)
    assert type(info.value) is InvalidImageError and str(info.value).startswith(f"{path}: ")


def test_truncated_j2k_is_never_reported_as_an_object_without_pixels(tmp_path):
    data = j2k_dicom(tmp_path / "full.dcm").read_bytes()
    at = data.find(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
    seen = set()
    for cut in [at - 2, at + 2, at + 6, at + 12, at + 40, (at + len(data)) // 2, len(data) * 5 // 6]:
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidImageError) as info:
            read_xray(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and ("truncated" in message or "damaged" in message), message
        assert "not an image" not in message
        seen.add(message.split(": ", 1)[1][:20])
    assert len(seen) >= 2  # cut in the header, in the pixel data element and in the codestream


def test_a_constant_dicom_with_a_window_is_blank(tmp_path):
    path = chest_dicom(tmp_path / "c.dcm", np.full((48, 40), 0.5), window=(2000.0, 800.0))
    with pytest.raises(InvalidImageError, match="blank image") as info:
        read_xray(path)
    assert str(path) in str(info.value)

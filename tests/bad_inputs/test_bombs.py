"""Decompression bombs: a declared size over medvl's limit is refused from the header, before any large
allocation, with a message naming the file, the size and the limit (never PIL's DecompressionBombError)."""

from __future__ import annotations

import pytest

import medvl.data.dicom_header as dicom_header
from medvl.data.images import read_xray
from medvl.data.xray import MAX_SIDE
from medvl.errors import InvalidImageError

from .makers import (
    bmp_claiming,
    chest_dicom,
    deflated_dicom_bomb,
    j2k_dicom,
    jpeg_dicom,
    png_claiming,
    refused,
    tiff_claiming,
)


def test_deflated_dicom_declaring_20000_pixels_a_side(tmp_path):
    path = deflated_dicom_bomb(tmp_path / "bomb.dcm", 20000, 20000)
    assert path.stat().st_size < 1 << 20  # under a megabyte on disk, 400 MB of pixels inflated
    err = refused(lambda: read_xray(path), path, "20000 x 20000", MAX_SIDE)
    assert type(err) is InvalidImageError


def test_deflated_dicom_inflating_past_its_header(tmp_path, monkeypatch):
    # The header says 64 x 64 but the data set inflates to 24 MB: refused while inflating, in a stream.
    monkeypatch.setattr(dicom_header, "_DEFLATED_SLACK_BYTES", 1 << 20)
    path = deflated_dicom_bomb(tmp_path / "liar.dcm", 64, 64, inflated_pixels=24 << 20)
    err = refused(lambda: read_xray(path), path, "inflates to more than", "64 x 64", max_bytes=16 << 20)
    assert type(err) is InvalidImageError


def test_a_good_deflated_dicom_still_reads(tmp_path):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(chest_dicom(tmp_path / "plain.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert read_xray(tmp_path / "deflated.dcm").shape == read_xray(tmp_path / "plain.dcm").shape


def test_j2k_dicom_declaring_20000_pixels_a_side(tmp_path):
    path = j2k_dicom(tmp_path / "j2k_header.dcm", header_size=(20000, 20000))
    assert type(refused(lambda: read_xray(path), path, "20000 x 20000", MAX_SIDE)) is InvalidImageError


@pytest.mark.parametrize("maker", [j2k_dicom, jpeg_dicom], ids=["jpeg2000", "jpeg"])
def test_compressed_frame_declaring_more_than_the_header(tmp_path, maker):
    # The DICOM header says 48 x 40; the codestream inside says 20000 x 20000: its own header is read first.
    path = maker(tmp_path / "codestream.dcm", codestream_size=(20000, 20000))
    err = refused(lambda: read_xray(path), path, "compressed pixel data", "20000 x 20000", MAX_SIDE)
    assert type(err) is InvalidImageError
    assert read_xray(maker(tmp_path / "good.dcm")).shape == (48, 40)


@pytest.mark.parametrize("side", [12000, 30000])
@pytest.mark.parametrize(
    "maker,suffix",
    [(png_claiming, "png"), (bmp_claiming, "bmp"), (tiff_claiming, "tif")],
    ids=["png", "bmp", "tiff"],
)
def test_raster_header_declaring_a_huge_image(tmp_path, maker, suffix, side):
    path = maker(tmp_path / f"huge.{suffix}", side, side)
    assert path.stat().st_size < 1 << 20
    # 30000 x 30000 is past PIL's own bomb limit too: its DecompressionBombError never surfaces.
    err = refused(lambda: read_xray(path), path, MAX_SIDE)
    assert type(err) is InvalidImageError
    assert f"{side} x {side}" in str(err) or f"{side * side} pixels" in str(err)

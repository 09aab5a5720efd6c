"""DICOM reading on synthetic files written with pydicom (and python-gdcm for the JPEG codecs)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medvl.data.dicom import body_part_is_chest, read_dicom, write_dicom
from medvl.data.images import read_xray, read_xray_with_meta
from medvl.data.testing import chest_dataset, synthetic_chest, transcode_with_gdcm
from medvl.errors import InvalidImageError

UNIT = synthetic_chest(48, 40, seed=1)


def write(tmp_path, name="a.dcm", **kwargs) -> object:
    return write_dicom(chest_dataset(UNIT, **kwargs), tmp_path / name)


@pytest.mark.parametrize("bits", [12, 15])
@pytest.mark.parametrize("window", [None, "window"])
def test_monochrome1_and_monochrome2_twins_read_the_same(tmp_path, bits, window):
    maxval = 2**bits - 1
    w2 = (0.45 * maxval, 0.8 * maxval) if window else None
    # The MONOCHROME1 twin stores max - value, so its window centre mirrors too.
    w1 = (maxval - w2[0], w2[1]) if window else None
    a = read_xray(write(tmp_path, "m2.dcm", bits=bits, photometric="MONOCHROME2", window=w2))
    b = read_xray(write(tmp_path, "m1.dcm", bits=bits, photometric="MONOCHROME1", window=w1))
    assert a.shape == (48, 40) and a.dtype == np.float32
    # LINEAR windowing shifts by half a level, so mirrored windows differ by one part in the width.
    np.testing.assert_allclose(a, b, atol=2048 / (0.8 * maxval) + 1e-3)
    if window is None:  # no VOI: scaled by what BitsStored allows, so exactly the drawn values
        np.testing.assert_allclose(a, np.rint(UNIT * maxval) / maxval * 2048 - 1024, atol=1e-2)
    # lungs dark, mediastinum bright, as drawn
    assert a[20, 12] < a[20, 20] - 500


def test_window_linear_matches_dicom_formula(tmp_path):
    center, width = 1500.0, 1000.0
    path = write(tmp_path, bits=12, window=(center, width))
    xray = read_xray_with_meta(path)
    assert xray.intensity == "window"
    stored = np.rint(UNIT * 4095)
    expected = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 2048 - 1024
    np.testing.assert_allclose(xray.pixels, expected, atol=1e-2)


def test_window_applies_after_rescale(tmp_path):
    # Stored 0..4095, rescaled to -1000..3095; a window in rescaled units.
    path = write(tmp_path, bits=12, rescale=(1.0, -1000.0), window=(500.0, 2000.0))
    stored = np.rint(UNIT * 4095) - 1000
    expected = np.clip((stored - 499.5) / 1999 + 0.5, 0, 1) * 2048 - 1024
    np.testing.assert_allclose(read_xray(path), expected, atol=1e-2)


def test_sigmoid_window(tmp_path):
    ds = chest_dataset(UNIT, bits=12, window=(2000.0, 800.0))
    ds.VOILUTFunction = "SIGMOID"
    path = write_dicom(ds, tmp_path / "s.dcm")
    stored = np.rint(UNIT * 4095)
    expected = 1 / (1 + np.exp(-4 * (stored - 2000) / 800)) * 2048 - 1024
    np.testing.assert_allclose(read_xray(path), expected, atol=1e-2)


def test_voi_lut_sequence(tmp_path):
    """A VOI LUT (a gamma curve, 10-bit output) is used in preference to the window and normalised by its range."""
    ds = chest_dataset(
        UNIT, bits=12, window=(100.0, 10.0)
    )  # a window that would clip everything: must be ignored
    n_entries = 4096
    lut = np.rint((np.arange(n_entries) / (n_entries - 1)) ** 0.5 * 1023).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [n_entries, 0, 16]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    path = write_dicom(ds, tmp_path / "lut.dcm")
    xray = read_xray_with_meta(path)
    assert xray.intensity == "voi-lut"
    expected = lut[np.rint(UNIT * 4095).astype(int)] / 1023 * 2048 - 1024
    np.testing.assert_allclose(xray.pixels, expected, atol=1e-2)


def test_no_voi_narrow_data_uses_the_data_range(tmp_path):
    """12-bit data in a 16-bit container (BitsStored 16) fills 1/16 of the range: normalised by its own range."""
    ds = chest_dataset(UNIT, bits=12)
    ds.BitsStored, ds.HighBit = 16, 15
    xray = read_xray_with_meta(write_dicom(ds, tmp_path / "narrow.dcm"))
    assert xray.intensity == "data-range"
    stored = np.rint(UNIT * 4095)
    expected = (stored - stored.min()) / (stored.max() - stored.min()) * 2048 - 1024
    np.testing.assert_allclose(xray.pixels, expected, atol=1e-2)
    assert read_xray_with_meta(write(tmp_path, bits=12)).intensity == "bits-stored"


def test_signed_data(tmp_path):
    a = read_xray(write(tmp_path, "u.dcm", bits=12))
    b = read_xray(write(tmp_path, "s.dcm", bits=12, signed=True))
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_metadata(tmp_path):
    xray = read_xray_with_meta(write(tmp_path, view="AP", body_part="CHEST"))
    assert xray.view_position == "AP" and xray.body_part == "CHEST" and xray.modality == "DX"
    assert xray.pixel_spacing == (0.139, 0.139)
    assert xray.shape == (48, 40) and xray.bits_stored == 12 and xray.patient_orientation == ("L", "F")


# --------------------------------------------------------------------------------------------------- codecs


def _encode(tmp_path, syntax) -> object:
    src = write(tmp_path, "plain.dcm", bits=12, photometric="MONOCHROME1")
    dst = tmp_path / f"enc_{syntax.name[:12].replace(' ', '_')}.dcm"
    if syntax == JPEG2000Lossless:
        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless)  # pydicom's own encoder (pylibjpeg-openjpeg)
        write_dicom(ds, dst)
        return src, dst
    try:
        transcode_with_gdcm(src, dst, str(syntax))
    except (ImportError, RuntimeError) as exc:  # pragma: no cover - depends on the installed gdcm
        pytest.skip(f"python-gdcm cannot encode {syntax.name} here: {exc}")
    return src, dst


@pytest.mark.parametrize(
    "syntax",
    [JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless],
    ids=["jpeg2000", "jpeg-lossless", "jpeg-ls", "rle"],
)
def test_compressed_encodings_decode_to_the_same_image(tmp_path, syntax):
    src, dst = _encode(tmp_path, syntax)
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_xray(dst), read_xray(src))


@pytest.mark.parametrize(
    "syntax,package",
    [
        (JPEGLSLossless, "python-gdcm"),
        (JPEGLosslessSV1, "python-gdcm"),
        (JPEG2000Lossless, "pylibjpeg-openjpeg"),
    ],
)
def test_missing_decoder_names_the_package(tmp_path, monkeypatch, syntax, package):
    _src, dst = _encode(tmp_path, syntax)
    monkeypatch.setattr(get_decoder(syntax), "_available", {})  # as if no plugin were installed
    with pytest.raises(InvalidImageError, match=f"no decoder installed; install {package}"):
        read_xray(dst)


def test_unknown_transfer_syntax(tmp_path):
    data = write(tmp_path, bits=12).read_bytes()
    explicit = b"1.2.840.10008.1.2.1\x00"
    assert explicit in data
    path = tmp_path / "odd.dcm"
    path.write_bytes(data.replace(explicit, b"1.2.826.0.1.2345.67\x00", 1))  # same length: a private syntax
    with pytest.raises(InvalidImageError, match="unsupported transfer syntax 1.2.826.0.1.2345.67"):
        read_xray(path)


# ------------------------------------------------------------------------------------------------ bad input


def _no_pixel_object(sop_class: str, modality: str) -> Dataset:
    fm = FileMetaDataset()
    fm.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


@pytest.mark.parametrize(
    "sop_class,modality,name",
    [
        ("1.2.840.10008.5.1.4.1.1.88.11", "SR", "Basic Text SR"),
        ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN", "RT Plan"),
    ],
)
def test_objects_without_pixel_data(tmp_path, sop_class, modality, name):
    path = write_dicom(_no_pixel_object(sop_class, modality), tmp_path / "x.dcm")
    with pytest.raises(InvalidImageError, match=f"no pixel data .*{name}"):
        read_xray(path)


def test_not_dicom(tmp_path):
    (tmp_path / "a.dcm").write_text("hello, not a DICOM\n" * 20)
    with pytest.raises(InvalidImageError, match="not a DICOM file"):
        read_xray(tmp_path / "a.dcm")
    (tmp_path / "b.dcm").write_bytes(bytes(128) + b"DICM" + b"\xff" * 7)
    with pytest.raises(InvalidImageError):
        read_xray(tmp_path / "b.dcm")


def test_colour_dicom_rejected_and_grey_rgb_accepted(tmp_path):
    grey = np.rint(UNIT * 255).astype(np.uint8)
    for name, rgb in (
        ("colour", np.stack([grey, 255 - grey, grey // 3], -1)),
        ("grey", np.stack([grey] * 3, -1)),
    ):
        ds = chest_dataset(UNIT, bits=8)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelData = rgb.tobytes()
        write_dicom(ds, tmp_path / f"{name}.dcm")
    with pytest.raises(InvalidImageError, match="colour data"):
        read_xray(tmp_path / "colour.dcm")
    np.testing.assert_allclose(
        read_xray(tmp_path / "grey.dcm"), read_xray(write(tmp_path, "g8.dcm", bits=8)), atol=1e-3
    )
    ds = chest_dataset(UNIT, bits=8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(InvalidImageError, match="PALETTE COLOR"):
        read_xray(write_dicom(ds, tmp_path / "pal.dcm"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"modality": "CT"}, "Modality CT"),
        ({"modality": "MG"}, "Modality MG"),
        ({"body_part": "ABDOMEN"}, "BodyPartExamined is 'ABDOMEN'"),
        ({"body_part": "SKULL"}, "BodyPartExamined is 'SKULL'"),
    ],
)
def test_not_a_chest(tmp_path, kwargs, match):
    with pytest.raises(InvalidImageError, match=f"not a chest radiograph: {match}"):
        read_xray(write(tmp_path, **kwargs))


def test_body_part_rule():
    for ok in ("CHEST", "Thorax", "", "PORT CHEST", "CHEST_ABDOMEN", "UNKNOWN", "PORTABLE"):
        assert body_part_is_chest(ok), ok
    for bad in ("ABDOMEN", "SKULL", "L-SPINE", "HAND", "KNEE", "PELVIS"):
        assert not body_part_is_chest(bad), bad
    # and no body part at all reads fine
    assert read_dicom.__name__


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_files(tmp_path):
    data = write(tmp_path, bits=12).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 1000])
    with pytest.raises(InvalidImageError, match="truncated"):
        read_xray(tmp_path / "cut.dcm")
    (tmp_path / "cut_header.dcm").write_bytes(data[:200])
    with pytest.raises(InvalidImageError):
        read_xray(tmp_path / "cut_header.dcm")
    _src, j2k = _encode(tmp_path, JPEG2000Lossless)
    data = j2k.read_bytes()
    (tmp_path / "cut_j2k.dcm").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InvalidImageError, match="truncated|corrupt"):
        read_xray(tmp_path / "cut_j2k.dcm")


def test_multi_frame_and_blank(tmp_path):
    ds = chest_dataset(UNIT, bits=12)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(InvalidImageError, match="multi-frame"):
        read_xray(write_dicom(ds, tmp_path / "mf.dcm"))
    with pytest.raises(InvalidImageError, match="blank image"):
        read_xray(write_dicom(chest_dataset(np.full((16, 16), 0.5)), tmp_path / "blank.dcm"))


# ---------------------------------------------------------------------------------------------- JPG-compatible


def test_jpg_compatible_mode(tmp_path):
    m2 = write(tmp_path, "m2.dcm", bits=12, photometric="MONOCHROME2", window=(1000.0, 500.0))
    m1 = write(tmp_path, "m1.dcm", bits=12, photometric="MONOCHROME1")
    a = read_xray_with_meta(m2, jpg_compatible=True)
    b = read_xray(m1, jpg_compatible=True)
    assert a.intensity == "jpg-compatible"
    np.testing.assert_array_equal(a.pixels, b)  # the window is ignored, MONOCHROME1 is inverted
    assert a.pixels.min() == -1024 and a.pixels.max() == 1024
    # monotonic in the stored values: equalisation reorders nothing
    stored = np.rint(UNIT * 4095).ravel()
    order = np.argsort(stored, kind="stable")
    assert np.all(np.diff(a.pixels.ravel()[order]) >= 0)
    # the MIMIC-CXR-JPG recipe, written out: min-max to 8 bits, equalise
    u8 = np.rint((stored - stored.min()) / (stored.max() - stored.min()) * 255).astype(np.uint8)
    hist = np.bincount(u8, minlength=256)
    cdf = np.cumsum(hist)
    cmin = cdf[np.flatnonzero(hist)[0]]
    eq = np.rint((cdf[u8] - cmin) / (cdf[-1] - cmin) * 255)
    np.testing.assert_allclose(a.pixels.ravel(), eq / 255 * 2048 - 1024, atol=1e-3)

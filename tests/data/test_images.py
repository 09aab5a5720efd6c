"""Reading PNG/JPG/real DICOM into [-1024, 1024], orientation, resizing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medvl.data.dicom import equalize_histogram_u8, write_dicom
from medvl.data.images import ResizeFit, read_xray, read_xray_with_meta, resize_geometry, resize_xray
from medvl.data.testing import MARKER_BOX, chest_dataset, synthetic_chest, write_jpg, write_png
from medvl.data.xray import check_xray_range
from medvl.errors import InvalidImageError


def lung_and_mediastinum(img: np.ndarray) -> tuple[float, float]:
    """Medians of the two lateral-third lung fields (mid height) and of the central strip."""
    h, w = img.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    lungs = np.concatenate(
        [img[rows, int(0.12 * w) : int(0.3 * w)].ravel(), img[rows, int(0.7 * w) : int(0.88 * w)].ravel()]
    )
    centre = img[rows, int(0.45 * w) : int(0.55 * w)]
    return float(np.median(lungs)), float(np.median(centre))


def marker_contrast(img: np.ndarray) -> float:
    """Mean of the top-left marker box minus the mirrored top-right box (positive: marker still on the left)."""
    h, w = img.shape
    x0, y0, x1, y1 = MARKER_BOX
    rows = slice(int(y0 * h) + 1, max(int(y1 * h) - 1, int(y0 * h) + 2))
    left = img[rows, int(x0 * w) + 1 : max(int(x1 * w) - 1, int(x0 * w) + 2)]
    right = img[rows, w - max(int(x1 * w) - 1, int(x0 * w) + 2) : w - int(x0 * w) - 1]
    return float(left.mean() - right.mean())


# -------------------------------------------------------------------------------------------------- real files


def test_real_dicom_lungs_darker_than_mediastinum(real_fixtures):
    xray = read_xray_with_meta(real_fixtures / "RG1_J2KI.dcm")
    img = xray.pixels
    assert img.dtype == np.float32 and img.shape == (1955, 1841)
    assert -1024 <= img.min() and img.max() <= 1024
    lungs, mediastinum = lung_and_mediastinum(img)
    assert lungs < mediastinum - 200, (lungs, mediastinum)
    assert xray.photometric == "MONOCHROME1" and xray.view_position == "PA" and xray.body_part == "CHEST"
    assert xray.bits_stored == 15 and xray.intensity == "window"
    assert xray.pixel_spacing is None  # the file says 0.000\0.000
    assert xray.patient_orientation == ("L", "F")
    assert "JPEG 2000" in xray.transfer_syntax


def test_real_dicom_jpg_compatible_mode(real_fixtures):
    img = read_xray(real_fixtures / "RG1_J2KI.dcm", jpg_compatible=True)
    lungs, mediastinum = lung_and_mediastinum(img)
    assert lungs < mediastinum - 200
    assert img.min() == -1024 and img.max() == 1024
    # histogram equalisation: each quarter of the range holds roughly a quarter of the pixels
    counts = np.histogram(img, bins=4, range=(-1024, 1024))[0] / img.size
    assert np.all(np.abs(counts - 0.25) < 0.08), counts


@pytest.mark.parametrize("name", ["nih_00000001_000.png", "nih_00027426_000.png"])
def test_nih_png(real_fixtures, name):
    path = real_fixtures / name
    img = read_xray(path)
    raw = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.shape == raw.shape == (512, 512)
    np.testing.assert_allclose(img, raw / 255 * 2048 - 1024, atol=1e-3)  # exact, untransposed
    lungs, mediastinum = lung_and_mediastinum(img)
    assert lungs < mediastinum - 200


@pytest.mark.parametrize("fmt", ["png", "jpg", "dcm-mono1", "dcm-mono2"])
def test_orientation_survives_reading_and_resizing(real_fixtures, tmp_path, fmt):
    """An asymmetric, non-square version of a real NIH image keeps its sides through reading and resizing."""
    unit = np.asarray(Image.open(real_fixtures / "nih_00000001_000.png").convert("L"), dtype=np.float64) / 255
    unit = unit[:, 40:440].copy()  # 512 x 400: a transpose would change the shape
    h, w = unit.shape
    x0, y0, x1, y1 = MARKER_BOX
    unit[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = 1.0
    if fmt == "png":
        path = write_png(tmp_path / "a.png", unit)
    elif fmt == "jpg":
        path = write_jpg(tmp_path / "a.jpg", unit)
    else:
        path = write_dicom(chest_dataset(unit, photometric="MONOCHROME" + fmt[-1]), tmp_path / "a.dcm")
    img = read_xray(path)
    assert img.shape == (512, 400)
    assert marker_contrast(img) > 800
    small = resize_xray(img, 64)
    assert small.shape == (64, 64)
    geom = resize_geometry(img.shape, 64)
    top, left = geom.offset
    inner = small[top : top + geom.resized[0], left : left + geom.resized[1]]
    assert marker_contrast(inner) > 400


# -------------------------------------------------------------------------------------------------- PNG / JPG


def test_sixteen_bit_png_scaled_by_its_bit_depth(tmp_path):
    unit = synthetic_chest(40, 32)
    path = write_png(tmp_path / "a.png", unit, bits=12)
    xray = read_xray_with_meta(path)
    assert xray.intensity == "16-bit/4095"
    np.testing.assert_allclose(xray.pixels, np.rint(unit * 4095) / 4095 * 2048 - 1024, atol=1e-2)


def test_grey_saved_as_rgb_is_accepted_and_colour_is_not(tmp_path):
    unit = synthetic_chest(40, 32)
    grey = (unit * 255).round().astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_allclose(
        read_xray(tmp_path / "grey_rgb.png"), read_xray(write_png(tmp_path / "g.png", unit))
    )
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey_rgb.jpg", quality=90)
    assert read_xray(tmp_path / "grey_rgb.jpg").shape == (40, 32)
    colour = np.stack([grey, 255 - grey, grey // 2], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(InvalidImageError, match="colour image"):
        read_xray(tmp_path / "colour.png")
    Image.fromarray(grey > 128).save(tmp_path / "mask.png")
    with pytest.raises(InvalidImageError, match="1-bit"):
        read_xray(tmp_path / "mask.png")


def test_bad_raster_files(tmp_path):
    (tmp_path / "text.png").write_text("this is not an image\n" * 20)
    with pytest.raises(InvalidImageError, match="not an image"):
        read_xray(tmp_path / "text.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty file"):
        read_xray(tmp_path / "empty.jpg")
    data = write_jpg(tmp_path / "full.jpg", synthetic_chest(200, 160)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="truncated JPEG"):
        read_xray(tmp_path / "cut.jpg")
    with pytest.raises(InvalidImageError, match="directory"):
        read_xray(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_xray(tmp_path / "nope.png")
    # Every InvalidImageError is a ValueError, so callers that only know the standard library still catch it.
    assert issubclass(InvalidImageError, ValueError)


def test_jpeg_draft_decode_is_reduced_and_close_to_full_decode(tmp_path):
    path = write_jpg(tmp_path / "big.jpg", synthetic_chest(1200, 1000, seed=3))
    reduced = read_xray_with_meta(path, min_side=128)
    full = read_xray_with_meta(path)
    assert full.pixels.shape == (1200, 1000) and reduced.shape == (1200, 1000)
    assert reduced.pixels.shape == (300, 250)  # libjpeg's 1/4 scale: both sides stay >= 128
    a = resize_xray(reduced.pixels, 128, source_shape=reduced.shape)
    b = resize_xray(full.pixels, 128)
    assert np.abs(a - b).mean() < 8.0  # 0.4% of the range
    assert marker_contrast(a[:, 11:117]) > 800


# ------------------------------------------------------------------------------------------------------ resize


def test_resize_pads_and_keeps_aspect():
    img = np.full((100, 50), 1024.0, dtype=np.float32)
    out = resize_xray(img, 40)
    geom = resize_geometry((100, 50), 40)
    assert geom.resized == (40, 20) and geom.offset == (0, 10)
    assert np.all(out[:, :10] == -1024) and np.all(out[:, 30:] == -1024)
    np.testing.assert_allclose(out[:, 10:30], 1024, atol=1e-3)
    assert geom.map_box(0, 0, 1, 1) == (0.25, 0.0, 0.75, 1.0)


def test_resize_crop_mode():
    img = np.linspace(-1024, 1024, 100 * 50, dtype=np.float32).reshape(100, 50)
    out = resize_xray(img, 40, fit=ResizeFit.CROP)
    geom = resize_geometry((100, 50), 40, "crop")
    assert geom.resized == (80, 40) and geom.offset == (-20, 0)
    assert out.shape == (40, 40) and out.min() > -1024 and out.max() < 1024  # the ends are cropped away
    assert geom.map_box(0, 0.5, 1, 0.5) == (0.0, 0.5, 1.0, 0.5)


def test_resize_is_anti_aliased():
    """A one-pixel checkerboard must average to grey, not alias into stripes or noise."""
    yy, xx = np.mgrid[0:512, 0:512]
    checker = np.where((yy + xx) % 2 == 0, 1024.0, -1024.0).astype(np.float32)
    out = resize_xray(checker, 64)
    assert np.abs(out).max() < 40, np.abs(out).max()
    assert -1024 <= resize_xray(synthetic_chest(300, 300).astype(np.float32) * 2048 - 1024, 37).min()


def test_range_check_warns_on_misnormalised_arrays():
    with pytest.warns(UserWarning, match="outside"):
        check_xray_range(np.array([0.0, 255.0 * 40]))
    with pytest.warns(UserWarning, match="spans only"):
        check_xray_range(np.array([0.0, 1.0]))


def test_equalize_histogram_u8():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(100, 10, (64, 64)), 0, 255).astype(np.uint8)
    eq = equalize_histogram_u8(img)
    assert eq.min() == 0 and eq.max() == 255
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(eq.ravel()[order].astype(int)) >= 0)  # monotonic in the input
    np.testing.assert_array_equal(equalize_histogram_u8(np.full((4, 4), 7, np.uint8)), 7)

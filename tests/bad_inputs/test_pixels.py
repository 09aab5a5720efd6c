"""Non-finite and degenerate images in every format: NaN / infinity in DICOM numbers or float TIFFs, images
under the minimum size and constant images are InvalidImageErrors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medvl.data.images import read_xray
from medvl.data.testing import synthetic_chest, write_jpg, write_png
from medvl.data.xray import MIN_SIDE
from medvl.errors import InvalidImageError

from .makers import chest_dicom, edited_dicom


def _refused(path, *says):
    with pytest.raises(InvalidImageError) as info:
        read_xray(path)
    assert type(info.value) is InvalidImageError
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for text in says:
        assert text in message, message
    return message


@pytest.mark.parametrize(
    "keyword,value",
    [
        ("RescaleSlope", "nan"),
        ("RescaleSlope", "inf"),
        ("RescaleIntercept", "-inf"),
        ("WindowCenter", "nan"),
        ("WindowWidth", "inf"),
    ],
)
def test_non_finite_dicom_numbers(tmp_path, keyword, value):
    def edit(ds):
        ds.WindowCenter, ds.WindowWidth = 2000, 3000
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        setattr(ds, keyword, value)

    _refused(edited_dicom(tmp_path / "x.dcm", edit), keyword, "not a finite number")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_non_finite_pixels(tmp_path, bad):
    arr = synthetic_chest(48, 40).astype(np.float32)
    arr[10, 10] = bad
    path = tmp_path / "float.tif"
    Image.fromarray(arr, mode="F").save(path)
    _refused(path, "not finite")
    arr[10, 10] = 0.5
    Image.fromarray(arr, mode="F").save(path)
    assert np.isfinite(read_xray(path)).all()


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (MIN_SIDE - 1, 40), (40, MIN_SIDE - 1)])
@pytest.mark.parametrize("fmt", ["dcm", "png", "jpg", "tif"])
def test_images_under_the_minimum_size(tmp_path, shape, fmt):
    unit = np.linspace(0.1, 0.9, shape[0] * shape[1]).reshape(shape)
    path = tmp_path / f"small.{fmt}"
    if fmt == "dcm":
        chest_dicom(path, unit)
    elif fmt == "png":
        write_png(path, unit)
    elif fmt == "jpg":
        write_jpg(path, unit)
    else:
        Image.fromarray(np.rint(unit * 255).astype(np.uint8)).save(path)
    _refused(path, f"minimum of {MIN_SIDE} pixels")


@pytest.mark.parametrize("fmt", ["dcm", "png", "png16", "jpg", "tif", "tif-float", "bmp"])
def test_constant_images(tmp_path, fmt):
    flat = np.full((48, 40), 0.4)
    path = tmp_path / f"blank.{fmt.split('-')[0].replace('png16', 'png')}"
    if fmt == "dcm":
        chest_dicom(path, flat)
    elif fmt == "png":
        write_png(path, flat)
    elif fmt == "png16":
        write_png(path, flat, bits=12)
    elif fmt == "jpg":
        write_jpg(path, flat)
    elif fmt == "tif-float":
        Image.fromarray(flat.astype(np.float32), mode="F").save(path)
    else:
        Image.fromarray(np.rint(flat * 255).astype(np.uint8)).save(path)
    _refused(path, "blank image")

"""DICOM chest X-rays to medvl's intensity convention (float32 (H, W), [-1024, 1024], lungs dark).

The pipeline (docs/design.md section 7), with pydicom 3's ``pydicom.pixels`` API:

1. decode any transfer syntax an installed plugin handles: python-gdcm for JPEG Lossless, JPEG-LS and JPEG
   baseline/extended; pylibjpeg-openjpeg (or gdcm) for JPEG 2000 and HTJ2K; RLE and uncompressed need nothing;
2. the modality LUT (rescale slope/intercept or a Modality LUT Sequence);
3. the VOI transform: a VOI LUT Sequence if present, else the first Window Center/Width (LINEAR, LINEAR_EXACT or
   SIGMOID); an invalid window is ignored with a note;
4. the result scaled to [0, 1] by that transform's own output range (the LUT's values or the window). Without a
   VOI transform: by the range ``BitsStored`` allows (through the rescale or Modality LUT), unless the data fill
   less than half of it (16-bit containers holding 12-bit data), then by the data range (min-max). Never by
   65535 for its own sake. So a DICOM copy of an 8-bit JPG stored as ``value * 4095 / 255`` with BitsStored 12
   reads the same as the JPG;
5. MONOCHROME1 inverted *after* the VOI transform (``apply_presentation_lut`` does not invert);
6. ``x * 2048 - 1024``.

Steps 2-6 are evaluated once per distinct stored value and gathered (an exact lookup table over the data's
integer range), which is several times faster than running them on every pixel of a 3000 x 2500 film.

``jpg_compatible=True`` instead follows how MIMIC-CXR-JPG was made: the modality-LUT values min-max scaled to
8 bits, MONOCHROME1 inverted, histogram equalisation (OpenCV's ``equalizeHist`` formula), then ``/ 255``.

What is rejected, each with :class:`~medvl.errors.InvalidImageError` saying why:

* not DICOM, a truncated file, pixel data that will not decode (naming the package that would decode its codec);
* no pixel data (structured reports, RT plans, presentation states, key-object notes...);
* colour data (RGB / YBR / palette whose channels differ; a grey image stored as RGB is accepted);
* multi-frame objects (a chest radiograph has one frame);
* a declared size over :data:`~medvl.data.xray.MAX_SIDE` pixels a side (from ``Rows`` / ``Columns``, and from the
  JPEG 2000 or JPEG codestream's own header) or under :data:`~medvl.data.xray.MIN_SIDE`, refused before anything
  is decoded; a deflated file is inflated in a stream, header first, and refused as soon as it inflates past what
  its header declares;
* missing or malformed ``Rows``, ``Columns``, ``BitsAllocated``, ``SamplesPerPixel``, ``NumberOfFrames``;
  ``RescaleSlope`` / ``RescaleIntercept`` / ``WindowCenter`` / ``WindowWidth`` that are not finite numbers; pixels
  that come out non-finite or all one value;
* not a chest radiograph: ``Modality`` other than a projection-radiograph modality (CR, DX, DR, RG, and SC / OT /
  missing for secondary captures), or ``BodyPartExamined`` that names a non-chest part (e.g. ABDOMEN, SKULL,
  HAND, KNEE, PELVIS) and nothing chest-like (CHEST, THORAX, LUNG, RIB...). An empty, missing or unknown body part
  (e.g. "PORTABLE", "UNKNOWN") is accepted: many real chest films leave it blank.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medvl.data.dicom_header import (
    check_codestream_size,
    check_deflated,
    check_numbers,
    geometry,
    has_pixel_data_tag,
)
from medvl.data.xray import ImageFormat, XRay, check_pixels, check_regular_file, invalid
from medvl.errors import InvalidImageError

#: Projection radiography (CR computed, DX digital, DR vendor spelling, RG radiographic imaging) and the
#: modalities secondary captures and synthetic images use.
CHEST_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "SC", "OT", ""})
_CHEST_WORDS = ("CHEST", "THORA", "LUNG", "RIB", "STERN", "TORSO", "TRUNK", "BODY")
_NOT_CHEST_WORDS = (
    "HEAD",
    "SKULL",
    "BRAIN",
    "FACE",
    "SINUS",
    "NECK",
    "SPINE",
    "ABD",
    "PELVIS",
    "HIP",
    "KNEE",
    "LEG",
    "FOOT",
    "FEET",
    "ANKLE",
    "TOE",
    "HAND",
    "FINGER",
    "WRIST",
    "ARM",
    "ELBOW",
    "FOREARM",
    "HUMERUS",
    "FEMUR",
    "TIBIA",
    "FIBULA",
    "EXTREMITY",
    "BREAST",
    "DENTAL",
    "TEETH",
    "JAW",
    "MANDIBLE",
    "ORBIT",
    "SHOULDER",
    "CLAVICLE",
    "KIDNEY",
    "BLADDER",
    "COLON",
)

#: Which pip package decodes which compressed transfer syntax (pylibjpeg-libjpeg is GPL: never suggested).
_CODEC_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "python-gdcm",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "python-gdcm",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "python-gdcm",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "python-gdcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "python-gdcm",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "python-gdcm",  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg (with pylibjpeg) or python-gdcm",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg (with pylibjpeg) or python-gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg (with pylibjpeg)",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg (with pylibjpeg)",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg (with pylibjpeg)",  # HTJ2K
    "1.2.840.10008.1.2.5": "pydicom's own RLE decoder (numpy)",  # RLE Lossless
}


def read_dicom(path: str | Path, *, jpg_compatible: bool = False) -> XRay:
    """Read a DICOM chest X-ray; see the module docstring for the pipeline and what is rejected.

    Every failure is an :class:`~medvl.errors.InvalidImageError` naming ``path`` (an
    :class:`~medvl.errors.ImageNotFoundError` for a missing file).
    """
    path = Path(path)
    check_regular_file(path)
    try:
        return _read_dicom(path, jpg_compatible)
    except InvalidImageError:
        raise
    except MemoryError:
        raise invalid(path, "not enough memory to decode this DICOM file") from None
    except Exception as exc:  # pydicom and its plugins raise assorted errors on damaged files
        raise invalid(path, f"corrupt or unusable DICOM file ({type(exc).__name__}: {exc})") from None


def _read_dicom(path: Path, jpg_compatible: bool) -> XRay:
    ds = _open(path)
    _check_is_chest_image(path, ds)
    check_numbers(path, ds)
    raw = _decode(path, ds)
    meta = _metadata(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    raw, photometric = _to_grey(path, raw, photometric)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise invalid(path, "the pixel data hold values that are not finite (NaN or infinity)")
    if raw.size and raw.min() == raw.max():
        raise invalid(path, "blank image: every pixel has the same value")
    if jpg_compatible:
        pixels, how = _jpg_compatible(path, ds, raw, photometric)
    else:
        pixels, how, note = _display_pipeline(path, ds, raw, photometric)
        if note:
            meta["notes"].append(note)
    check_pixels(path, pixels)
    return XRay(
        pixels=pixels,
        path=path,
        format=ImageFormat.DICOM,
        shape=(int(raw.shape[0]), int(raw.shape[1])),
        photometric=photometric,
        intensity=how,
        **meta,
    )


# ----------------------------------------------------------------------------------------------- open and check


def _open(path: Path) -> pydicom.Dataset:
    check_deflated(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise invalid(path, f"not a DICOM file ({exc})") from None
    except (EOFError, OSError) as exc:
        raise invalid(path, f"truncated or unreadable DICOM file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # pydicom raises assorted errors on damaged headers
        raise invalid(path, f"truncated or corrupt DICOM header ({type(exc).__name__}: {exc})") from None
    return ds


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if not uid:
        return "unknown SOP class"
    name = UID(str(uid)).name
    return name if name and name != str(uid) else f"SOP class {uid}"


def body_part_is_chest(body_part: str) -> bool:
    """False only when ``BodyPartExamined`` names a non-chest part and nothing chest-like."""
    squashed = re.sub(r"[^A-Z]", "", body_part.upper())
    if not squashed or any(w in squashed for w in _CHEST_WORDS):
        return True
    return not any(w in squashed for w in _NOT_CHEST_WORDS)


def _check_is_chest_image(path: Path, ds: pydicom.Dataset) -> None:
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if not other and has_pixel_data_tag(path):
            raise invalid(
                path,
                "truncated or damaged pixel data: the file holds a Pixel Data element pydicom cannot read",
            )
        what = f"only {other[0]}, " if other else ""
        sop = _sop_class_name(ds)
        if not other and "Image Storage" in sop:
            raise invalid(path, f"no pixel data although it is a {sop} object: a truncated or damaged file")
        raise invalid(path, f"no pixel data ({what}{sop}): not an image")
    if not ds.PixelData:
        raise invalid(path, "the Pixel Data element is empty: a truncated or damaged file")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in CHEST_MODALITIES:
        raise invalid(path, f"not a chest radiograph: Modality {modality} (accepted: CR, DX, DR, RG, SC, OT)")
    body_part = str(ds.get("BodyPartExamined", "") or "")
    if not body_part_is_chest(body_part):
        raise invalid(path, f"not a chest radiograph: BodyPartExamined is {body_part.strip()!r}")
    _rows, _columns, _bits, samples, frames = geometry(path, ds)
    if frames > 1:
        raise invalid(path, f"multi-frame object ({frames} frames): a chest radiograph has one frame")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        raise invalid(
            path, "colour data (PhotometricInterpretation PALETTE COLOR): a chest X-ray is greyscale"
        )
    if samples not in (1, 3):
        raise invalid(path, f"{samples} samples per pixel: not a greyscale image")


# ------------------------------------------------------------------------------------------------------- decode


def _decode(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        raise invalid(
            path, "no Transfer Syntax UID in the file meta information: cannot decode the pixel data"
        )
    tsyntax = UID(str(tsyntax))
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise invalid(
            path,
            f"unsupported transfer syntax {tsyntax} ({tsyntax.name}): no DICOM pixel decoder exists for it",
        ) from None
    if not decoder.is_available:
        package = _CODEC_PACKAGES.get(str(tsyntax), "a pydicom pixel-data plugin")
        raise invalid(
            path, f"cannot decode {tsyntax.name} pixel data: no decoder installed; install {package}"
        )
    if tsyntax.is_compressed:
        check_codestream_size(path, ds)
    else:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.BitsAllocated)
            // 8
        )
        have = len(ds.PixelData)
        if have < expected:
            raise invalid(path, f"truncated file: pixel data has {have} of {expected} bytes")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise invalid(
            path,
            f"could not decode {tsyntax.name} pixel data; the file may be truncated or corrupt "
            f"({type(exc).__name__}: {exc})",
        ) from None
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise invalid(path, f"decoded pixel data has shape {arr.shape}, expected (rows, columns)")
    return arr


def _to_grey(path: Path, arr: np.ndarray, photometric: str) -> tuple[np.ndarray, str]:
    """(H, W) greyscale, or (H, W, 3) colour whose channels agree -> (H, W); real colour raises."""
    if arr.ndim == 2:
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            # Single-sample data labelled otherwise: treat as MONOCHROME2, the common case.
            photometric = "MONOCHROME2"
        return arr, photometric
    spread = arr.max(axis=-1).astype(np.int64) - arr.min(axis=-1).astype(np.int64)
    limit = max(1, int(arr.max()) // 25)  # a few levels of rounding noise from YBR conversion
    if float(np.percentile(spread, 99)) > limit:
        raise invalid(
            path,
            f"colour data (PhotometricInterpretation {photometric or 'RGB'}, channels differ by "
            f"up to {int(spread.max())}): a chest X-ray is greyscale",
        )
    return arr[..., 0], "MONOCHROME2"


def _metadata(ds: pydicom.Dataset) -> dict:
    spacing = None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2:
            try:
                pair = (float(value[0]), float(value[1]))
            except (TypeError, ValueError):
                continue
            if pair[0] > 0 and pair[1] > 0:
                spacing = pair
                break
    orientation = ds.get("PatientOrientation") or ()
    if isinstance(orientation, str):
        orientation = (orientation,)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "view_position": str(ds.get("ViewPosition", "") or "").strip().upper(),
        "body_part": str(ds.get("BodyPartExamined", "") or "").strip().upper(),
        "modality": str(ds.get("Modality", "") or "").strip().upper(),
        "pixel_spacing": spacing,
        "bits_stored": int(ds.BitsStored) if "BitsStored" in ds else None,
        "patient_orientation": tuple(str(o) for o in orientation),
        "transfer_syntax": UID(str(tsyntax)).name if tsyntax else "",
        "notes": [],
    }


# --------------------------------------------------------------------------------------------------- intensity


def _value_table(raw: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The distinct-value domain of integer data as (arange(lo, hi + 1), lo), or None when a table does not pay."""
    if raw.dtype.kind not in "iu":
        return None
    lo, hi = int(raw.min()), int(raw.max())
    if hi - lo > (1 << 17):
        return None
    return np.arange(lo, hi + 1, dtype=np.int64), lo


def _gather(table_values: np.ndarray, raw: np.ndarray, lo: int) -> np.ndarray:
    index = raw if lo == 0 and raw.dtype.kind == "u" else (raw.astype(np.int64) - lo)
    return np.take(table_values, index)


def _window(path: Path, ds: pydicom.Dataset, x: np.ndarray) -> np.ndarray | None:
    """The first Window Center/Width applied to ``x`` with output in [0, 1]; None when absent or invalid."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = ds["WindowCenter"].value
        width = ds["WindowWidth"].value
        center = float(center[0] if ds["WindowCenter"].VM > 1 else center)
        width = float(width[0] if ds["WindowWidth"].VM > 1 else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    x = x.astype(np.float64, copy=False)
    if function == "SIGMOID":
        if width <= 0:
            return None
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        return None
    # PS3.3 C.11.2.1.2.1 (LINEAR): centre and width shifted by half a level.
    c, w = center - 0.5, width - 1.0
    if w == 0:
        return (x > c).astype(np.float64)
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def _voi_lut_range(ds: pydicom.Dataset) -> tuple[float, float] | None:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return None
    item = seq[0]
    data = item.get("LUTData")
    if data is None:
        return None
    values = np.asarray(data.value if hasattr(data, "value") else data)
    if values.dtype.kind not in "iuf":
        # pydicom keeps an OW LUT as bytes; read it with the descriptor's bit depth.
        descriptor = item.LUTDescriptor
        values = np.frombuffer(
            bytes(values.tobytes()), dtype=np.uint8 if int(descriptor[2]) <= 8 else np.uint16
        )
    if values.size == 0:
        return None
    return float(values.min()), float(values.max())


def _nominal_range(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The value range the stored bits allow, after the modality LUT (as pydicom's windowing computes it)."""
    try:
        bits = int(ds.BitsStored)
        if ds.get("ModalityLUTSequence"):
            return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
        if int(ds.get("PixelRepresentation", 0)) == 0:
            lo, hi = 0.0, float(2**bits - 1)
        else:
            lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return (lo, hi) if hi > lo else None


def _display_pipeline(
    path: Path, ds: pydicom.Dataset, raw: np.ndarray, photometric: str
) -> tuple[np.ndarray, str, str]:
    table = _value_table(raw)
    domain = table[0] if table is not None else raw
    modality_out = apply_modality_lut(domain, ds)
    values = modality_out.astype(np.float64, copy=False)
    note = ""
    unit: np.ndarray | None = None
    how = ""
    lut_range = _voi_lut_range(ds)
    if lut_range is not None:
        try:
            # A VOI LUT is indexed by (integer) values; pydicom warns on float input that is not integral.
            voi_in = np.rint(values).astype(np.int64) if np.all(values == np.rint(values)) else modality_out
            lut_out = apply_voi(voi_in, ds, index=0).astype(np.float64)
            lo, hi = lut_range
            if hi > lo:
                unit, how = (lut_out - lo) / (hi - lo), "voi-lut"
        except Exception as exc:
            note = f"VOI LUT Sequence unusable ({exc}); used the window or the data range"
    if unit is None:
        unit = _window(path, ds, values)
        if unit is not None:
            how = "window"
        elif "WindowCenter" in ds or "WindowWidth" in ds:
            note = note or "invalid Window Center/Width; used the data range"
    if unit is None:
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            raise invalid(path, "blank image: every pixel has the same value")
        nominal = _nominal_range(ds)
        if nominal is not None and hi - lo >= 0.5 * (nominal[1] - nominal[0]):
            lo, hi = nominal
            unit, how = (values - lo) / (hi - lo), "bits-stored"
        else:
            unit, how = (values - lo) / (hi - lo), "data-range"
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # after VOI, as DICOM's presentation pipeline does
    scaled = (np.clip(unit, 0.0, 1.0) * 2048.0 - 1024.0).astype(np.float32)
    pixels = _gather(scaled, raw, table[1]) if table is not None else scaled
    return np.ascontiguousarray(pixels, dtype=np.float32), how, note


def _jpg_compatible(
    path: Path, ds: pydicom.Dataset, raw: np.ndarray, photometric: str
) -> tuple[np.ndarray, str]:
    """MIMIC-CXR-JPG's recipe: min-max to uint8, invert MONOCHROME1, histogram equalisation, ``/ 255``."""
    table = _value_table(raw)
    domain = table[0] if table is not None else raw
    values = apply_modality_lut(domain, ds).astype(np.float64, copy=False)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise invalid(path, "blank image: every pixel has the same value")
    u8 = np.rint((values - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        u8 = 255 - u8
    img = _gather(u8, raw, table[1]) if table is not None else u8
    img = equalize_histogram_u8(np.ascontiguousarray(img, dtype=np.uint8))
    pixels = img.astype(np.float32) * np.float32(2048.0 / 255.0) - np.float32(1024.0)
    return pixels, "jpg-compatible"


def equalize_histogram_u8(img: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 image, OpenCV ``equalizeHist``'s formula (MIMIC-CXR-JPG's last step).

    ``lut[v] = round((cdf[v] - cdf_min) / (N - cdf_min) * 255)``; a constant image is returned unchanged.
    """
    if img.dtype != np.uint8:
        raise TypeError(f"equalize_histogram_u8 needs uint8, got {img.dtype}")
    hist = np.bincount(img.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    cdf_min = int(cdf[np.flatnonzero(hist)[0]])
    total = int(cdf[-1])
    if total == cdf_min:
        return img.copy()
    lut = np.rint((cdf - cdf_min) * (255.0 / (total - cdf_min))).clip(0, 255).astype(np.uint8)
    return lut[img]


# ------------------------------------------------------------------------------------------------------ writing


def grey_dicom(
    values: np.ndarray,
    *,
    sop_class: str,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """A single-frame greyscale DICOM dataset, uncompressed (Explicit VR Little Endian), of ``values``
    (rows, columns): integers in ``[0, 2**bits_stored - 1]`` as displayed (bright = dense).

    MONOCHROME1 stores ``max - value``, so both photometrics display the same picture; ``signed`` stores
    ``value - 2**(bits_stored - 1)`` as signed integers; 8 bits allocated up to 8 bits stored, else 16. Sets the
    file meta, the SOP class and instance (``sop_instance_uid``, a fresh one when None) and the image pixel module;
    the caller adds the rest (patient, study, series, equipment, VOI...) and writes it with :func:`write_dicom`.
    """
    maxval = 2**bits_stored - 1
    stored = np.asarray(values).astype(np.int64)
    if photometric == "MONOCHROME1":
        stored = maxval - stored
    if signed:
        stored = stored - 2 ** (bits_stored - 1)
    bits_allocated = 16 if bits_stored > 8 else 8
    dtype = {(16, False): "<u2", (16, True): "<i2", (8, False): "u1", (8, True): "i1"}[
        (bits_allocated, signed)
    ]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype(dtype).tobytes()
    return ds


def write_dicom(ds: pydicom.Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM file (128-byte preamble, ``DICM``, file meta completed by pydicom) to ``path``,
    creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path

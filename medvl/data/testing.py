"""Synthetic files for tests and benchmarks: chest-like images, DICOM writers, and a fake MIMIC-CXR tree.

Nothing here comes from MIMIC: the reports are invented sentences, the ids are made up, the images are drawn.
The MIMIC tree uses the real file layout and the real CSV column names (labels deliberately in the real
alphabetical order, not CheXpert's, so mapping by name is tested).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset

from medvl.data.dicom import grey_dicom, write_dicom
from medvl.data.mimic import METADATA_TABLE_COLUMNS
from medvl.text.chexpert import CHEXPERT_LABELS

#: The "L" side marker the synthetic chest carries in its top-left corner (image coordinates, fractions).
MARKER_BOX = (0.04, 0.04, 0.16, 0.12)  # x0, y0, x1, y1


def synthetic_chest(height: int, width: int, *, seed: int = 0, marker: bool = True) -> np.ndarray:
    """A chest-like (H, W) float64 image in [0, 1] (display values: 0 black air, 1 white bone): dark lung fields,
    a bright mediastinum and heart toward the image's right, a bright diaphragm, ribs, noise, and (``marker``) a
    bright block in the top-left corner that tells left from right."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    img = np.full((height, width), 0.18)
    body = ((x - 0.5) / 0.47) ** 2 + ((y - 0.55) / 0.6) ** 2 < 1
    img[body] = 0.62
    for cx in (0.3, 0.7):
        lung = ((x - cx) / 0.17) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
        img[lung] = 0.22
    img[(np.abs(x - 0.5) < 0.07) & (y > 0.08)] = 0.8  # mediastinum / spine
    heart = ((x - 0.58) / 0.16) ** 2 + ((y - 0.68) / 0.12) ** 2 < 1
    img[heart] = 0.78
    img[y > 0.8 + 0.04 * np.cos((x - 0.5) * 6)] = 0.85  # diaphragm and abdomen
    ribs = (np.sin(y * 40 + 3 * np.abs(x - 0.5)) > 0.85) & body
    img[ribs] += 0.08
    if marker:
        x0, y0, x1, y1 = MARKER_BOX
        img[(x >= x0) & (x < x1) & (y >= y0) & (y < y1)] = 1.0
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0)


def to_u8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)


def write_jpg(path: str | Path, unit: np.ndarray, *, quality: int = 95) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_u8(unit)).save(path, quality=quality)
    return path


def write_png(path: str | Path, unit: np.ndarray, *, bits: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        Image.fromarray(to_u8(unit)).save(path)
    else:
        values = np.rint(np.clip(unit, 0, 1) * (2**bits - 1)).astype(np.uint16)
        Image.fromarray(values).save(path)
    return path


def chest_dataset(
    unit: np.ndarray,
    *,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    window: tuple[float, float] | None = None,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1",
) -> Dataset:
    """An uncompressed DICOM dataset of ``unit`` (display values in [0, 1], lungs dark) stored with ``bits``.

    MONOCHROME1 stores ``max - value`` so that both photometrics display the same picture. ``window`` is
    (center, width) in stored units.
    """
    stored = np.rint(np.clip(unit, 0, 1) * (2**bits - 1)).astype(np.int64)
    ds = grey_dicom(stored, sop_class=sop_class, photometric=photometric, bits_stored=bits, signed=signed)
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.PatientID = "SYNTHETIC"
    ds.PatientOrientation = ["L", "F"]
    ds.PixelSpacing = [0.139, 0.139]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    return ds


def transcode_with_gdcm(src: str | Path, dst: str | Path, transfer_syntax: str) -> Path:
    """Re-encode a DICOM file with python-gdcm (JPEG Lossless, JPEG-LS, JPEG 2000, RLE); pydicom itself has no
    JPEG Lossless or JPEG-LS encoder. Raises RuntimeError when gdcm cannot."""
    import gdcm

    syntaxes = {
        "1.2.840.10008.1.2.4.70": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
        "1.2.840.10008.1.2.4.57": gdcm.TransferSyntax.JPEGLosslessProcess14,
        "1.2.840.10008.1.2.4.80": gdcm.TransferSyntax.JPEGLSLossless,
        "1.2.840.10008.1.2.4.90": gdcm.TransferSyntax.JPEG2000Lossless,
        "1.2.840.10008.1.2.5": gdcm.TransferSyntax.RLELossless,
    }
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"gdcm could not read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntaxes[str(transfer_syntax)]))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm could not encode {transfer_syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm could not write {dst}")
    return Path(dst)


# --------------------------------------------------------------------------------------------- synthetic MIMIC


#: MIMIC-CXR-JPG's chexpert table order (alphabetical), not CheXpert's own.
MIMIC_CHEXPERT_ORDER = tuple(sorted(CHEXPERT_LABELS))

_FULL = (
    " FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F with cough.\n \n"
    " COMPARISON:  ___\n \n FINDINGS: \n \n {findings}\n \n IMPRESSION: \n \n {impression}\n"
)
_ADDENDUM = " FINAL ADDENDUM\n ADDENDUM:\n Findings were discussed with Dr. ___ by telephone.\n \n" + _FULL
_IMPRESSION_ONLY = " FINAL REPORT\n INDICATION:  ___M with fever.\n \n IMPRESSION: \n \n {impression}\n"
_PLAIN = " FINAL REPORT\n INDICATION:  chest pain.\n \n PA and lateral views were obtained.\n \n {findings}\n"


@dataclass
class FakeImage:
    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    split: str | None  # None: left out of the split table
    kind: str = "ok"  # ok | corrupt | missing
    photometric: str = "MONOCHROME2"


@dataclass
class FakeStudy:
    subject_id: str
    study_id: str
    report: str | None  # template name or None for no report
    findings: str = ""
    impression: str = ""
    labels: dict[str, float] = field(default_factory=dict)


@dataclass
class MimicTreeSpec:
    """What a synthetic tree holds and what preparing it must give (per ``--sections`` choice)."""

    root: Path
    image_format: str
    studies: list[FakeStudy]
    images: list[FakeImage]
    shapes: dict[str, tuple[int, int]]

    def path(self, img: FakeImage) -> str:
        suffix = self.suffix(img)
        return f"files/p{img.subject_id[:2]}/p{img.subject_id}/s{img.study_id}/{img.dicom_id}{suffix}"

    def suffix(self, img: FakeImage) -> str:
        if self.image_format == "mixed":
            return ".dcm" if int(img.dicom_id[-1], 16) % 2 else ".jpg"
        return ".dcm" if self.image_format == "dcm" else ".jpg"

    def expected(self, sections: str = "findings") -> tuple[list[str], dict[str, str]]:
        """(kept dicom_ids in index order, {skipped relative path: reason kind})."""
        study = {(s.subject_id, s.study_id): s for s in self.studies}
        kept, skipped = [], {}
        for img in sorted(self.images, key=lambda i: (i.subject_id, i.study_id, i.dicom_id)):
            s = study[(img.subject_id, img.study_id)]
            p = self.path(img) if img.kind != "missing" else self.path(img).rsplit(".", 1)[0]
            if img.view not in ("PA", "AP"):
                skipped[p] = f"view {img.view or 'blank'} not selected"
            elif img.split is None:
                skipped[p] = "not in the split table"
            elif s.report is None:
                skipped[p] = "no report file"
            elif sections == "findings" and s.report == "impression_only":
                skipped[p] = "report has no FINDINGS section"
            elif img.kind == "missing":
                skipped[p] = "image file missing"
            elif img.kind == "corrupt":
                skipped[p] = "truncated"
            else:
                kept.append(img.dicom_id)
        return kept, skipped


def _report_text(s: FakeStudy) -> str:
    template = {"full": _FULL, "addendum": _ADDENDUM, "impression_only": _IMPRESSION_ONLY, "plain": _PLAIN}[
        s.report
    ]
    return template.format(findings=s.findings, impression=s.impression)


def _did(n: int) -> str:
    # Shaped like MIMIC's dicom ids (five dash-separated hex groups), made up.
    return f"{n:08x}-0000beef-1234abcd-00c0ffee-{n:08x}"


def write_mimic_tree(
    root: str | Path,
    *,
    image_format: str = "jpg",
    gz: bool = True,
    shape: tuple[int, int] = (48, 40),
    with_regions: bool = True,
) -> MimicTreeSpec:
    """Write a small fake MIMIC-CXR(-JPG) tree: ``image_format`` "jpg", "dcm" or "mixed" (MONOCHROME1 among the
    DICOMs). It holds a lateral view, a blank view, a study without a report, a report without FINDINGS, a report
    with an addendum on top, a plain-paragraph report, a corrupt (truncated) image, an image listed but missing,
    and an image left out of the split table."""
    root = Path(root)
    pos = {"No Finding": 1.0}
    studies = [
        FakeStudy(
            "10000001",
            "50000001",
            "full",
            "Heart size is normal. The lungs are clear.",
            "No acute cardiopulmonary process.",
            pos,
        ),
        FakeStudy(
            "10000001",
            "50000002",
            "addendum",
            "Small left pleural effusion. No pneumothorax.",
            "Left effusion.",
            {"Pleural Effusion": 1.0, "Pneumothorax": 0.0},
        ),
        FakeStudy("10000002", "50000003", None),
        FakeStudy(
            "10000002",
            "50000004",
            "impression_only",
            impression="Possible right lower lobe pneumonia.",
            labels={"Pneumonia": -1.0, "Lung Opacity": 1.0},
        ),
        FakeStudy(
            "11000003",
            "50000005",
            "full",
            "Cardiomegaly with mild edema.",
            "Cardiomegaly, edema.",
            {"Cardiomegaly": 1.0, "Edema": 1.0},
        ),
        FakeStudy(
            "11000003",
            "50000006",
            "full",
            "A right PICC ends in the lower SVC. Lungs are clear.",
            "Support device in place.",
            {"Support Devices": 1.0, "No Finding": 1.0},
        ),
        FakeStudy("12000004", "50000007", "full", "No focal consolidation.", "Normal chest.", pos),
        FakeStudy(
            "12000004",
            "50000008",
            "full",
            "Mild atelectasis at the left base.",
            "Atelectasis.",
            {"Atelectasis": 1.0},
        ),
        FakeStudy("12000005", "50000009", "plain", "The lungs are clear without effusion.", labels=pos),
    ]
    images = [
        FakeImage(_did(1), "10000001", "50000001", "PA", "train"),
        FakeImage(_did(2), "10000001", "50000001", "LATERAL", "train"),
        FakeImage(_did(3), "10000001", "50000002", "AP", "train", photometric="MONOCHROME1"),
        FakeImage(_did(4), "10000002", "50000003", "PA", "train"),
        FakeImage(_did(5), "10000002", "50000004", "PA", "train"),
        FakeImage(_did(6), "11000003", "50000005", "PA", "validate", kind="corrupt"),
        FakeImage(_did(7), "11000003", "50000005", "AP", "validate", photometric="MONOCHROME1"),
        FakeImage(_did(8), "11000003", "50000006", "PA", "test"),
        FakeImage(_did(9), "12000004", "50000007", "PA", "test", kind="missing"),
        FakeImage(_did(10), "12000004", "50000008", "PA", None),
        FakeImage(_did(11), "12000004", "50000008", "", "test"),
        FakeImage(_did(12), "12000005", "50000009", "PA", "test"),
        FakeImage(_did(13), "12000004", "50000008", "LL", "test"),
    ]
    spec = MimicTreeSpec(root=root, image_format=image_format, studies=studies, images=images, shapes={})
    h, w = shape
    for n, img in enumerate(images):
        if img.kind == "missing":
            continue
        unit = synthetic_chest(h, w, seed=n)
        unit[-4:, -4:] = (n + 1) / 16.0  # a per-image signature in the bottom-right corner
        path = root / spec.path(img)
        if spec.suffix(img) == ".jpg":
            write_jpg(path, unit)
        else:
            write_dicom(
                chest_dataset(unit, bits=12, photometric=img.photometric, view=img.view or None), path
            )
        if img.kind == "corrupt":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * 2 // 3])
        spec.shapes[img.dicom_id] = (h, w)
    for s in studies:
        if s.report is not None:
            rp = root / f"files/p{s.subject_id[:2]}/p{s.subject_id}/s{s.study_id}.txt"
            rp.parent.mkdir(parents=True, exist_ok=True)
            rp.write_text(_report_text(s))

    meta = pd.DataFrame(
        [
            {
                "dicom_id": i.dicom_id,
                "subject_id": i.subject_id,
                "study_id": i.study_id,
                "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                "ViewPosition": i.view,
                "Rows": h,
                "Columns": w,
                "StudyDate": 21800101,
                "StudyTime": 101010.0,
                "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior"}.get(
                    i.view, "lateral"
                ),
                "PatientOrientationCodeSequence_CodeMeaning": "Erect",
            }
            for i in images
        ],
        columns=list(METADATA_TABLE_COLUMNS),
    )
    split = pd.DataFrame(
        [
            {"dicom_id": i.dicom_id, "study_id": i.study_id, "subject_id": i.subject_id, "split": i.split}
            for i in images
            if i.split is not None
        ]
    )
    chex = pd.DataFrame(
        [
            {
                "subject_id": s.subject_id,
                "study_id": s.study_id,
                **{name: s.labels.get(name, np.nan) for name in MIMIC_CHEXPERT_ORDER},
            }
            for s in studies
        ]
    )
    for name, df in (("metadata", meta), ("split", split), ("chexpert", chex)):
        text = df.to_csv(index=False)
        if gz:
            (root / f"mimic-cxr-2.0.0-{name}.csv.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (root / f"mimic-cxr-2.0.0-{name}.csv").write_text(text)
    if with_regions:
        regions = pd.DataFrame(
            [
                {
                    "dicom_id": i.dicom_id,
                    "finding": "marker",
                    "side": "right",
                    "zone": "upper",
                    "x0": 0.04,
                    "y0": 0.04,
                    "x1": 0.16,
                    "y1": 0.12,
                }
                for i in images
            ]
        )
        regions.to_csv(root / "regions.csv", index=False)
    return spec


def expected_labels(spec: MimicTreeSpec, dicom_ids: Sequence[str]) -> np.ndarray:
    """(N, 14) labels in CheXpert order for ``dicom_ids`` (NaN blank)."""
    study = {(s.subject_id, s.study_id): s for s in spec.studies}
    by_id = {i.dicom_id: i for i in spec.images}
    out = np.full((len(dicom_ids), len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
    for r, d in enumerate(dicom_ids):
        s = study[(by_id[d].subject_id, by_id[d].study_id)]
        for j, name in enumerate(CHEXPERT_LABELS):
            out[r, j] = s.labels.get(name, np.nan)
    return out


__all__ = [
    "MARKER_BOX",
    "MimicTreeSpec",
    "chest_dataset",
    "expected_labels",
    "synthetic_chest",
    "transcode_with_gdcm",
    "write_jpg",
    "write_mimic_tree",
    "write_png",
]

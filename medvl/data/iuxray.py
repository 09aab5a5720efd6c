"""IU X-ray (Open-i) to a prepared dataset (``medvl prepare iu-xray``).

``root`` holds the Open-i reports (an ``ecgen-radiology/`` folder of ``*.xml``, or a ``.tgz`` such as
``NLMCXR_reports.tgz``; when neither is there, torchxrayvision's copy is used) and the images (any folder below the
root: ``NLMCXR_png/CXR1_1_IM-0001-3001.png``; JPG and DICOM files are found the same way, and DICOM names without
the ``CXR`` prefix, ``1000_IM-0003-2001.dcm``, match too).

Views: Open-i does not say which image is frontal. torchxrayvision's ``nlmcxr_dicom_metadata.csv.gz`` has the DICOM
``ViewPosition`` of 7,469 of the 7,470 images (about a third blank): images whose view is known and not in ``views``
are skipped; images with an unknown view are **kept** (``view`` blank in index.csv), and the run says how many.

Split: patient-disjoint and deterministic, each report (one patient) assigned by a seeded hash of its ``uId`` to
train / validate / test with probabilities 0.7 / 0.1 / 0.2; the assignment of a patient never depends on which other
reports are present. Open-i has no CheXpert labels: the label columns are blank.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medvl.data.images import ResizeFit
from medvl.data.ingest import PrepareResult, build_image_cache, check_source, finish_prepare
from medvl.data.prepared import CANDIDATE_COLUMNS
from medvl.data.reports import (
    IUReport,
    ReportSection,
    iter_iu_reports,
    missing_text_reason,
    report_text,
    torchxrayvision_data_dir,
)
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
SPLIT_FRACTIONS = (("train", 0.7), ("validate", 0.1), ("test", 0.2))

__all__ = ["PrepareResult", "iu_split", "iu_views", "prepare_iuxray"]


def iu_split(uid: str, seed: int = 0) -> str:
    """train / validate / test for one patient: a seeded hash, stable whatever else is in the dataset."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    total = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        total += fraction
        if u < total:
            return name
    return SPLIT_FRACTIONS[-1][0]


def iu_views(metadata_csv: str | Path | None = None) -> dict[str, str]:
    """image id -> DICOM ViewPosition (upper case; blank ones left out) from torchxrayvision's metadata table."""
    path = Path(metadata_csv) if metadata_csv else torchxrayvision_data_dir() / "nlmcxr_dicom_metadata.csv.gz"
    if not path.exists():
        return {}
    df = pd.read_csv(path, usecols=["imageid", "View Position"], dtype=str, keep_default_na=False)
    return {
        i: v.strip().upper() for i, v in zip(df["imageid"], df["View Position"], strict=True) if v.strip()
    }


def _find_reports(root: Path) -> Path:
    for candidate in sorted(root.rglob("ecgen-radiology")):
        if candidate.is_dir():
            return candidate
    tgz = sorted([*root.glob("*.tgz"), *root.glob("*.tar.gz")])
    if tgz:
        return tgz[0]
    if any(root.rglob("*.xml")):
        return root
    return torchxrayvision_data_dir() / "NLMCXR_reports.tgz"


def _index_images(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(folder) / name
            found.setdefault(stem, path)
            if not stem.startswith("CXR"):
                found.setdefault(f"CXR{stem}", path)
    return found


def prepare_iuxray(
    root: str | Path,
    out: str | Path,
    *,
    size: int = 256,
    sections: ReportSection | str = "both",
    workers: int = 1,
    views: Sequence[str] = ("PA", "AP"),
    seed: int = 0,
    meta_extra: dict | None = None,
) -> PrepareResult:
    """Prepare an Open-i IU X-ray download into ``out`` (same layout as :func:`medvl.data.mimic.prepare_mimic`)."""
    started = time.perf_counter()
    root, out = Path(root), Path(out)
    check_source(root, size)
    sections = ReportSection(sections)
    views = tuple(v.strip().upper() for v in views)
    images = _index_images(root)
    if not images:
        raise DataError(f"{root}: no images (*.png, *.jpg, *.dcm) found below it")
    reports_source = _find_reports(root)
    reports: list[IUReport] = list(iter_iu_reports(reports_source))
    view_of = iu_views()
    blank = float("nan")

    skipped: list[tuple[str, str]] = []
    rows: list[dict] = []
    unknown_views = 0

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    for report in reports:
        chosen = report_text(report, sections, fallback=False)
        if not report.image_ids:
            skipped.append((report.source or report.uid, "report lists no images"))
            continue
        split = iu_split(report.uid, seed)
        for image_id in report.image_ids:
            path = images.get(image_id)
            shown = rel(path) if path else f"{image_id}.png"
            view = view_of.get(image_id, "")
            if view and view not in views:
                skipped.append((shown, f"view {view} not selected (views {','.join(views)})"))
                continue
            if not chosen:
                skipped.append((shown, missing_text_reason(report, sections)))
                continue
            if path is None:
                skipped.append((shown, "image file missing"))
                continue
            unknown_views += not view
            rows.append(
                {
                    "dicom_id": image_id,
                    "subject_id": report.uid,
                    "study_id": report.uid,
                    "split": split,
                    "view": view,
                    "source": rel(path),
                    "findings": report.findings,
                    "impression": report.impression,
                    "report": chosen,
                    **{name: blank for name in CHEXPERT_LABELS},
                    "path": str(path),
                }
            )

    candidates = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS))
    fit = ResizeFit.PAD.value
    outcomes, decoded, reused = build_image_cache(
        out,
        list(candidates["path"]),
        size=size,
        fit=fit,
        workers=workers,
        desc="prepare iu-xray",
        selection={"source": "iu-xray", "views": list(views), "sections": sections.value, "seed": seed},
    )
    notes = ["Open-i has no CheXpert labels: label columns are blank"]
    if unknown_views:
        notes.append(
            f"{unknown_views} images kept with an unknown view (not in torchxrayvision's DICOM metadata);"
            " some may be laterals"
        )
    meta = {
        "source": "iu-xray",
        "root": str(root.resolve()),
        "reports": str(reports_source),
        "sections": sections.value,
        "views": list(views),
        "split": {"seed": seed, "fractions": dict(SPLIT_FRACTIONS)},
        "unknown_views_kept": int(unknown_views),
        **(meta_extra or {}),
    }
    return finish_prepare(
        out,
        candidates=candidates.drop(columns=["path"]),
        outcomes=outcomes,
        skipped=skipped,
        meta=meta,
        size=size,
        fit=fit,
        decoded=decoded,
        reused=reused,
        started=started,
        notes=notes,
    )

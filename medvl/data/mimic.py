"""MIMIC-CXR (DICOM) and MIMIC-CXR-JPG trees to a prepared dataset (``medvl prepare mimic-cxr``).

Expected layout under ``root`` (docs/design.md section 7)::

    mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ..., ViewPosition, ...
    mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split (train|validate|test)
    mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id + 14 labels (optional: labels blank without it)
    files/p10/p10000032/s50414267/<dicom_id>.jpg | .dcm     (a tree may mix both; .dcm wins when both exist)
    files/p10/p10000032/s50414267.txt                       (or the same paths inside mimic-cxr-reports.zip)
    regions.csv                                             (optional, IU-Phantom: dicom_id first)

MIMIC-CXR (DICOM) ships no metadata/split/chexpert tables: copy them from MIMIC-CXR-JPG into the root.
Labels are mapped by column name, never by position. Every metadata row that is not used goes into
``skipped.csv`` with its reason (view not selected, not in the split table, no report or no text for
``--sections``, image file missing, image unreadable); the run carries on.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medvl.data.images import ResizeFit
from medvl.data.ingest import PrepareResult as PrepareResult
from medvl.data.ingest import build_image_cache, check_source, finish_prepare
from medvl.data.prepared import CANDIDATE_COLUMNS, SPLITS
from medvl.data.reports import ReportSection, missing_text_reason, parse_mimic_report, report_text
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS

METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "split")
#: Every column of MIMIC-CXR-JPG's three tables, in their order (what the phantom and the test trees write).
METADATA_TABLE_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_TABLE_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
#: The chexpert table orders the labels alphabetically, not in CheXpert's own order.
CHEXPERT_TABLE_COLUMNS = ("subject_id", "study_id", *sorted(CHEXPERT_LABELS))
IMAGE_SUFFIXES = (".dcm", ".jpg")  # preference order when both exist


@dataclass(frozen=True)
class MimicTables:
    metadata: Path
    split: Path
    chexpert: Path | None


def _find_table(root: Path, kind: str) -> Path | None:
    hits = sorted(
        p for pattern in (f"mimic-cxr-*-{kind}.csv", f"mimic-cxr-*-{kind}.csv.gz") for p in root.glob(pattern)
    )
    return hits[-1] if hits else None


def find_mimic_tables(root: str | Path) -> MimicTables:
    """The metadata, split and (optional) chexpert tables of a MIMIC root, gzipped or not."""
    root = Path(root)
    metadata, split = _find_table(root, "metadata"), _find_table(root, "split")
    missing = [name for name, p in (("metadata", metadata), ("split", split)) if p is None]
    if missing:
        raise DataError(
            f"{root}: no mimic-cxr-2.0.0-{missing[0]}.csv(.gz); a MIMIC-CXR root needs the metadata and split tables "
            "(MIMIC-CXR DICOM users: copy them from MIMIC-CXR-JPG into the root)"
        )
    return MimicTables(metadata=metadata, split=split, chexpert=_find_table(root, "chexpert"))


def _read_table(path: Path, required: Sequence[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (has {list(df.columns)[:8]})")
    for c in ("dicom_id", "subject_id", "study_id", "split", "ViewPosition"):
        if c in df.columns:
            df[c] = df[c].astype(str).str.strip()
    return df


def read_chexpert(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """(subject_id, study_id) -> (14,) float32 labels in CheXpert order (1 / 0 / -1, NaN blank), by column name."""
    df = _read_table(path, ("subject_id", "study_id", *CHEXPERT_LABELS))
    values = np.full((len(df), len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
    for j, name in enumerate(CHEXPERT_LABELS):
        col = pd.to_numeric(df[name].replace("", np.nan), errors="coerce").to_numpy(dtype=np.float32)
        bad = ~np.isnan(col) & ~np.isin(col, (1.0, 0.0, -1.0))
        if bad.any():
            raise DataError(
                f"{path}: column {name!r} has values other than 1, 0, -1, blank (e.g. {col[bad][0]})"
            )
        values[:, j] = col
    return {(s, t): values[i] for i, (s, t) in enumerate(zip(df["subject_id"], df["study_id"], strict=True))}


class ReportStore:
    """Reports by study from ``files/pXX/pSUBJECT/sSTUDY.txt`` or from ``mimic-cxr-reports.zip`` in the root."""

    def __init__(self, root: Path):
        self.root = root
        zips = sorted(root.glob("mimic-cxr-reports*.zip"))
        self._zip = zipfile.ZipFile(zips[0]) if zips else None
        self._members: dict[str, str] = {}
        if self._zip is not None:
            for name in self._zip.namelist():
                m = re.search(r"(files/p\d+/p\d+/s\d+\.txt)$", name)
                if m:
                    self._members[m.group(1)] = name

    def read(self, rel: str) -> str | None:
        path = self.root / rel
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
        if self._zip is not None and rel in self._members:
            return self._zip.read(self._members[rel]).decode("utf-8", errors="replace")
        return None


def study_dir(subject_id: str, study_id: str) -> str:
    """``files/p10/p10000032/s50414267`` (relative, POSIX)."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


def _normalise_views(views: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(views, str):
        views = views.split(",")
    out = tuple(v.strip().upper() for v in views if v.strip())
    if not out:
        raise DataError("views must name at least one view, e.g. PA,AP")
    return out


def prepare_mimic(
    root: str | Path,
    out: str | Path,
    *,
    size: int = 256,
    views: Sequence[str] = ("PA", "AP"),
    sections: ReportSection | str = "findings",
    workers: int = 1,
    jpg_compatible: bool = False,
    meta_extra: dict | None = None,
) -> PrepareResult:
    """Prepare a MIMIC-CXR or MIMIC-CXR-JPG tree (JPG and DICOM files may be mixed) into ``out``.

    Writes ``out/index.csv``, ``skipped.csv``, ``images.npy`` (uint8 (N, size, size)), ``meta.json`` and, when
    the root has one, ``regions.csv``. Interrupting and rerunning the same command resumes without decoding
    finished images again. ``jpg_compatible`` reads DICOMs the way MIMIC-CXR-JPG was made. ``meta_extra`` is merged
    into meta.json (e.g. a phantom's seed).
    """
    started = time.perf_counter()
    root, out = Path(root), Path(out)
    check_source(root, size)
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    sections = ReportSection(sections)
    views = _normalise_views(views)
    if not (root / "files").is_dir():
        raise DataError(f"{root}: no files/ folder; expected files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg|.dcm")
    tables = find_mimic_tables(root)
    metadata = _read_table(tables.metadata, METADATA_COLUMNS)
    metadata = metadata.drop_duplicates("dicom_id").sort_values(
        ["subject_id", "study_id", "dicom_id"], kind="stable"
    )
    split_df = _read_table(tables.split, SPLIT_COLUMNS)
    split_of = dict(zip(split_df["dicom_id"], split_df["split"], strict=True))
    labels_of = read_chexpert(tables.chexpert) if tables.chexpert is not None else {}
    blank = np.full(len(CHEXPERT_LABELS), np.nan, dtype=np.float32)
    reports = ReportStore(root)
    # Per study: (findings, impression, chosen text, reason when there is none); None when no report file.
    texts: dict[str, tuple[str, str, str, str] | None] = {}
    listings: dict[str, frozenset[str]] = {}
    views_text = ",".join(views)

    def find_image(folder: str, dicom_id: str) -> str | None:
        if folder not in listings:  # one directory listing per study instead of a stat per suffix
            try:
                listings[folder] = frozenset(os.listdir(root / folder))
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = frozenset()
        return next(
            (f"{folder}/{dicom_id}{s}" for s in IMAGE_SUFFIXES if f"{dicom_id}{s}" in listings[folder]), None
        )

    skipped: list[tuple[str, str]] = []
    rows: list[dict] = []
    suffix_counts = {s: 0 for s in IMAGE_SUFFIXES}
    table = zip(
        metadata["dicom_id"],
        metadata["subject_id"],
        metadata["study_id"],
        metadata["ViewPosition"],
        strict=True,
    )
    for dicom_id, subject_id, study_id, view in tqdm(
        table, total=len(metadata), desc="reading tables and reports", unit="img", mininterval=1.0
    ):
        folder = study_dir(subject_id, study_id)
        image = find_image(folder, dicom_id)
        shown = image or f"{folder}/{dicom_id}"  # no suffix: the file is not there
        view = view.upper()
        if view not in views:
            skipped.append((shown, f"view {view or 'blank'} not selected (views {views_text})"))
            continue
        split = split_of.get(dicom_id)
        if split is None:
            skipped.append((shown, "not in the split table"))
            continue
        if split not in SPLITS:
            skipped.append((shown, f"unknown split {split!r} in the split table"))
            continue
        report_rel = f"{folder}.txt"
        if report_rel not in texts:
            raw = reports.read(report_rel)
            if raw is None:
                texts[report_rel] = None
            else:
                report = parse_mimic_report(raw)
                chosen = report_text(report, sections)
                texts[report_rel] = (
                    report.findings,
                    report.impression,
                    chosen,
                    "" if chosen else missing_text_reason(report, sections),
                )
        entry = texts[report_rel]
        if entry is None:
            skipped.append((shown, f"no report file ({report_rel})"))
            continue
        findings, impression, chosen, why_not = entry
        if not chosen:
            skipped.append((shown, why_not))
            continue
        if image is None:
            skipped.append((shown, "image file missing (neither .jpg nor .dcm)"))
            continue
        suffix_counts[Path(image).suffix] += 1
        labels = labels_of.get((subject_id, study_id), blank)
        rows.append(
            {
                "dicom_id": dicom_id,
                "subject_id": subject_id,
                "study_id": study_id,
                "split": split,
                "view": view,
                "source": image,
                "findings": findings,
                "impression": impression,
                "report": chosen,
                **{name: float(labels[j]) for j, name in enumerate(CHEXPERT_LABELS)},
                "path": str(root / image),
            }
        )

    candidates = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS))
    fit = ResizeFit.PAD.value
    outcomes, decoded, reused = build_image_cache(
        out,
        list(candidates["path"]),
        size=size,
        fit=fit,
        jpg_compatible=jpg_compatible,
        workers=workers,
        desc="prepare mimic-cxr",
        selection={"source": "mimic-cxr", "views": list(views), "sections": sections.value},
    )
    notes = []
    if tables.chexpert is None:
        notes.append("no chexpert table: labels are blank")
    if suffix_counts[".dcm"] and suffix_counts[".jpg"]:
        notes.append(
            f"mixed tree: {suffix_counts['.jpg']} JPG and {suffix_counts['.dcm']} DICOM images"
            + (" (DICOMs read JPG-compatible)" if jpg_compatible else "")
        )
    meta = {
        "source": "mimic-cxr",
        "root": str(root.resolve()),
        "sections": sections.value,
        "views": list(views),
        "jpg_compatible": bool(jpg_compatible),
        "tables": {
            "metadata": tables.metadata.name,
            "split": tables.split.name,
            "chexpert": tables.chexpert.name if tables.chexpert else None,
        },
        "image_files": {s.lstrip("."): n for s, n in suffix_counts.items()},
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
        regions_csv=root / "regions.csv",
        notes=notes,
    )

"""Any image-report table to a prepared dataset (``medvl prepare csv``).

One CSV row per image. Columns (default names; ``columns`` maps a key to another column name):

    image           path of a DICOM, PNG or JPG file, relative to ``image_root`` or absolute (required)
    report          the report text; else ``findings`` and/or ``impression`` (at least one of the three)
    findings        findings section (optional)
    impression      impression section (optional)
    split           train, validate (or val, valid, validation), test; any case (optional)
    patient_id      patient identifier (optional): splits are then patient-disjoint
    study_id        study identifier (optional; default: each row its own study)
    view            view position, e.g. PA, AP, LATERAL (optional; where blank, a DICOM's ViewPosition, else
                    ``view``, else blank: the report stage trains on PA and AP images only)
    <CheXpert name> any of CheXpert's 14 observations ("No Finding", "Pleural Effusion"...): 1, 0, -1 or blank

The report text is the ``report`` cell; where it is blank or there is no such column, ``sections`` of findings and
impression (both by default). Labels: the label columns the table has; without any, medvl's labeler reads the
report (``report``, else findings and impression) as ``medvl label`` does.

Split: the ``split`` column when there is one (a patient found in two splits is an error: the split would leak);
without one, a seeded patient-disjoint 70/10/20 split by ``patient_id`` (by study, or by image, when the table
has no patient column; the run says so), the same assignment as IU X-ray's.

Rows that cannot be used go to ``skipped.csv`` with the reason and the CSV line (no image path, image file
missing, duplicate image, empty report, blank or unknown split, blank patient id, bad label value, unreadable
image); the run carries on. Interrupting and rerunning the same command resumes without decoding finished images
again. The output is the same prepared-dataset layout as ``medvl prepare mimic-cxr``'s
(:mod:`medvl.data.prepared`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from medvl.data.images import ResizeFit, sniff_format
from medvl.data.ingest import PrepareResult, build_image_cache, check_source, finish_prepare
from medvl.data.iuxray import SPLIT_FRACTIONS, iu_split
from medvl.data.prepared import CANDIDATE_COLUMNS
from medvl.data.reports import ReportSection
from medvl.data.xray import ImageFormat
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import label_reports

__all__ = ["COLUMN_KEYS", "PrepareResult", "parse_columns", "prepare_csv", "split_value"]

#: The column keys ``--columns`` may map, each to its default column name.
COLUMN_KEYS: dict[str, str] = {
    "image": "image",
    "report": "report",
    "findings": "findings",
    "impression": "impression",
    "split": "split",
    "patient_id": "patient_id",
    "study_id": "study_id",
    "view": "view",
    **{name: name for name in CHEXPERT_LABELS},
}
#: Split spellings accepted in the ``split`` column (lower-cased, stripped).
SPLIT_SPELLINGS = {
    "train": "train",
    "training": "train",
    "validate": "validate",
    "validation": "validate",
    "val": "validate",
    "valid": "validate",
    "test": "test",
}
_LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}


def parse_columns(text: str) -> dict[str, str]:
    """``"image=Path,report=Text"`` -> ``{"image": "Path", "report": "Text"}`` (keys: :data:`COLUMN_KEYS`); an
    empty name (``split=``) means: do not use that column even if the table has one."""
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, name = part.partition("=")
        key, name = key.strip(), name.strip()
        if not sep or not key:
            raise DataError(f"--columns: {part.strip()!r} is not KEY=COLUMN (e.g. image=Path,report=Text)")
        mapping[key] = name
    return mapping


def split_value(text: str) -> str | None:
    """A ``split`` cell -> train / validate / test, or None for a value medvl does not know."""
    return SPLIT_SPELLINGS.get(text.strip().lower())


def _resolve_columns(table: pd.DataFrame, columns: Mapping[str, str] | None, csv: Path) -> dict[str, str]:
    """key -> column name, for the keys the table has (an explicitly mapped column that is absent is an error)."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(COLUMN_KEYS))
    if unknown:
        raise DataError(
            f"--columns: unknown key(s) {unknown}; known: {', '.join(k for k in COLUMN_KEYS if k[0].islower())}"
            " and CheXpert's 14 label names"
        )
    missing = sorted(name for name in columns.values() if name and name not in table.columns)
    if missing:
        raise DataError(f"{csv}: no column(s) {missing} (its columns: {list(table.columns)[:20]})")
    chosen = {key: columns.get(key, default) for key, default in COLUMN_KEYS.items()}
    present = {key: name for key, name in chosen.items() if name and name in table.columns}
    if "image" not in present:
        raise DataError(
            f"{csv}: no image column {chosen['image']!r}; name it with --columns image=NAME "
            f"(its columns: {list(table.columns)[:20]})"
        )
    if not {"report", "findings", "impression"} & set(present):
        raise DataError(
            f"{csv}: no report, findings or impression column; name one with --columns report=NAME "
            f"(its columns: {list(table.columns)[:20]})"
        )
    return present


def _read_table(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise DataError(f"{csv}: no such CSV file")
    try:
        return pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv}: unreadable CSV ({exc})") from None


def _dicom_view(path: Path) -> str:
    """The ViewPosition of a DICOM file's header (upper case), blank for other files or when it says none."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if sniff_format(path, head) is not ImageFormat.DICOM:
            return ""
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"])
    except Exception:  # a damaged header: decoding the image reports why, in skipped.csv
        return ""
    return str(ds.get("ViewPosition", "") or "").strip().upper()


def _image_ids(paths: list[Path], root: Path) -> tuple[list[str], list[str]]:
    """(source, dicom_id) per image: the path relative to ``root`` (absolute when outside it), and that path
    without its suffix (unique, unlike file stems in many exports)."""
    sources, ids = [], []
    for path in paths:
        try:
            source = path.relative_to(root).as_posix()
        except ValueError:
            source = path.as_posix()
        sources.append(source)
        ids.append(source[: -len(path.suffix)] if path.suffix else source)
    return sources, ids


def prepare_csv(
    csv: str | Path,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
    size: int = 256,
    sections: ReportSection | str = "both",
    workers: int = 1,
    seed: int = 0,
    view: str | None = None,
) -> PrepareResult:
    """Prepare the images and reports a CSV lists into ``out`` (the layout of :mod:`medvl.data.prepared`).

    ``image_root``: the folder relative image paths start from (default: the CSV's folder). ``columns``: key ->
    column name for names other than the defaults (:data:`COLUMN_KEYS`). ``sections``: the report text when the
    ``report`` cell is blank or absent. ``seed``: the split assignment when the table has no split column.
    ``view``: the view of images whose row and DICOM header give none (e.g. ``"PA"`` for a table of frontal images).
    """
    started = time.perf_counter()
    csv, out = Path(csv), Path(out)
    table = _read_table(csv)
    root = Path(image_root) if image_root is not None else csv.resolve().parent
    check_source(root, size)
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    sections = ReportSection(sections)
    present = _resolve_columns(table, columns, csv)
    label_cols = [name for name in CHEXPERT_LABELS if name in present]

    def cells(key: str) -> list[str]:
        return [str(v).strip() for v in table[present[key]]] if key in present else [""] * len(table)

    images, reports = cells("image"), cells("report")
    findings, impression = cells("findings"), cells("impression")
    splits, patients = cells("split"), cells("patient_id")
    studies, views = cells("study_id"), cells("view")
    label_cells = {c: cells(c) for c in label_cols}
    labels = np.full((len(table), len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)

    skipped: list[tuple[str, str]] = []
    keep: list[int] = []
    paths: list[Path] = []
    texts: list[str] = []
    seen: dict[Path, int] = {}
    for i in range(len(table)):
        line = i + 2  # the header is line 1
        shown = images[i] or f"{csv.name} line {line}"
        where = f" ({csv.name} line {line})"
        if not images[i]:
            skipped.append((shown, "no image path" + where))
            continue
        path = Path(images[i]).expanduser()
        path = path if path.is_absolute() else root / path
        text = reports[i]
        if not text:
            both = " ".join(t for t in (findings[i], impression[i]) if t)
            text = {"findings": findings[i], "impression": impression[i], "both": both}[sections.value]
        if not text:
            skipped.append((shown, "empty report" + where))
            continue
        if "split" in present and split_value(splits[i]) is None:
            why = "no split value" if not splits[i] else f"unknown split {splits[i]!r}"
            skipped.append((shown, f"{why}; use train, validate (or val) or test{where}"))
            continue
        if "patient_id" in present and not patients[i]:
            skipped.append((shown, "no patient id" + where))
            continue
        bad = next((c for c in label_cols if label_cells[c][i] not in _LABEL_VALUES), None)
        if bad is not None:
            value = label_cells[bad][i]
            skipped.append(
                (shown, f"bad label value {value!r} in column {bad!r}; use 1, 0, -1 or blank{where}")
            )
            continue
        if not path.is_file():
            skipped.append((shown, "image file missing" + where))
            continue
        resolved = path.resolve()
        if resolved in seen:
            skipped.append((shown, f"duplicate image (also on {csv.name} line {seen[resolved] + 2}){where}"))
            continue
        seen[resolved] = i
        for c in label_cols:
            labels[i, CHEXPERT_LABELS.index(c)] = _LABEL_VALUES[label_cells[c][i]]
        keep.append(i)
        paths.append(path)
        texts.append(text)

    sources, ids = _image_ids(paths, root)
    image_views = [
        views[i].upper() or _dicom_view(paths[k]) or (view or "").upper() for k, i in enumerate(keep)
    ]
    notes: list[str] = []
    if label_cols:
        label_source = "csv"
        if len(label_cols) < len(CHEXPERT_LABELS):
            notes.append(
                f"labels from {len(label_cols)} of the 14 CheXpert columns; the others are blank "
                f"(missing: {', '.join(c for c in CHEXPERT_LABELS if c not in label_cols)})"
            )
    else:
        label_source = "labeler"
        labelled = [reports[i] or " ".join(t for t in (findings[i], impression[i]) if t) for i in keep]
        labels[keep] = label_reports(labelled, progress=len(keep) > 5000)
        notes.append("no CheXpert label columns: labels come from medvl's labeler")

    rows = []
    for k, i in enumerate(keep):
        study = studies[i] or ids[k]
        patient = patients[i] or study
        if "split" in present:
            split = split_value(splits[i])
        else:  # seeded and stable: a patient's split never depends on the other rows
            split = iu_split(patients[i] if "patient_id" in present else study, seed)
        rows.append(
            {
                "dicom_id": ids[k],
                "subject_id": patient,
                "study_id": study,
                "split": split,
                "view": image_views[k],
                "source": sources[k],
                "findings": findings[i],
                "impression": impression[i],
                "report": texts[k],
                **{name: float(labels[i, j]) for j, name in enumerate(CHEXPERT_LABELS)},
                "path": str(paths[k]),
            }
        )
    candidates = pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS))
    if "split" in present and "patient_id" in present and len(candidates):
        per_patient = candidates.groupby("subject_id")["split"].nunique()
        leaking = per_patient[per_patient > 1].index.tolist()
        if leaking:
            raise DataError(
                f"{csv}: {len(leaking)} patient(s) appear in more than one split (e.g. {leaking[:3]}); the "
                "split would leak between training and test. Fix the split column, or leave it out "
                "(--columns split=) to let medvl assign a patient-disjoint split"
            )
    if "split" in present:
        split_info: dict = {"from": "column", "column": present["split"]}
    else:
        by = "patient_id" if "patient_id" in present else ("study_id" if "study_id" in present else "image")
        split_info = {"from": "seeded", "by": by, "seed": seed, "fractions": dict(SPLIT_FRACTIONS)}
        notes.append(
            f"no split column: seeded 70/10/20 split by {by} (seed {seed})"
            + (
                "; patient-disjoint"
                if by == "patient_id"
                else "; NOT patient-disjoint (no patient_id column)"
            )
        )
    if "split" in present and "patient_id" not in present:
        notes.append("no patient_id column: cannot check that the given split is patient-disjoint")

    fit = ResizeFit.PAD.value
    outcomes, decoded, reused = build_image_cache(
        out,
        list(candidates["path"]),
        size=size,
        fit=fit,
        workers=workers,
        desc="prepare csv",
        selection={
            "source": "csv",
            "columns": present,
            "sections": sections.value,
            "seed": seed,
            "view": view,
        },
    )
    blank_views = sum(not v and o.ok for v, o in zip(image_views, outcomes, strict=True))
    if blank_views:
        notes.append(
            f"{blank_views} images have no view (no view cell, no DICOM ViewPosition): the report stage trains "
            "on PA and AP images only; add a view column, or --view PA when every image is frontal"
        )
    meta = {
        "source": "csv",
        "csv": str(csv.resolve()),
        "root": str(root.resolve()),
        "columns": present,
        "sections": sections.value,
        "split": split_info,
        "labels": label_source,
        "view": view,
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

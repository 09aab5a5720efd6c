"""Writing the IU-Phantom raw tree (:func:`build_phantom_raw`): labelling the reports, drawing the images in
worker processes, and writing the images, reports, MIMIC-CXR tables, regions, masks and provenance (the layout is
described in :mod:`medvl.data.phantom`).
"""

from __future__ import annotations

import csv
import gzip
import json
import multiprocessing as mp
import shutil
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid
from tqdm import tqdm

from medvl.data.dicom import grey_dicom, write_dicom
from medvl.data.mimic import CHEXPERT_TABLE_COLUMNS, METADATA_TABLE_COLUMNS, SPLIT_TABLE_COLUMNS
from medvl.data.phantom.anatomy import LesionSizes, LungAtlas, lesion_diameters, load_lung_atlas, npz_bytes
from medvl.data.phantom.draw import render_frontal, render_lateral
from medvl.data.phantom.plan import (
    PlannedImage,
    labelled_text,
    load_iu_reports,
    plan_findings,
    plan_tree,
    select_studies,
)
from medvl.data.reports import IUReport
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import aggregate_mentions, extract_mentions

PHANTOM_VERSION = 1
MIN_SIZE, MAX_SIZE = 64, 1024
REGION_COLUMNS = ("dicom_id", "finding", "side", "zone", "x0", "y0", "x1", "y1", "observation", "word")
MANIFEST_FILE = "phantom_images.csv"
INFO_FILE = "phantom.json"
BUILDING_FILE = ".phantom_building.json"
ATLAS_FILE = "lung_atlas.npz"
CONTACT_SHEET = "contact_sheet.png"

_MENTIONS: dict[str, list] = {}


def _mentions_chunk(texts: Sequence[str]) -> list[list]:
    return [extract_mentions(t) for t in texts]


def _labels_of(mentions: Sequence) -> np.ndarray:
    # label_reports(...) is aggregate_mentions(extract_mentions(report)); mentions are extracted once here.
    return aggregate_mentions(mentions)


def _write_dicom(path: Path, pixels: np.ndarray, im: PlannedImage) -> None:
    """A 12-bit DX DICOM of an 8-bit image (``value * 4095 / 255``), MONOCHROME1 stored inverted."""
    uid = generate_uid(entropy_srcs=["medvl-phantom", im.dicom_id])
    v = np.rint(pixels.astype(np.float32) * (4095.0 / 255.0)).astype(np.uint16)
    ds = grey_dicom(
        v,
        sop_class=DigitalXRayImageStorageForPresentation,
        photometric=im.fmt,
        bits_stored=12,
        sop_instance_uid=uid,
    )
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["medvl-phantom-study", im.study_id])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["medvl-phantom-series", im.dicom_id])
    ds.PatientID = im.subject_id
    ds.PatientName = f"PHANTOM^{im.subject_id}"
    ds.StudyID = im.study_id
    ds.StudyDate = im.study_date
    ds.StudyTime = im.study_time
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = im.view
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet (PA)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ImageComments = "IU-Phantom synthetic image (medvl); not a patient"
    ds.BurnedInAnnotation = "NO"
    write_dicom(ds, path)


def _report_file(report: IUReport, examination: str) -> str:
    """A MIMIC-style report: all-caps headers, lines starting with one space."""

    def block(text: str) -> str:
        return textwrap.fill(
            text, width=77, initial_indent=" ", subsequent_indent=" ", break_on_hyphens=False
        )

    parts = [" " * 33 + "FINAL REPORT", f" EXAMINATION:  {examination}", " "]
    if report.indication:
        parts += [block(f"INDICATION:  {report.indication}"), " "]
    if report.comparison:
        parts += [block(f"COMPARISON:  {report.comparison}"), " "]
    if report.findings:
        parts += [" FINDINGS:", " ", block(report.findings), " "]
    if report.impression:
        parts += [" IMPRESSION:", " ", block(report.impression)]
    return "\n".join(parts).rstrip() + "\n"


@dataclass(frozen=True)
class _RenderJob:
    raw: str
    size: int
    seed: int
    images: tuple[PlannedImage, ...]


_WORKER: dict[str, object] = {}


def _resources(raw: str) -> tuple[LungAtlas, LesionSizes]:
    if "atlas" not in _WORKER:
        _WORKER["atlas"] = load_lung_atlas(Path(raw) / ATLAS_FILE)
        _WORKER["lesions"] = lesion_diameters()
    return _WORKER["atlas"], _WORKER["lesions"]  # type: ignore[return-value]


def _render_job(job: _RenderJob) -> list[tuple[dict, list[dict]]]:
    """Draw and write the images of one job; returns (manifest row, region rows) per image."""
    atlas, lesions = _resources(job.raw)
    raw = Path(job.raw)
    out = []
    for im in job.images:
        rng = np.random.default_rng([job.seed, 31, im.report, 1 if im.view == "LATERAL" else 0])
        path = raw / im.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        regions: list[dict] = []
        info = {
            "dicom_id": im.dicom_id,
            "subject_id": im.subject_id,
            "study_id": im.study_id,
            "view": im.view,
            "file": im.filename,
            "format": im.fmt,
            "split": im.split,
        }
        if im.view == "LATERAL":
            pixels = render_lateral(job.size, rng)
            info.update(lung_mask="", ctr="", angle="", scale="", drawn="", masks="")
        else:
            fr = render_frontal(list(im.specs), atlas, im.mask, job.size, rng, lesions)
            pixels = fr.image
            for r in fr.regions:
                regions.append(
                    {
                        "dicom_id": im.dicom_id,
                        "finding": r.spec.finding or r.spec.kind.value,
                        "side": r.spec.side.value if r.spec.side else "",
                        "zone": r.spec.zone.value if r.spec.zone else "",
                        "x0": r.box[0],
                        "y0": r.box[1],
                        "x1": r.box[2],
                        "y1": r.box[3],
                        "observation": r.spec.observation,
                        "word": r.spec.word,
                    }
                )
            mask_rel = f"masks/{im.dicom_id}.npz"
            (raw / "masks").mkdir(exist_ok=True)
            (raw / mask_rel).write_bytes(
                npz_bytes(
                    regions=np.stack([r.mask for r in fr.regions])
                    if fr.regions
                    else np.zeros((0, job.size, job.size), bool),
                    anatomy=fr.anatomy,
                )
            )
            drawn = ";".join(
                f"{r.spec.kind.value}{':' + r.spec.device.value if r.spec.device else ''}" for r in fr.regions
            )
            info.update(
                lung_mask=fr.params["mask"],
                ctr=fr.params["ctr"],
                angle=fr.params["angle"],
                scale=fr.params["scale"],
                drawn=drawn,
                masks=mask_rel,
            )
        if im.fmt == "jpg":
            Image.fromarray(pixels).save(path, format="JPEG", quality=95)
        else:
            _write_dicom(path, pixels, im)
        out.append((info, regions))
    return out


def _write_csv_gz(path: Path, df: pd.DataFrame) -> None:
    data = df.to_csv(index=False).encode()
    with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
        gz.write(data)


@dataclass
class PhantomBuild:
    """What :func:`build_phantom_raw` wrote. ``seconds``: wall time per stage."""

    raw: Path
    studies: int
    subjects: int
    images: int
    laterals: int
    dicoms: int
    regions: int
    abnormal_studies: int
    drawn: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    reused: bool = False


def build_params(studies: int | None, size: int, seed: int) -> dict:
    return {"version": PHANTOM_VERSION, "studies": studies, "size": size, "seed": seed}


def check_build_args(size: int, seed: int, studies: int | None, workers: int) -> None:
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"--size {size}: IU-Phantom draws images of {MIN_SIZE} to {MAX_SIZE} pixels")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"--seed {seed}: use a non-negative integer")
    if studies is not None and (not isinstance(studies, int) or studies < 1):
        raise DataError(f"--studies {studies}: use a positive number of studies")
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers {workers}: use at least 1")


def _pool(workers: int) -> ProcessPoolExecutor | None:
    if workers <= 1:
        return None
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def build_phantom_raw(
    raw: str | Path, *, studies: int | None = None, size: int = 256, seed: int = 0, workers: int = 1
) -> PhantomBuild:
    """Write the IU-Phantom raw tree (MIMIC-CXR-JPG layout, see the module docstring) into ``raw``.

    ``studies``: how many IU reports to use (default all 3,927 with a section), drawn for ``seed`` with the share of
    abnormal reports kept. A ``raw`` folder already holding a complete build with the same arguments is reused;
    one holding anything else is an error.
    """
    check_build_args(size, seed, studies, workers)
    raw = Path(raw)
    params = build_params(studies, size, seed)
    info_path = raw / INFO_FILE
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("params") == params:
            return PhantomBuild(raw=raw, **info["counts"], seconds={}, reused=True)
        raise DataError(
            f"{raw} holds an IU-Phantom built with {info.get('params')}, not {params}; "
            "use another --out, or delete it"
        )
    building = raw / BUILDING_FILE
    if raw.exists() and any(raw.iterdir()):
        if not building.exists():
            raise DataError(f"{raw} is not empty and holds no IU-Phantom build; use another --out")
        # An interrupted build of ours: start again from an empty tree (the atlas cache stays).
        for name in ("files", "masks"):
            shutil.rmtree(raw / name, ignore_errors=True)
    raw.mkdir(parents=True, exist_ok=True)
    building.write_text(json.dumps(params))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    pool = _pool(workers)
    try:
        mapper: Callable = (lambda f, *it: pool.map(f, *it, chunksize=8)) if pool else map
        reports = load_iu_reports()
        seconds["reports"] = time.perf_counter() - t0

        t = time.perf_counter()
        texts = [labelled_text(r) for r in reports]
        found = _MENTIONS  # the labeler is deterministic: a second build in this process reuses its mentions
        unique = sorted(set(texts) - found.keys())
        chunks = [unique[i : i + 64] for i in range(0, len(unique), 64)]
        results = pool.map(_mentions_chunk, chunks) if pool else map(_mentions_chunk, chunks)
        for chunk, res in zip(
            chunks,
            tqdm(
                results, total=len(chunks), desc="phantom: labelling reports", unit="chunk", mininterval=1.0
            ),
            strict=True,
        ):
            found.update(zip(chunk, res, strict=True))
        mentions = [found[t_] for t_ in texts]
        labels = np.stack([_labels_of(m) for m in mentions])
        seconds["labeller"] = time.perf_counter() - t

        t = time.perf_counter()
        atlas = load_lung_atlas(raw / ATLAS_FILE, map_fn=mapper)
        lesions = lesion_diameters()
        _WORKER.update(atlas=atlas, lesions=lesions)
        seconds["lung_atlas"] = time.perf_counter() - t

        t = time.perf_counter()
        specs = {}
        for i, m in enumerate(mentions):
            specs[i] = plan_findings(m, np.random.default_rng([seed, 17, i]))
        abnormal = np.array([bool(specs[i]) for i in range(len(reports))])
        chosen = select_studies(abnormal, studies, seed)
        images = plan_tree(reports, chosen, specs, len(atlas), seed)
        seconds["plan"] = time.perf_counter() - t

        t = time.perf_counter()
        per_job = 24
        jobs = [
            _RenderJob(str(raw), size, seed, tuple(images[i : i + per_job]))
            for i in range(0, len(images), per_job)
        ]
        done = pool.map(_render_job, jobs) if pool else map(_render_job, jobs)
        rendered: list[tuple[dict, list[dict]]] = []
        with tqdm(total=len(images), desc="phantom: drawing", unit="img", mininterval=1.0) as bar:
            for res in done:
                rendered.extend(res)
                bar.update(len(res))
        seconds["draw"] = time.perf_counter() - t
    finally:
        if pool is not None:
            pool.shutdown()

    t = time.perf_counter()
    # Reports, tables, regions, manifest.
    by_study: dict[str, PlannedImage] = {}
    has_lateral = {im.study_id for im in images if im.view == "LATERAL"}
    for im in images:
        by_study.setdefault(im.study_id, im)
    for study, im in by_study.items():
        exam = {"AP": "CHEST (PORTABLE AP)"}.get(
            im.view, "CHEST (PA AND LAT)" if study in has_lateral else "CHEST (PA)"
        )
        (raw / f"{im.folder}.txt").write_text(_report_file(reports[im.report], exam))
    meta_rows, split_rows = [], []
    for im in images:
        exam = {"AP": "CHEST (PORTABLE AP)"}.get(
            by_study[im.study_id].view, "CHEST (PA AND LAT)" if im.study_id in has_lateral else "CHEST (PA)"
        )
        meta_rows.append(
            {
                "dicom_id": im.dicom_id,
                "subject_id": im.subject_id,
                "study_id": im.study_id,
                "PerformedProcedureStepDescription": exam,
                "ViewPosition": im.view,
                "Rows": size,
                "Columns": size,
                "StudyDate": im.study_date,
                "StudyTime": im.study_time,
                "ProcedureCodeSequence_CodeMeaning": exam,
                "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior"}.get(
                    im.view, "lateral"
                ),
                "PatientOrientationCodeSequence_CodeMeaning": "Recumbent" if im.view == "AP" else "Erect",
            }
        )
        split_rows.append(
            {"dicom_id": im.dicom_id, "study_id": im.study_id, "subject_id": im.subject_id, "split": im.split}
        )
    _write_csv_gz(
        raw / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(meta_rows, columns=METADATA_TABLE_COLUMNS)
    )
    _write_csv_gz(raw / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame(split_rows, columns=SPLIT_TABLE_COLUMNS))
    chex_rows = []
    for study, im in by_study.items():
        lab = labels[im.report]
        row = {"subject_id": im.subject_id, "study_id": study}
        for j, name in enumerate(CHEXPERT_LABELS):
            row[name] = "" if np.isnan(lab[j]) else f"{float(lab[j]):.1f}"
        chex_rows.append(row)
    _write_csv_gz(
        raw / "mimic-cxr-2.0.0-chexpert.csv.gz", pd.DataFrame(chex_rows, columns=CHEXPERT_TABLE_COLUMNS)
    )
    region_rows = [r for _, rs in rendered for r in rs]
    pd.DataFrame(region_rows, columns=REGION_COLUMNS).to_csv(raw / "regions.csv", index=False)
    manifest = []
    for im, (info, rs) in zip(images, rendered, strict=True):
        rep = reports[im.report]
        manifest.append(
            {
                **info,
                "iu_uid": rep.uid,
                "iu_source": rep.source,
                "regions": len(rs),
                "planned": len(im.specs) if im.view != "LATERAL" else 0,
            }
        )
    pd.DataFrame(manifest).to_csv(raw / MANIFEST_FILE, index=False, quoting=csv.QUOTE_MINIMAL)
    frontal = [im for im in images if im.view != "LATERAL"]
    counts = {
        "studies": len(by_study),
        "subjects": len({im.subject_id for im in images}),
        "images": len(images),
        "laterals": len(images) - len(frontal),
        "dicoms": sum(im.fmt != "jpg" for im in images),
        "regions": len(region_rows),
        "abnormal_studies": int(sum(bool(im.specs) for im in frontal)),
        "drawn": dict(sorted(Counter(r["finding"] for r in region_rows).items())),
    }
    seconds["write_tables"] = time.perf_counter() - t
    info = {
        "params": params,
        "counts": counts,
        "sources": {
            "reports": "torchxrayvision NLMCXR_reports.tgz (IU X-ray, Open-i; CC BY-NC-ND 4.0)",
            "lung_masks": f"torchxrayvision semantic_masks_v7labs_lungs.zip ({len(atlas)} usable)",
            "lesion_sizes": "torchxrayvision BBox_List_2017.csv.gz (NIH ChestX-ray14)",
        },
        "lung_masks_skipped": [list(s) for s in atlas.skipped],
    }
    info_path.write_text(json.dumps(info, indent=1))  # written last: marks the tree complete
    building.unlink()
    seconds["other"] = time.perf_counter() - t0 - sum(seconds.values())
    return PhantomBuild(raw=raw, **counts, seconds=seconds)

"""IU-Phantom: the embedded default dataset (docs/design.md section 5).

Real text and real anatomy shapes, synthetic pixels with known ground truth, built at run time from files that the
torchxrayvision wheel ships (nothing of them is copied into the repository):

* the 3,955 IU X-ray reports of ``NLMCXR_reports.tgz`` (3,927 with a FINDINGS or IMPRESSION section);
* medvl's labeler (:mod:`medvl.text.labeler`) reads each report's findings + impression; every *positive* mention
  becomes a finding drawn on the stated side and zone, sized by the stated severity (:func:`plan_findings`);
* the real lung masks of ``semantic_masks_v7labs_lungs.zip`` give the lung fields, with heart, mediastinum,
  diaphragm, ribs, clavicles, spine and soft tissue drawn around them (:mod:`medvl.data.phantom.draw`);
* nodule and mass sizes follow the NIH ChestX-ray14 boxes of ``BBox_List_2017.csv.gz``.

:func:`prepare_phantom` writes the raw tree in the MIMIC-CXR-JPG layout under ``out/raw/`` and then runs the real
MIMIC ingestion (:func:`medvl.data.mimic.prepare_mimic`) on it, so ``out/`` becomes a prepared dataset::

    out/raw/files/pXX/p<subject>/s<study>/<dicom_id>.jpg     frontal (PA/AP) and a few LATERAL views, 8-bit grey
    out/raw/files/pXX/p<subject>/s<study>/<dicom_id>.dcm     some frontal images as DICOM instead (MONOCHROME1 and
                                                             MONOCHROME2, 12 bits stored, Modality DX)
    out/raw/files/pXX/p<subject>/s<study>.txt                the IU report with FINDINGS: / IMPRESSION: headers
    out/raw/mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz the real MIMIC-CXR-JPG column names
    out/raw/regions.csv       dicom_id,finding,side,zone,x0,y0,x1,y1,observation,word: one row per drawn finding
    out/raw/masks/<dicom_id>.npz   ``regions`` bool (K, S, S), row k = the k-th regions.csv row of that image;
                                   ``anatomy`` bool (4, S, S) = lung_image_left, lung_image_right, heart, mediastinum
    out/raw/phantom_images.csv     provenance per image: IU report, lung mask, file format, heart size...
    out/raw/phantom.json           the build's parameters and counts (the tree is complete when it exists)
    out/raw/lung_atlas.npz         the processed lung masks, so a rebuild skips decoding them
    out/contact_sheet.png          16 frontal images with their finding boxes and labels

Boxes are normalised image coordinates, x to the image's right, y down. ``side`` is the patient's side (``left``
is drawn on the image's RIGHT, radiology convention), ``""`` for central findings (heart, mediastinum, midline
devices); a bilateral finding gives one row per side. When the report gives no side, one is drawn at random
(deterministic for the seed) and recorded; likewise the zone.

Everything is deterministic for a seed: the same arguments give the same bytes, whatever ``workers`` is.
"""

from __future__ import annotations

import csv
import gzip
import json
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
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid
from tqdm import tqdm

from medvl.data.dicom import grey_dicom, write_dicom
from medvl.data.phantom.anatomy import LesionSizes, LungAtlas, lesion_diameters, load_lung_atlas, npz_bytes
from medvl.data.phantom.draw import DrawSpec, render_frontal, render_lateral
from medvl.data.prepared import PrepareResult
from medvl.data.reports import IUReport, iter_iu_reports
from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import aggregate_mentions, extract_mentions
from medvl.text.layout import (
    CENTRAL_KINDS,
    DEFAULT_ZONES,
    Device,
    Side,
    Zone,
    allowed_zone,
    is_sided,
    merge_mentions,
)
from medvl.text.phrases import Finding

PHANTOM_VERSION = 1
MIN_SIZE, MAX_SIZE = 64, 1024
#: Share of studies that also get a LATERAL view (filtered out by the ingestion), and of frontal images written as
#: DICOM instead of JPG (half MONOCHROME1, half MONOCHROME2); at least 1 and 2 of them in any build.
LATERAL_SHARE = 0.03
DICOM_SHARE = 0.02
AP_SHARE = 0.15
#: Patient-disjoint split shares (train, validate, test).
SPLIT_SHARES = (0.7, 0.1, 0.2)
#: How many studies a phantom patient has, with probabilities.
STUDIES_PER_SUBJECT = ((1, 0.7), (2, 0.2), (3, 0.1))
#: At most this many findings are drawn per image (the rest are listed in phantom_images.csv as not drawn).
MAX_DRAWN = 10

REGION_COLUMNS = ("dicom_id", "finding", "side", "zone", "x0", "y0", "x1", "y1", "observation", "word")
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *sorted(CHEXPERT_LABELS))
MANIFEST_FILE = "phantom_images.csv"
INFO_FILE = "phantom.json"
BUILDING_FILE = ".phantom_building.json"
ATLAS_FILE = "lung_atlas.npz"
CONTACT_SHEET = "contact_sheet.png"

# --- findings: labeler mentions -> what to draw -----------------------------------------------------------------

#: The side a one-sided device is drawn on when its report gives none.
DEFAULT_DEVICE_SIDE: dict[Device, Side] = {
    Device.PACEMAKER: Side.LEFT, Device.CENTRAL_LINE: Side.RIGHT, Device.PORT: Side.RIGHT,
}


def _zone_for(kind: Finding, zone: Zone | None, rng: np.random.Generator) -> Zone | None:
    if kind in CENTRAL_KINDS or kind == Finding.DEVICE:
        return None
    if zone is None:
        return Zone(rng.choice([z.value for z in DEFAULT_ZONES[kind]]))
    return allowed_zone(kind, zone)


def plan_findings(mentions: Sequence, rng: np.random.Generator, *, limit: int = MAX_DRAWN) -> list[DrawSpec]:
    """What to draw for one report: its positive mentions merged per finding, side and zone
    (:func:`medvl.text.layout.merge_mentions`), with defaults drawn from ``rng`` where the report is silent.

    ``bilateral`` gives one finding per side; a plural lesion head ("granulomas", "nodules") draws two or three
    lesions. Returns at most ``limit`` specs, in report order.
    """
    entries = merge_mentions(mentions)
    specs: list[DrawSpec] = []
    for e in entries:
        side = e.side
        sided = is_sided(e.kind, e.device)
        if sided and side is None:
            side = DEFAULT_DEVICE_SIDE.get(e.device) if e.device else None
            side = side or Side(rng.choice(["left", "right"]))
        zone = _zone_for(e.kind, e.zone, rng)
        n = e.count + (int(rng.integers(0, 2)) if e.count > 1 else 0)
        for _ in range(n):
            specs.append(DrawSpec(kind=e.kind, side=side if sided else None, zone=zone, severity=e.severity,
                                  device=e.device, finding=e.finding, observation=e.observation, word=e.word))
    return specs[:limit]


# --- the IU reports ---------------------------------------------------------------------------------------------


def labelled_text(report: IUReport) -> str:
    """The text labelled and drawn from: findings and impression joined by a space (what the MIMIC ingestion
    with ``sections="both"`` reads back from the ``.txt`` file)."""
    return " ".join(t for t in (report.findings.strip(), report.impression.strip()) if t)


_REPORTS: list[IUReport] = []


def load_iu_reports() -> list[IUReport]:
    """The IU X-ray reports that have a FINDINGS or IMPRESSION section (3,927 of 3,955), in report order (parsed
    once per process)."""
    if not _REPORTS:
        _REPORTS.extend(r for r in iter_iu_reports() if labelled_text(r))
    return list(_REPORTS)


_MENTIONS: dict[str, list] = {}


def _mentions_chunk(texts: Sequence[str]) -> list[list]:
    return [extract_mentions(t) for t in texts]


def _labels_of(mentions: Sequence) -> np.ndarray:
    # label_reports(...) is aggregate_mentions(extract_mentions(report)); mentions are extracted once here.
    return aggregate_mentions(mentions)


def select_studies(abnormal: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of the reports to build: all of them, or ``n`` drawn with the share of abnormal reports kept."""
    total = len(abnormal)
    if n is None or n >= total:
        if n is not None and n > total:
            raise DataError(f"--studies {n}: only {total} IU reports have a findings or impression section")
        return np.arange(total)
    if n < 1:
        raise DataError(f"--studies must be at least 1, got {n}")
    rng = np.random.default_rng([seed, 11])
    ab, no = np.flatnonzero(abnormal), np.flatnonzero(~abnormal)
    k_ab = int(round(n * len(ab) / total))
    k_ab = min(max(k_ab, 1 if n >= 2 and len(ab) else 0), len(ab), n)
    pick = np.concatenate([rng.choice(ab, k_ab, replace=False), rng.choice(no, n - k_ab, replace=False)])
    return np.sort(pick)


# --- the tree -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedImage:
    """One image of the raw tree. ``fmt``: ``jpg``, ``MONOCHROME1`` or ``MONOCHROME2`` (DICOM)."""

    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    fmt: str
    split: str
    study_date: str
    study_time: str
    report: int  # index into the loaded reports
    mask: int
    specs: tuple[DrawSpec, ...] = ()

    @property
    def folder(self) -> str:
        return f"files/p{self.subject_id[:2]}/p{self.subject_id}/s{self.study_id}"

    @property
    def filename(self) -> str:
        return f"{self.folder}/{self.dicom_id}.{'jpg' if self.fmt == 'jpg' else 'dcm'}"


def _unique_ids(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    seen: set[int] = set()
    out: list[str] = []
    while len(out) < n:
        v = int(rng.integers(lo, hi))
        if v not in seen:
            seen.add(v)
            out.append(str(v))
    return out


def _dicom_ids(rng: np.random.Generator, n: int) -> list[str]:
    out, seen = [], set()
    while len(out) < n:
        d = "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5, dtype=np.uint64))
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def plan_tree(reports: Sequence[IUReport], chosen: np.ndarray, specs: dict[int, list[DrawSpec]], n_masks: int,
              seed: int) -> list[PlannedImage]:
    """Patients, studies, images, views, file formats and the patient-disjoint split, all fixed by ``seed``."""
    rng = np.random.default_rng([seed, 23])
    order = rng.permutation(chosen)
    sizes, probs = zip(*STUDIES_PER_SUBJECT, strict=True)
    groups: list[list[int]] = []
    i = 0
    while i < len(order):
        k = int(rng.choice(sizes, p=probs))
        groups.append([int(r) for r in order[i:i + k]])
        i += k
    n_sub = len(groups)
    subject_ids = _unique_ids(rng, n_sub, 10_000_000, 20_000_000)
    study_ids = iter(_unique_ids(rng, len(order), 50_000_000, 60_000_000))
    # Patient-disjoint split: whole patients go to train / validate / test.
    perm = rng.permutation(n_sub)
    n_val = int(round(SPLIT_SHARES[1] * n_sub)) if n_sub >= 10 else int(n_sub >= 3)
    n_test = int(round(SPLIT_SHARES[2] * n_sub)) if n_sub >= 10 else int(n_sub >= 2)
    split_of = np.full(n_sub, "train", dtype=object)
    split_of[perm[:n_test]] = "test"
    split_of[perm[n_test:n_test + n_val]] = "validate"
    masks = rng.integers(0, n_masks, n_sub)
    studies: list[tuple[int, str, str, int, str, str]] = []  # (report, subject, study, mask, split, date)
    for g, members in enumerate(groups):
        day = int(rng.integers(0, 365 * 20))
        for r in members:
            day += int(rng.integers(1, 400))
            year, rest = 2110 + day // 365, day % 365
            date = f"{year}{1 + rest // 31 % 12:02d}{1 + rest % 28:02d}"
            studies.append((r, subject_ids[g], next(study_ids), int(masks[g]), str(split_of[g]), date))
    n_st = len(studies)
    lateral = set(rng.choice(n_st, min(n_st, max(1, int(round(LATERAL_SHARE * n_st)))), replace=False).tolist())
    n_dcm = min(n_st, max(2, int(round(DICOM_SHARE * n_st)))) if n_st >= 2 else n_st
    dicom = rng.choice(n_st, n_dcm, replace=False).tolist()
    fmt_of = {s: ("MONOCHROME1" if j % 2 == 0 else "MONOCHROME2") for j, s in enumerate(dicom)}
    ap = rng.random(n_st) < AP_SHARE
    ids = iter(_dicom_ids(rng, n_st + len(lateral)))
    images: list[PlannedImage] = []
    for s, (r, subject, study, mask, split, date) in enumerate(studies):
        t = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}.000"
        images.append(PlannedImage(next(ids), subject, study, "AP" if ap[s] else "PA", fmt_of.get(s, "jpg"), split,
                                   date, t, r, mask, tuple(specs[r])))
        if s in lateral:
            images.append(PlannedImage(next(ids), subject, study, "LATERAL", "jpg", split, date, t, r, mask))
    images.sort(key=lambda im: (im.subject_id, im.study_id, im.view == "LATERAL", im.dicom_id))
    return images


def _write_dicom(path: Path, pixels: np.ndarray, im: PlannedImage) -> None:
    """A 12-bit DX DICOM of an 8-bit image (``value * 4095 / 255``), MONOCHROME1 stored inverted."""
    uid = generate_uid(entropy_srcs=["medvl-phantom", im.dicom_id])
    v = np.rint(pixels.astype(np.float32) * (4095.0 / 255.0)).astype(np.uint16)
    ds = grey_dicom(v, sop_class=DigitalXRayImageStorageForPresentation, photometric=im.fmt, bits_stored=12, sop_instance_uid=uid)
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
        return textwrap.fill(text, width=77, initial_indent=" ", subsequent_indent=" ", break_on_hyphens=False)

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
        info = {"dicom_id": im.dicom_id, "subject_id": im.subject_id, "study_id": im.study_id, "view": im.view,
                "file": im.filename, "format": im.fmt, "split": im.split}
        if im.view == "LATERAL":
            pixels = render_lateral(job.size, rng)
            info.update(lung_mask="", ctr="", angle="", scale="", drawn="", masks="")
        else:
            fr = render_frontal(list(im.specs), atlas, im.mask, job.size, rng, lesions)
            pixels = fr.image
            for r in fr.regions:
                regions.append({
                    "dicom_id": im.dicom_id, "finding": r.spec.finding or r.spec.kind.value,
                    "side": r.spec.side.value if r.spec.side else "", "zone": r.spec.zone.value if r.spec.zone else "",
                    "x0": r.box[0], "y0": r.box[1], "x1": r.box[2], "y1": r.box[3],
                    "observation": r.spec.observation, "word": r.spec.word,
                })
            mask_rel = f"masks/{im.dicom_id}.npz"
            (raw / "masks").mkdir(exist_ok=True)
            (raw / mask_rel).write_bytes(npz_bytes(
                regions=np.stack([r.mask for r in fr.regions]) if fr.regions
                else np.zeros((0, job.size, job.size), bool),
                anatomy=fr.anatomy))
            drawn = ";".join(f"{r.spec.kind.value}{':' + r.spec.device.value if r.spec.device else ''}"
                             for r in fr.regions)
            info.update(lung_mask=fr.params["mask"], ctr=fr.params["ctr"], angle=fr.params["angle"],
                        scale=fr.params["scale"], drawn=drawn, masks=mask_rel)
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


def _params(studies: int | None, size: int, seed: int) -> dict:
    return {"version": PHANTOM_VERSION, "studies": studies, "size": size, "seed": seed}


def _check_args(size: int, seed: int, studies: int | None, workers: int) -> None:
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
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def build_phantom_raw(raw: str | Path, *, studies: int | None = None, size: int = 256, seed: int = 0,
                      workers: int = 1) -> PhantomBuild:
    """Write the IU-Phantom raw tree (MIMIC-CXR-JPG layout, see the module docstring) into ``raw``.

    ``studies``: how many IU reports to use (default all 3,927 with a section), drawn for ``seed`` with the share of
    abnormal reports kept. A ``raw`` folder already holding a complete build with the same arguments is reused;
    one holding anything else is an error.
    """
    _check_args(size, seed, studies, workers)
    raw = Path(raw)
    params = _params(studies, size, seed)
    info_path = raw / INFO_FILE
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("params") == params:
            return PhantomBuild(raw=raw, **info["counts"], seconds={}, reused=True)
        raise DataError(f"{raw} holds an IU-Phantom built with {info.get('params')}, not {params}; "
                        "use another --out, or delete it")
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
        chunks = [unique[i:i + 64] for i in range(0, len(unique), 64)]
        results = pool.map(_mentions_chunk, chunks) if pool else map(_mentions_chunk, chunks)
        for chunk, res in zip(chunks, tqdm(results, total=len(chunks), desc="phantom: labelling reports",
                                           unit="chunk", mininterval=1.0), strict=True):
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
        jobs = [_RenderJob(str(raw), size, seed, tuple(images[i:i + per_job])) for i in range(0, len(images), per_job)]
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
        exam = {"AP": "CHEST (PORTABLE AP)"}.get(im.view, "CHEST (PA AND LAT)" if study in has_lateral
                                                  else "CHEST (PA)")
        (raw / f"{im.folder}.txt").write_text(_report_file(reports[im.report], exam))
    meta_rows, split_rows = [], []
    for im in images:
        exam = {"AP": "CHEST (PORTABLE AP)"}.get(by_study[im.study_id].view,
                                                 "CHEST (PA AND LAT)" if im.study_id in has_lateral else "CHEST (PA)")
        meta_rows.append({
            "dicom_id": im.dicom_id, "subject_id": im.subject_id, "study_id": im.study_id,
            "PerformedProcedureStepDescription": exam, "ViewPosition": im.view, "Rows": size, "Columns": size,
            "StudyDate": im.study_date, "StudyTime": im.study_time, "ProcedureCodeSequence_CodeMeaning": exam,
            "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior"}.get(im.view,
                                                                                                     "lateral"),
            "PatientOrientationCodeSequence_CodeMeaning": "Recumbent" if im.view == "AP" else "Erect",
        })
        split_rows.append({"dicom_id": im.dicom_id, "study_id": im.study_id, "subject_id": im.subject_id,
                           "split": im.split})
    _write_csv_gz(raw / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(meta_rows, columns=METADATA_COLUMNS))
    _write_csv_gz(raw / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame(split_rows, columns=SPLIT_COLUMNS))
    chex_rows = []
    for study, im in by_study.items():
        lab = labels[im.report]
        row = {"subject_id": im.subject_id, "study_id": study}
        for j, name in enumerate(CHEXPERT_LABELS):
            row[name] = "" if np.isnan(lab[j]) else f"{float(lab[j]):.1f}"
        chex_rows.append(row)
    _write_csv_gz(raw / "mimic-cxr-2.0.0-chexpert.csv.gz", pd.DataFrame(chex_rows, columns=CHEXPERT_COLUMNS))
    region_rows = [r for _, rs in rendered for r in rs]
    pd.DataFrame(region_rows, columns=REGION_COLUMNS).to_csv(raw / "regions.csv", index=False)
    manifest = []
    for im, (info, rs) in zip(images, rendered, strict=True):
        rep = reports[im.report]
        manifest.append({**info, "iu_uid": rep.uid, "iu_source": rep.source, "regions": len(rs),
                         "planned": len(im.specs) if im.view != "LATERAL" else 0})
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
    info = {"params": params, "counts": counts,
            "sources": {"reports": "torchxrayvision NLMCXR_reports.tgz (IU X-ray, Open-i; CC BY-NC-ND 4.0)",
                        "lung_masks": f"torchxrayvision semantic_masks_v7labs_lungs.zip ({len(atlas)} usable)",
                        "lesion_sizes": "torchxrayvision BBox_List_2017.csv.gz (NIH ChestX-ray14)"},
            "lung_masks_skipped": [list(s) for s in atlas.skipped]}
    info_path.write_text(json.dumps(info, indent=1))  # written last: marks the tree complete
    building.unlink()
    seconds["other"] = time.perf_counter() - t0 - sum(seconds.values())
    return PhantomBuild(raw=raw, **counts, seconds=seconds)


# --- contact sheet ------------------------------------------------------------------------------------------------

_COLOURS = {
    "cardiomegaly": (255, 80, 80), "effusion": (80, 160, 255), "pneumothorax": (255, 220, 0),
    "consolidation": (255, 140, 0), "opacity": (255, 170, 90), "pneumonia": (255, 110, 40),
    "atelectasis": (200, 120, 255), "edema": (0, 220, 220), "nodule": (120, 255, 120), "mass": (60, 220, 60),
    "granuloma": (170, 255, 170), "device": (255, 120, 220), "fracture": (255, 255, 255),
    "enlarged_cardiomediastinum": (255, 60, 160), "pleural_other": (150, 200, 255),
}


def write_contact_sheet(raw: str | Path, out_png: str | Path, *, n: int = 16, columns: int = 4,
                        tile: int = 256) -> Path:
    """A grid of ``n`` frontal JPG images of a phantom raw tree with their finding boxes and labels drawn.

    Images are chosen to show as many kinds of finding as possible, plus a few normal ones.
    """
    raw = Path(raw)
    man = pd.read_csv(raw / MANIFEST_FILE, dtype=str, keep_default_na=False)
    reg = pd.read_csv(raw / "regions.csv", dtype={"dicom_id": str}, keep_default_na=False)
    man = man[(man["view"] != "LATERAL") & (man["format"] == "jpg")]
    if man.empty:
        raise DataError(f"{raw}: no frontal JPG images for a contact sheet")
    by_image = {d: g for d, g in reg.groupby("dicom_id", sort=False)}
    kinds_of = {d: set(g["finding"]) for d, g in by_image.items()}
    n_normal = max(1, n // 8)
    seen: set[str] = set()
    picks: list[str] = []
    abnormal = [d for d in man["dicom_id"] if d in by_image]
    # Greedy: each pick adds the most kinds not shown yet; among equals, the image with fewer boxes (readable).
    pool_ids = [d for d in abnormal if len(by_image[d]) <= 4] or list(abnormal)
    while pool_ids and len(picks) < n - n_normal:
        gains = [len(kinds_of[d] - seen) - 0.1 * len(by_image[d]) for d in pool_ids]
        best = int(np.argmax(gains))
        if gains[best] <= 0 and len(picks) >= (n - n_normal) // 2:
            # Nothing new: take the images with the most findings.
            rest = sorted(pool_ids, key=lambda d: -len(by_image[d]))
            picks += rest[: n - n_normal - len(picks)]
            break
        d = pool_ids.pop(best)
        picks.append(d)
        seen |= kinds_of[d]
    normals = [d for d in man["dicom_id"] if d not in by_image]
    picks += normals[: n - len(picks)]
    picks = picks[:n]
    rows = -(-len(picks) // columns)
    caption = 14
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), (0, 0, 0))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(sheet)
    files = dict(zip(man["dicom_id"], man["file"], strict=True))
    views = dict(zip(man["dicom_id"], man["view"], strict=True))
    for k, d in enumerate(picks):
        im = Image.open(raw / files[d]).convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR)
        ox, oy = (k % columns) * tile, (k // columns) * (tile + caption)
        sheet.paste(im, (ox, oy))
        g = by_image.get(d)
        names = []
        if g is not None:
            for _, r in g.iterrows():
                col = _COLOURS.get(r["finding"], (255, 255, 255))
                x0, y0, x1, y1 = (float(r[c]) * tile for c in ("x0", "y0", "x1", "y1"))
                draw.rectangle([ox + x0, oy + y0, ox + x1, oy + y1], outline=col, width=1)
                side = {"left": " L", "right": " R"}.get(r["side"], "")
                label = f"{r['finding'][:12]}{side}"
                draw.text((ox + x0 + 2, oy + y0 + 1), label, fill=col, font=font)
                names.append(label)
        text = f"{views[d]}  " + (", ".join(dict.fromkeys(names)) if names else "normal")
        draw.text((ox + 3, oy + tile + 1), text[:48], fill=(230, 230, 230), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


# --- the command ----------------------------------------------------------------------------------------------------


@dataclass
class PhantomResult:
    """``build``: the raw tree; ``prepared``: the MIMIC ingestion's result; ``contact_sheet``: its path."""

    build: PhantomBuild
    prepared: PrepareResult
    contact_sheet: Path
    seconds: float


def prepare_phantom(out: str | Path, *, studies: int | None = None, size: int = 256, seed: int = 0,
                    workers: int = 1) -> PhantomResult:
    """``medvl prepare phantom``: build IU-Phantom under ``out/raw/`` and prepare it into ``out/`` through the
    MIMIC-CXR ingestion (``views=("PA", "AP")``, ``sections="both"``); write ``out/contact_sheet.png``."""
    from medvl.data.mimic import prepare_mimic

    started = time.perf_counter()
    out = Path(out)
    _check_args(size, seed, studies, workers)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; --out must be a directory")
    if out.exists() and any(out.iterdir()) and not any((out / "raw" / f).exists() for f in (INFO_FILE, BUILDING_FILE)):
        raise DataError(f"{out} is not empty and holds no IU-Phantom; use another --out")
    build = build_phantom_raw(out / "raw", studies=studies, size=size, seed=seed, workers=workers)
    if build.reused:
        print(f"IU-Phantom: reusing the raw tree in {build.raw} (same arguments)")
    else:
        print(f"IU-Phantom: {build.studies} studies, {build.images} images ({build.laterals} lateral, {build.dicoms} "
              f"DICOM), {build.regions} drawn findings in {sum(build.seconds.values()):.1f}s")
    prepared = prepare_mimic(out / "raw", out, size=size, views=("PA", "AP"), sections="both", workers=workers,
                             meta_extra={"source": "iu-phantom", "ingested_as": "mimic-cxr",
                                         "phantom": {**_params(studies, size, seed), "raw": "raw",
                                                     "masks": "raw/masks/<dicom_id>.npz"}})
    t = time.perf_counter()
    sheet = write_contact_sheet(out / "raw", out / CONTACT_SHEET)
    build.seconds["contact_sheet"] = time.perf_counter() - t
    return PhantomResult(build=build, prepared=prepared, contact_sheet=sheet, seconds=time.perf_counter() - started)

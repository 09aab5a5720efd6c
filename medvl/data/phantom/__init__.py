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

Modules: :mod:`~medvl.data.phantom.plan` (what to draw, the patients, studies and split),
:mod:`~medvl.data.phantom.build` (writing the raw tree), :mod:`~medvl.data.phantom.draw` with
:mod:`~medvl.data.phantom.frame` and :mod:`~medvl.data.phantom.findings` (drawing an image),
:mod:`~medvl.data.phantom.anatomy` (lung masks and lesion sizes), :mod:`~medvl.data.phantom.sheet` (the contact
sheet); this module holds the command, :func:`prepare_phantom`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from medvl.data.ingest import PrepareResult
from medvl.data.mimic import prepare_mimic
from medvl.data.phantom.build import (
    BUILDING_FILE,
    CONTACT_SHEET,
    INFO_FILE,
    MANIFEST_FILE,
    MAX_SIZE,
    MIN_SIZE,
    PHANTOM_VERSION,
    REGION_COLUMNS,
    PhantomBuild,
    build_params,
    build_phantom_raw,
    check_build_args,
)
from medvl.data.phantom.plan import labelled_text, load_iu_reports, plan_findings
from medvl.data.phantom.sheet import write_contact_sheet
from medvl.errors import DataError

__all__ = [
    "BUILDING_FILE",
    "CONTACT_SHEET",
    "INFO_FILE",
    "MANIFEST_FILE",
    "MAX_SIZE",
    "MIN_SIZE",
    "PHANTOM_VERSION",
    "REGION_COLUMNS",
    "PhantomBuild",
    "PhantomResult",
    "build_phantom_raw",
    "labelled_text",
    "load_iu_reports",
    "plan_findings",
    "prepare_phantom",
    "write_contact_sheet",
]


@dataclass
class PhantomResult:
    """``build``: the raw tree; ``prepared``: the MIMIC ingestion's result; ``contact_sheet``: its path."""

    build: PhantomBuild
    prepared: PrepareResult
    contact_sheet: Path
    seconds: float


def prepare_phantom(
    out: str | Path, *, studies: int | None = None, size: int = 256, seed: int = 0, workers: int = 1
) -> PhantomResult:
    """``medvl prepare phantom``: build IU-Phantom under ``out/raw/`` and prepare it into ``out/`` through the
    MIMIC-CXR ingestion (``views=("PA", "AP")``, ``sections="both"``); write ``out/contact_sheet.png``."""
    started = time.perf_counter()
    out = Path(out)
    check_build_args(size, seed, studies, workers)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; --out must be a directory")
    if (
        out.exists()
        and any(out.iterdir())
        and not any((out / "raw" / f).exists() for f in (INFO_FILE, BUILDING_FILE))
    ):
        raise DataError(f"{out} is not empty and holds no IU-Phantom; use another --out")
    build = build_phantom_raw(out / "raw", studies=studies, size=size, seed=seed, workers=workers)
    if build.reused:
        print(f"IU-Phantom: reusing the raw tree in {build.raw} (same arguments)")
    else:
        print(
            f"IU-Phantom: {build.studies} studies, {build.images} images ({build.laterals} lateral, {build.dicoms} "
            f"DICOM), {build.regions} drawn findings in {sum(build.seconds.values()):.1f}s"
        )
    prepared = prepare_mimic(
        out / "raw",
        out,
        size=size,
        views=("PA", "AP"),
        sections="both",
        workers=workers,
        meta_extra={
            "source": "iu-phantom",
            "ingested_as": "mimic-cxr",
            "phantom": {
                **build_params(studies, size, seed),
                "raw": "raw",
                "masks": "raw/masks/<dicom_id>.npz",
            },
        },
    )
    t = time.perf_counter()
    sheet = write_contact_sheet(out / "raw", out / CONTACT_SHEET)
    build.seconds["contact_sheet"] = time.perf_counter() - t
    return PhantomResult(
        build=build, prepared=prepared, contact_sheet=sheet, seconds=time.perf_counter() - started
    )

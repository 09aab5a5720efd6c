"""What an IU-Phantom build draws and where it puts it, before anything is drawn: the findings of each report
(:func:`plan_findings`), which reports are used (:func:`select_studies`), and the patients, studies, images, views,
file formats and patient-disjoint split of the raw tree (:func:`plan_tree`), all fixed by the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medvl.data.phantom.frame import DrawSpec
from medvl.data.reports import IUReport, iter_iu_reports
from medvl.errors import DataError
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

# --- findings: labeler mentions -> what to draw -----------------------------------------------------------------

#: The side a one-sided device is drawn on when its report gives none.
DEFAULT_DEVICE_SIDE: dict[Device, Side] = {
    Device.PACEMAKER: Side.LEFT,
    Device.CENTRAL_LINE: Side.RIGHT,
    Device.PORT: Side.RIGHT,
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
            specs.append(
                DrawSpec(
                    kind=e.kind,
                    side=side if sided else None,
                    zone=zone,
                    severity=e.severity,
                    device=e.device,
                    finding=e.finding,
                    observation=e.observation,
                    word=e.word,
                )
            )
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


def _masks_per_split(rng: np.random.Generator, n_masks: int, split_of: np.ndarray) -> np.ndarray:
    """One lung mask per subject, drawn from its split's own pool: each mask belongs to one split only (shares as
    :data:`SPLIT_SHARES`, at least one mask per split), so no test scan reuses the anatomy of a training scan.
    With fewer than three masks the splits have to share them."""
    if n_masks < 3:
        return rng.integers(0, n_masks, len(split_of))
    perm = rng.permutation(n_masks)
    n_val = max(1, int(round(SPLIT_SHARES[1] * n_masks)))
    n_test = max(1, int(round(SPLIT_SHARES[2] * n_masks)))
    pools = {
        "test": perm[:n_test],
        "validate": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }
    out = np.empty(len(split_of), dtype=np.int64)
    for split, pool in pools.items():
        members = np.nonzero(split_of == split)[0]
        out[members] = pool[rng.integers(0, len(pool), len(members))]
    return out


def plan_tree(
    reports: Sequence[IUReport], chosen: np.ndarray, specs: dict[int, list[DrawSpec]], n_masks: int, seed: int
) -> list[PlannedImage]:
    """Patients, studies, images, views, file formats and the patient-disjoint split (lung masks disjoint too), all
    fixed by ``seed``."""
    rng = np.random.default_rng([seed, 23])
    order = rng.permutation(chosen)
    sizes, probs = zip(*STUDIES_PER_SUBJECT, strict=True)
    groups: list[list[int]] = []
    i = 0
    while i < len(order):
        k = int(rng.choice(sizes, p=probs))
        groups.append([int(r) for r in order[i : i + k]])
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
    split_of[perm[n_test : n_test + n_val]] = "validate"
    masks = _masks_per_split(rng, n_masks, split_of)
    studies: list[tuple[int, str, str, int, str, str]] = []  # (report, subject, study, mask, split, date)
    for g, members in enumerate(groups):
        day = int(rng.integers(0, 365 * 20))
        for r in members:
            day += int(rng.integers(1, 400))
            year, rest = 2110 + day // 365, day % 365
            date = f"{year}{1 + rest // 31 % 12:02d}{1 + rest % 28:02d}"
            studies.append((r, subject_ids[g], next(study_ids), int(masks[g]), str(split_of[g]), date))
    n_st = len(studies)
    lateral = set(
        rng.choice(n_st, min(n_st, max(1, int(round(LATERAL_SHARE * n_st)))), replace=False).tolist()
    )
    n_dcm = min(n_st, max(2, int(round(DICOM_SHARE * n_st)))) if n_st >= 2 else n_st
    dicom = rng.choice(n_st, n_dcm, replace=False).tolist()
    fmt_of = {s: ("MONOCHROME1" if j % 2 == 0 else "MONOCHROME2") for j, s in enumerate(dicom)}
    ap = rng.random(n_st) < AP_SHARE
    ids = iter(_dicom_ids(rng, n_st + len(lateral)))
    images: list[PlannedImage] = []
    for s, (r, subject, study, mask, split, date) in enumerate(studies):
        t = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}.000"
        images.append(
            PlannedImage(
                next(ids),
                subject,
                study,
                "AP" if ap[s] else "PA",
                fmt_of.get(s, "jpg"),
                split,
                date,
                t,
                r,
                mask,
                tuple(specs[r]),
            )
        )
        if s in lateral:
            images.append(PlannedImage(next(ids), subject, study, "LATERAL", "jpg", split, date, t, r, mask))
    images.sort(key=lambda im: (im.subject_id, im.study_id, im.view == "LATERAL", im.dicom_id))
    return images

"""No-pixel pointers for the pointing game: what the report text alone says about where a finding is.

A model that points at a finding must beat a pointer that never looks at the image. :class:`LayoutPrior` is that
pointer, fitted on the *training* split only: for each (finding, side, zone) it keeps the mean ground-truth box of
the training regions of that finding drawn on that side whose report stated that zone. For a test pair it reads
the report as medvl's labeler does (:func:`medvl.text.layout.merge_mentions`: the same reading that drew
IU-Phantom) and takes the mean box of the finding

1. for the side the report states and the zone it states for that side (a report silent on the zone meets
   the training regions whose reports were silent on it too),
2. else for that side, over every zone,
3. else (no side stated) for the side with the most training regions of the finding (and the stated zone
   where the report gives one), a pointer that picks the likelier side;
4. else the finding's mean box over everything; a finding never seen in training gets the image centre.

It points at that box's centre (``pointing_game_prior``) and scores that box's IoU (``box_iou_prior``).
``pointing_game_centre`` points at the image centre. Pairs whose region lies on one side and whose report states
no side for the finding form the ``_unstated`` subset, where only pixels can tell the side.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medvl.text.labeler import extract_mentions
from medvl.text.layout import allowed_zone, merge_mentions

WIDEN = 0.05  # the pointing game's widening of region boxes (medvl.eval.alignment.WIDEN)
CENTRE_BOX = np.array([0.25, 0.25, 0.75, 0.75], dtype=np.float64)
SIDED = ("left", "right")

CONVENTIONS = {
    "pointing_game_prior": "no-pixel pointer fitted on the training split: the centre of the finding's mean "
    "training box for the side and zone the report states (labeler reading), falling back to the side, then "
    "(no side stated) the likelier side, then the finding",
    "box_iou_prior": "IoU of that mean training box with the closest of the pair's region boxes",
    "pointing_game_centre": "a pointer at the image centre (0.5, 0.5)",
    "_unstated": "the same keys on the pairs whose region lies on one side and whose report states no side for "
    "that finding: only pixels can tell where it is",
    "gap_prior": "model minus prior per pair, averaged (a paired difference; its interval resamples the pairs' "
    "studies once for both)",
}


def point_scores(point: Sequence[float], box: Sequence[float], regions: np.ndarray) -> tuple[float, float]:
    """A pointer's hit (``point`` (x, y) inside any of ``regions`` (R, 4) widened by :data:`WIDEN`) and the IoU
    of its ``box`` (x0, y0, x1, y1) with the closest region; normalised image coordinates."""
    regions = np.asarray(regions, dtype=np.float64).reshape(-1, 4)
    x, y = float(point[0]), float(point[1])
    hit = bool(
        (
            (x >= regions[:, 0] - WIDEN)
            & (x <= regions[:, 2] + WIDEN)
            & (y >= regions[:, 1] - WIDEN)
            & (y <= regions[:, 3] + WIDEN)
        ).any()
    )
    return float(hit), max(_iou(np.asarray(box, dtype=np.float64), r) for r in regions)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass(frozen=True)
class StatedLayout:
    """What a report states about one finding: the sides (``left``/``right``; bilateral gives both) and the zone
    stated per side (``""`` for a statement without a side)."""

    sides: frozenset[str]
    zones: Mapping[str, str]


def stated_for(report: str) -> dict[str, StatedLayout]:
    """``finding -> StatedLayout`` of the positive findings of ``report`` (medvl's labeler reading)."""
    sides: dict[str, set[str]] = defaultdict(set)
    zones: dict[str, dict[str, str]] = defaultdict(dict)
    for e in merge_mentions(extract_mentions(report)):
        finding = e.kind.value
        side = e.side.value if e.side is not None else ""
        if side:
            sides[finding].add(side)
        if e.zone is not None:
            zones[finding].setdefault(side, allowed_zone(e.kind, e.zone).value)
        else:
            zones[finding].setdefault(side, "")
    return {f: StatedLayout(frozenset(sides[f]), dict(zones[f])) for f in set(sides) | set(zones)}


class LayoutPrior:
    """Mean training boxes per (finding, side, zone), (finding, side) and finding; see the module docstring."""

    def __init__(self, boxes: Mapping[tuple, tuple[np.ndarray, int]]):
        self.boxes = dict(boxes)

    @classmethod
    def fit(cls, regions: pd.DataFrame, reports: Mapping[str, str]) -> LayoutPrior:
        """``regions``: the training split's ``regions.csv`` rows (``dicom_id, finding, side, x0, y0, x1, y1``);
        ``reports``: ``dicom_id -> report`` of the same images."""
        sums: dict[tuple, np.ndarray] = defaultdict(lambda: np.zeros(4))
        counts: dict[tuple, int] = defaultdict(int)
        stated_cache: dict[str, dict[str, StatedLayout]] = {}
        for r in regions.itertuples(index=False):
            report = reports.get(str(r.dicom_id))
            if report is None:
                continue
            stated = stated_cache.get(report)
            if stated is None:
                stated = stated_cache[report] = stated_for(report)
            finding = str(r.finding)
            side = str(r.side) if str(r.side) in SIDED else ""
            layout = stated.get(finding)
            zone = ""
            if layout is not None:
                zone = layout.zones.get(side if side in layout.sides else "", "")
            box = np.array([r.x0, r.y0, r.x1, r.y1], dtype=np.float64)
            for key in ((finding, side, zone), (finding, side), (finding,)):
                sums[key] += box
                counts[key] += 1
        return cls({k: (sums[k] / counts[k], counts[k]) for k in counts})

    def box(self, finding: str, stated: StatedLayout | None) -> np.ndarray:
        """The prior box (x0, y0, x1, y1) for ``finding`` given what the report states about it."""
        if stated is not None and stated.sides:
            candidates = sorted(stated.sides)
        else:
            candidates = sorted({k[1] for k in self.boxes if len(k) == 2 and k[0] == finding})
        best: tuple[int, np.ndarray] | None = None
        for side in candidates:
            zone = ""
            if stated is not None:
                zone = stated.zones.get(side, stated.zones.get("", ""))
            # A report silent on the zone meets the regions of reports that were silent too (zone ""):
            # where the findings of such reports lie is itself learnt from the training split.
            for key in ((finding, side, zone), (finding, side)):
                if key in self.boxes:
                    box, n = self.boxes[key]
                    if best is None or n > best[0]:
                        best = (n, box)
                    break
        if best is not None:
            return best[1]
        if (finding,) in self.boxes:
            return self.boxes[(finding,)][0]
        return CENTRE_BOX


@dataclass
class PriorRecord:
    """The no-pixel pointers' scores on one (image, finding word) pair of the pointing game."""

    dicom_id: str
    word: str
    prior_hit: float
    prior_iou: float
    centre_hit: float
    unstated: bool


def score_priors(
    prior: LayoutPrior,
    pairs: Sequence[tuple[str, str]],
    regions: pd.DataFrame,
    reports: Mapping[str, str],
) -> list[PriorRecord]:
    """Score the prior and centre pointers on ``pairs`` ((dicom_id, word) of the model's pointing records),
    with the split's ``regions`` grouped as the pointing game groups them (by the word's last token)."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for r in regions.itertuples(index=False):
        word = str(r.word).strip().split()[-1].lower() if str(r.word).strip() else ""
        groups[(str(r.dicom_id), word)].append(r)
    stated_cache: dict[str, dict[str, StatedLayout]] = {}
    out = []
    for dicom_id, word in pairs:
        rows = groups.get((str(dicom_id), word.lower()), [])
        if not rows:
            raise ValueError(f"no region of {dicom_id} has the word {word!r}")
        report = reports[str(dicom_id)]
        stated = stated_cache.get(report)
        if stated is None:
            stated = stated_cache[report] = stated_for(report)
        finding = str(rows[0].finding)
        layout = stated.get(finding)
        boxes = np.array([[r.x0, r.y0, r.x1, r.y1] for r in rows], dtype=np.float64)
        pbox = prior.box(finding, layout)
        centre = ((pbox[0] + pbox[2]) / 2, (pbox[1] + pbox[3]) / 2)
        hit, iou = point_scores(centre, pbox, boxes)
        centre_hit, _ = point_scores((0.5, 0.5), CENTRE_BOX, boxes)
        one_sided = any(str(r.side) in SIDED for r in rows)
        unstated = one_sided and (layout is None or not layout.sides)
        out.append(PriorRecord(str(dicom_id), word, hit, iou, centre_hit, unstated))
    return out

"""Where a report puts its findings, as image maps for the diffusion UNet's side-hint channels.

:func:`report_sides` says which side of the patient has a positive finding; :func:`report_layout` draws a soft box
per stated (finding, side, zone), from a layout prior (:data:`DEFAULT_LAYOUT_PRIOR`, or
:func:`layout_prior_from_regions` estimated from a training split's region boxes). The reading of the report is
:mod:`medvl.text.layout`'s, the same that the IU-Phantom draws from.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from medvl.text.labeler import report_mentions
from medvl.text.layout import stated_layout

__all__ = ["report_sides", "DEFAULT_LAYOUT_PRIOR", "layout_prior_from_regions", "report_layout"]


def report_sides(texts: Sequence[str]) -> torch.Tensor:
    """(B, 2) float {0, 1}: does the report state a positive finding on the patient's right / left?

    Read with medvl's labeler (:func:`medvl.text.labeler.extract_mentions`): positive mentions only (negated
    and uncertain ones are left out), "bilateral" counts on both sides; sideless findings (cardiomegaly) on
    neither. On IU-Phantom this is also how the drawing program reads the report, so this hint is close to the
    truth there; on real reports it is as good as the labeler.
    """
    out = torch.zeros(len(texts), 2)
    for i, text in enumerate(texts):
        for m in report_mentions(text):
            if m.value != 1.0 or m.side is None:
                continue
            side = str(getattr(m.side, "value", m.side))
            if side in ("right", "bilateral"):
                out[i, 0] = 1.0
            if side in ("left", "bilateral"):
                out[i, 1] = 1.0
    return out


#: Where one-sided findings sit on a PA film by zone, patient right (image left); the patient's left mirrors x.
#: [cx, cy, w, h] in normalised image coordinates, rough adult PA framing (lungs from about 10% to 75% of the
#: height). Used when the training data has no region boxes to estimate a prior from.
_RIGHT_ZONES = {
    "apex": [0.30, 0.15, 0.16, 0.12],
    "upper": [0.31, 0.27, 0.20, 0.15],
    "mid": [0.30, 0.42, 0.20, 0.15],
    "lower": [0.30, 0.56, 0.22, 0.15],
    "base": [0.27, 0.67, 0.26, 0.12],
    "perihilar": [0.40, 0.42, 0.14, 0.25],
    "any": [0.30, 0.45, 0.28, 0.50],
}
DEFAULT_LAYOUT_PRIOR: dict[str, list[float]] = {
    **{f"*/right/{z}": v for z, v in _RIGHT_ZONES.items()},
    **{f"*/left/{z}": [1 - v[0], *v[1:]] for z, v in _RIGHT_ZONES.items()},
    "*/left/retrocardiac": [0.58, 0.58, 0.14, 0.16],
    "effusion/right/any": _RIGHT_ZONES["base"],
    "effusion/left/any": [1 - _RIGHT_ZONES["base"][0], 0.67, 0.26, 0.12],
}


def layout_prior_from_regions(
    regions, dicom_ids: Sequence[str], min_count: int = 5
) -> dict[str, list[float]]:
    """Mean box [cx, cy, w, h] per "finding/side/zone", "finding/side/any", "*/side/zone" and "*/side/any" over
    the one-sided region boxes of ``dicom_ids`` (a ``regions.csv`` frame); keys with fewer than ``min_count``
    boxes are left out (:func:`report_layout` falls back to coarser keys, then to DEFAULT_LAYOUT_PRIOR)."""
    r = regions[regions["dicom_id"].astype(str).isin(set(map(str, dicom_ids)))]
    r = r[r["side"].astype(str).str.lower().isin(["left", "right"])]
    if not len(r):
        return {}
    r = pd.DataFrame(
        {
            "finding": r["finding"].astype(str),
            "side": r["side"].astype(str).str.lower(),
            "zone": r["zone"].astype(str).replace({"": "any", "nan": "any"}),
            "cx": (r["x0"] + r["x1"]) / 2,
            "cy": (r["y0"] + r["y1"]) / 2,
            "w": r["x1"] - r["x0"],
            "h": r["y1"] - r["y0"],
        }
    )
    out: dict[str, list[float]] = {}
    for finding_key, zone_key in (("finding", "zone"), ("finding", None), (None, "zone"), (None, None)):
        keys = [k for k in (finding_key, "side", zone_key) if k]
        for key, g in r.groupby(keys):
            if len(g) < min_count:
                continue
            key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
            name = f"{key.get('finding', '*')}/{key['side']}/{key.get('zone', 'any')}"
            out.setdefault(name, [round(float(g[c].mean()), 4) for c in ("cx", "cy", "w", "h")])
    return out


def report_layout(
    texts: Sequence[str], prior: dict[str, list[float]] | None = None, grid: int = 16
) -> torch.Tensor:
    """(B, 2, grid, grid) float in [0, 1]: where the report puts its one-sided positive findings, channel 0 for
    the patient's right, 1 for the left (the order of :func:`report_sides`).

    Each finding whose side the report states (:func:`medvl.text.layout.stated_layout`: medvl's labeler, sides
    and zones as written, "bilateral" on both sides, retrocardiac on the left) draws a Gaussian bump with the
    prior's box for its finding, side and zone (falling back to the zone "any", then to any finding), standard
    deviations half the box's width and height; bumps on one side combine by maximum. Sideless findings draw
    nothing: the report does not say where they are.
    """
    table = {**DEFAULT_LAYOUT_PRIOR, **(prior or {})}
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    out = torch.zeros(len(texts), 2, grid, grid)
    for i, text in enumerate(texts):
        for finding, side, zone in stated_layout(report_mentions(text)):
            z = zone or "any"
            box = next(
                table[k]
                for k in (f"{finding}/{side}/{z}", f"{finding}/{side}/any", f"*/{side}/{z}", f"*/{side}/any")
                if k in table
            )
            cx, cy, w, h = box
            gx = torch.exp(-0.5 * ((centres - cx) / max(w / 2, 0.5 / grid)) ** 2)
            gy = torch.exp(-0.5 * ((centres - cy) / max(h / 2, 0.5 / grid)) ** 2)
            c = 0 if side == "right" else 1
            out[i, c] = torch.maximum(out[i, c], gy[:, None] * gx[None, :])
    return out

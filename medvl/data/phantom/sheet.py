"""The contact sheet of an IU-Phantom build: frontal images with their finding boxes and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from medvl.data.phantom.build import MANIFEST_FILE
from medvl.errors import DataError

_COLOURS = {
    "cardiomegaly": (255, 80, 80),
    "effusion": (80, 160, 255),
    "pneumothorax": (255, 220, 0),
    "consolidation": (255, 140, 0),
    "opacity": (255, 170, 90),
    "pneumonia": (255, 110, 40),
    "atelectasis": (200, 120, 255),
    "edema": (0, 220, 220),
    "nodule": (120, 255, 120),
    "mass": (60, 220, 60),
    "granuloma": (170, 255, 170),
    "device": (255, 120, 220),
    "fracture": (255, 255, 255),
    "enlarged_cardiomediastinum": (255, 60, 160),
    "pleural_other": (150, 200, 255),
}


def write_contact_sheet(
    raw: str | Path, out_png: str | Path, *, n: int = 16, columns: int = 4, tile: int = 256
) -> Path:
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

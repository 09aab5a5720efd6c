"""The contact sheet of an IU-Phantom build: frontal images with their finding boxes and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from medvl.data.phantom.build import MANIFEST_FILE
from medvl.errors import DataError
from medvl.placement import place_labels

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
# Names as drawn: the finding kinds' own, with underscores as spaces, and the long one shortened.
_NAMES = {"enlarged_cardiomediastinum": "enl. cardiomediastinum", "pleural_other": "pleural other"}
LABEL_PX = 13  # box labels and captions, in sheet pixels (the sheet is meant to be seen at full size)
CAPTION_PX = 14


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
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _draw_sheet(raw, man, picks, by_image, columns, tile).save(out_png)
    return out_png


def label_of(finding: str, side: str) -> str:
    """A finding's label on the sheet: its name written out ("pleural other R"), the side as L or R."""
    name = _NAMES.get(finding, finding.replace("_", " "))
    return name + {"left": " L", "right": " R"}.get(side, "")


def caption_lines(text: str, width: int) -> list[str]:
    """``text`` cut at spaces into lines no wider than ``width`` pixels in the caption font (a word longer than a
    line stays whole, on a line of its own)."""
    font = ImageFont.load_default(size=CAPTION_PX)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _draw_sheet(
    raw: Path, man: pd.DataFrame, picks: list[str], by_image: dict, columns: int, tile: int
) -> Image.Image:
    """Each image upsampled smoothly to ``tile`` px with its boxes; one label per finding and side, on a plate of
    its colour, where it covers no other label; the view and findings as a wrapped caption below."""
    label_font = ImageFont.load_default(size=LABEL_PX)
    caption_font = ImageFont.load_default(size=CAPTION_PX)
    files = dict(zip(man["dicom_id"], man["file"], strict=True))
    views = dict(zip(man["dicom_id"], man["view"], strict=True))
    captions = {}
    for d in picks:
        g = by_image.get(d)
        names = (
            []
            if g is None
            else list(dict.fromkeys(label_of(f, s) for f, s in zip(g["finding"], g["side"], strict=True)))
        )
        captions[d] = caption_lines(f"{views[d]}: " + (", ".join(names) if names else "normal"), tile - 8)
    line_h = CAPTION_PX + 4
    caption_h = 6 + line_h * max(len(c) for c in captions.values())
    rows = -(-len(picks) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_h)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for k, d in enumerate(picks):
        im = Image.open(raw / files[d]).convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS)
        ox, oy = (k % columns) * tile, (k // columns) * (tile + caption_h)
        sheet.paste(im, (ox, oy))
        g = by_image.get(d)
        anchors, sizes, plates = [], [], []
        labelled: set[str] = set()
        for _, r in g.iterrows() if g is not None else ():
            col = _COLOURS.get(r["finding"], (255, 255, 255))
            box = tuple(float(r[c]) * tile for c in ("x0", "y0", "x1", "y1"))
            draw.rectangle([ox + box[0], oy + box[1], ox + box[2], oy + box[3]], outline=col, width=2)
            label = label_of(r["finding"], r["side"])
            if label in labelled:  # one label per finding and side (granulomas come in clusters)
                continue
            labelled.add(label)
            left, top, right, bottom = draw.textbbox((0, 0), label, font=label_font)
            anchors.append(box)
            sizes.append((right - left + 4, bottom - top + 4))
            plates.append((label, col, left, top))
        # Labels after every box, so that no outline crosses a label.
        for rect, (label, col, left, top) in zip(
            place_labels(anchors, sizes, tile, tile), plates, strict=True
        ):
            x, y = ox + rect[0], oy + rect[1]
            draw.rectangle([x, y, ox + rect[2], oy + rect[3]], fill=col)
            draw.text((x + 2 - left, y + 2 - top), label, font=label_font, fill=(0, 0, 0))
        for j, line in enumerate(captions[d]):
            draw.text((ox + 4, oy + tile + 3 + j * line_h), line, fill=(235, 235, 235), font=caption_font)
    return sheet

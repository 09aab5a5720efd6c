"""Scans with labelled boxes, drawn at the resolution the page shows them.

A 64 or 128 px scan shown 360 px wide would be blown up into blocks, and a label drawn on the small scan would
be blown up with it. Here the scan is upsampled smoothly (Lanczos) to ``PIXEL_RATIO`` times the displayed
width first, and the boxes and labels are drawn on that: label text is ``LABEL_PX`` CSS pixels tall on the page
(sharp on high-density screens), on a plate of its box's colour so it reads over any part of the scan, placed
where it covers no other label (:func:`medvl.placement.place_labels`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medvl.data.prepared import to_uint8
from medvl.placement import place_labels

DISPLAY_PX = 360  # CSS width of a scan on the page
CROP_DISPLAY_PX = 96  # CSS width of a keypatch crop
PIXEL_RATIO = 2  # image pixels per CSS pixel
LABEL_PX = 13  # label text height on the page, in CSS pixels
MAX_LABEL_WIDTH = 0.6  # a label longer than this share of the picture's width wraps onto more lines

COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (67, 99, 216),
    (245, 130, 49),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (188, 246, 12),
    (250, 190, 190),
)


@dataclass
class Picture:
    """A PNG with what the page needs to show it at its intended size: ``width`` and ``height`` in CSS
    pixels and ``label_px`` the labels' height in CSS pixels at that size."""

    png: bytes
    width: int
    height: int
    label_px: float


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def upsample(image: np.ndarray, width: int) -> Image.Image:
    """(S, S) scan in [-1024, 1024] -> RGB PIL image ``width`` px wide, resampled with Lanczos."""
    grey = Image.fromarray(to_uint8(image))
    height = round(width * grey.height / grey.width)
    return grey.resize((width, height), Image.Resampling.LANCZOS).convert("RGB")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def wrap_words(words: Sequence[str], width_of: Callable[[str], float], max_width: float) -> list[str]:
    """``words`` joined with ", " into lines no wider than ``max_width`` (as ``width_of`` measures them); a word
    wider than that stays whole on its own line."""
    lines: list[str] = []
    for word in words:
        if lines and width_of(f"{lines[-1]}, {word},") <= max_width:  # room for the comma a break adds
            lines[-1] = f"{lines[-1]}, {word}"
        else:
            if lines:
                lines[-1] += ","
            lines.append(word)
    return lines


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``fill`` (relative luminance)."""
    r, g, b = fill
    return (0, 0, 0) if 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 else (255, 255, 255)


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[str],
    *,
    display_px: int = DISPLAY_PX,
    label_px: int = LABEL_PX,
) -> Picture:
    """The scan ``image`` (S, S) in [-1024, 1024] with normalised boxes (K, 4) ``x0, y0, x1, y1`` and one
    label each, drawn at ``PIXEL_RATIO`` x ``display_px``. Labels of the same box share one outline and one
    label ("a, b"); each label sits on a plate of its box's colour, above the box if it can, never over another
    label."""
    width = display_px * PIXEL_RATIO
    canvas = upsample(image, width)
    w, h = canvas.size
    draw = ImageDraw.Draw(canvas)
    font = _font(label_px * PIXEL_RATIO)
    pad = PIXEL_RATIO * 2
    by_box: dict[tuple[float, ...], list[str]] = {}
    boxes = np.clip(np.asarray(boxes, dtype=float).reshape(-1, 4), 0.0, 1.0)
    for box, label in zip(boxes, labels, strict=False):
        words = by_box.setdefault(tuple(np.round(box, 4)), [])
        if label and label not in words:
            words.append(label)
    anchors, sizes, plates = [], [], []
    for k, (box, words) in enumerate(by_box.items()):
        colour = COLOURS[k % len(COLOURS)]
        rect = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
        draw.rectangle(rect, outline=colour, width=PIXEL_RATIO * 2)
        label = "\n".join(wrap_words(words, lambda t: draw.textlength(t, font=font), w * MAX_LABEL_WIDTH))
        if label:
            left, top, right, bottom = draw.multiline_textbbox((0, 0), label, font=font, spacing=pad)
            anchors.append(rect)
            sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
            plates.append((label, colour, left, top))
    # Labels after every box, so that no outline crosses a label.
    for rect, (label, colour, left, top) in zip(place_labels(anchors, sizes, w, h), plates, strict=True):
        draw.rectangle(rect, fill=colour)
        draw.multiline_text(
            (rect[0] + pad - left, rect[1] + pad - top),
            label,
            font=font,
            fill=_text_colour(colour),
            spacing=pad,
        )
    return Picture(_png(canvas), display_px, round(display_px * h / w), float(label_px))


def crop(image: np.ndarray, box: Sequence[float], *, display_px: int = CROP_DISPLAY_PX) -> Picture:
    """The part of the scan ``image`` (S, S) under the normalised ``box``, upsampled smoothly to
    ``PIXEL_RATIO`` x ``display_px`` (square: the box's longer side, centred, clipped to the scan)."""
    s = image.shape[-1]
    x0, y0, x1, y1 = (float(v) * s for v in box)
    side = max(x1 - x0, y1 - y0, 2.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(0.0, cx - side / 2), max(0.0, s - side))
    top = min(max(0.0, cy - side / 2), max(0.0, s - side))
    grey = Image.fromarray(to_uint8(image))
    size = display_px * PIXEL_RATIO
    region = grey.resize(
        (size, size), Image.Resampling.LANCZOS, box=(left, top, min(s, left + side), min(s, top + side))
    )
    return Picture(_png(region.convert("RGB")), display_px, display_px, 0.0)

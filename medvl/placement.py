"""Where to put text labels beside boxes on a picture so that no label covers another (the contact sheet of
IU-Phantom, the scans of the HTML page). Pure geometry, in pixels."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1


def overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    boxes: Sequence[Rect], sizes: Sequence[tuple[float, float]], width: float, height: float
) -> list[Rect]:
    """One rectangle per label (``sizes``: its width and height) inside the ``width`` x ``height`` picture, near
    its box: above it, else inside its top edge, else below it, else slid down from there, else the first free
    place scanning the picture row by row. Labels are placed in order and never overlap one another, unless
    the picture has no free place left (then the label goes above its box)."""
    placed: list[Rect] = []
    for (x0, y0, _x1, y1), (w, h) in zip(boxes, sizes, strict=True):
        w, h = min(w, width), min(h, height)

        def at(x: float, y: float, w: float = w, h: float = h) -> Rect:
            x = min(max(0.0, x), width - w)
            y = min(max(0.0, y), height - h)
            return (x, y, x + w, y + h)

        def candidates(
            x0: float = x0, y0: float = y0, y1: float = y1, w: float = w, h: float = h
        ) -> Iterator[Rect]:
            yield at(x0, y0 - h)
            yield at(x0, y0)
            yield at(x0, y1)
            step = max(1.0, h / 2)
            y = y0 - h
            while y < height:
                yield at(x0, y)
                y += step
            y = 0.0
            while y + h <= height:
                x = 0.0
                while x + w <= width:
                    yield at(x, y)
                    x += max(1.0, w / 4)
                y += step

        rect = next((r for r in candidates() if not any(overlaps(r, p) for p in placed)), at(x0, y0 - h))
        placed.append(rect)
    return placed

"""Vectorised drawing of IU-Phantom chest X-rays: anatomy around a real lung mask, and findings where a report
places them.

Coordinates: *anatomy* coordinates ``(u, v)`` in [0, 1], ``u`` to the image's right, ``v`` down, describe the
patient before the per-image pose (rotation, scale, shift); every pixel of the output knows its anatomy coordinates
(``_Frame.X``, ``_Frame.Y``), so shapes are evaluated analytically at each pixel and nothing is resampled twice.
Radiology convention: on the frontal PA image the patient's LEFT is on the image's RIGHT. Side index 0 is the
image-left lung (patient right), 1 the image-right lung (patient left).

Intensity: a density map (soft tissue, bone, heart bright; air in the lungs removed) mapped through a per-image
exposure curve to 8-bit grey, lungs dark (torchxrayvision's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from medvl.data.phantom.anatomy import LesionSizes, LungAtlas
from medvl.text.layout import Device, Side, Zone
from medvl.text.phrases import Finding

#: Severity words of the labeler -> a size in [0, 1] used to scale each finding.
SEVERITY_SCALE: dict[str, float] = {
    "trace": 0.08,
    "small": 0.28,
    "mild": 0.38,
    "moderate": 0.6,
    "large": 0.85,
    "severe": 0.95,
}

#: Vertical span of each zone as fractions of the lung's height (top = 0), and medial->lateral span (0 = medial
#: border, 1 = lateral border) where lesions are centred. The tests check boxes against looser ranges.
ZONE_SPAN: dict[Zone, tuple[float, float, float, float]] = {
    Zone.APEX: (0.04, 0.16, 0.25, 0.75),
    Zone.UPPER: (0.16, 0.36, 0.2, 0.8),
    Zone.MID: (0.4, 0.6, 0.2, 0.8),
    Zone.LOWER: (0.62, 0.78, 0.2, 0.8),
    Zone.BASE: (0.78, 0.9, 0.3, 0.85),
    Zone.PERIHILAR: (0.38, 0.56, 0.1, 0.35),
    Zone.RETROCARDIAC: (0.66, 0.84, 0.08, 0.3),
}


@dataclass(frozen=True)
class DrawSpec:
    """One finding to draw. ``side``: the patient's side (None for central findings: heart, mediastinum, midline
    devices). ``zone``: where in the lung (None where it has no meaning). ``severity``: the labeler's word or None.
    ``finding``/``observation``/``word``: written to ``regions.csv`` as they are."""

    kind: Finding
    side: Side | None = None
    zone: Zone | None = None
    severity: str | None = None
    device: Device | None = None
    finding: str = ""
    observation: str = ""
    word: str = ""

    @property
    def size(self) -> float | None:
        return SEVERITY_SCALE.get(self.severity) if self.severity else None


@dataclass
class Region:
    """A drawn finding: its spec, box ``(x0, y0, x1, y1)`` normalised (x right, y down) and mask ``(S, S)`` bool."""

    spec: DrawSpec
    box: tuple[float, float, float, float]
    mask: np.ndarray


#: Names of the ``anatomy`` channels of :class:`Frontal` (and of the masks file).
ANATOMY_CHANNELS: tuple[str, ...] = ("lung_image_left", "lung_image_right", "heart", "mediastinum")


@dataclass
class Frontal:
    """A drawn frontal image: ``image`` uint8 ``(S, S)``, lungs dark; ``regions`` in drawing order;
    ``anatomy`` bool ``(4, S, S)`` in :data:`ANATOMY_CHANNELS` order; ``params``: scalars worth recording."""

    image: np.ndarray
    regions: list[Region]
    anatomy: np.ndarray
    params: dict = field(default_factory=dict)


def _sig(z: np.ndarray | float) -> np.ndarray:
    """Smooth step 0 -> 1 around z = 0 (logistic through tanh, fast in numpy)."""
    return 0.5 + 0.5 * np.tanh(z)


def _hypot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sqrt(a^2 + b^2)``; numpy's ``hypot`` is several times slower on float32 arrays."""
    return np.sqrt(a * a + b * b)


def _pow2k(x: np.ndarray, k: int) -> np.ndarray:
    """``x ** (2 ** k)`` by repeated squaring (``**`` with a float exponent is slow)."""
    for _ in range(k):
        x = x * x
    return x


_NOISE: dict[int, np.ndarray] = {}


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size)`` unit-variance Gaussian field: a random window of a fixed per-size bank (4 x the area),
    flipped at random. Drawing fresh normals for every image costs more than the rest of the exposure step."""
    bank = _NOISE.get(size)
    if bank is None:
        bank = _NOISE[size] = np.random.default_rng(20240611).standard_normal((2 * size, 2 * size), dtype=np.float32)
    oy, ox = (int(v) for v in rng.integers(0, size, 2))
    win = bank[oy:oy + size, ox:ox + size]
    flip = int(rng.integers(0, 4))
    return win[:: (-1 if flip & 1 else 1), :: (-1 if flip & 2 else 1)]


def _severity(spec: DrawSpec, rng: np.random.Generator, lo: float = 0.25, hi: float = 0.6) -> float:
    s = spec.size
    return float(rng.uniform(lo, hi)) if s is None else s


def _polyline_distance(X: np.ndarray, Y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance (anatomy units) from each pixel to a polyline ``pts`` (N, 2)."""
    d = np.full(X.shape, np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        vx, vy = bx - ax, by - ay
        L2 = vx * vx + vy * vy + 1e-12
        t = np.clip(((X - ax) * vx + (Y - ay) * vy) / L2, 0.0, 1.0)
        px, py = X - (ax + t * vx), Y - (ay + t * vy)
        np.minimum(d, np.sqrt(px * px + py * py), out=d)
    return d


def _bezier(p0, p1, p2, n: int = 12) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float32) for p in (p0, p1, p2))
    return ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 10) -> np.ndarray:
    """Smooth random field ``(size, size)`` in about [0, 1] (bicubic upsampling of ``cells`` x ``cells`` noise)."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    return _sig(0.9 * up).astype(np.float32)


class _Frame:
    """Per-image geometry: pixel grid in anatomy coordinates, the lung mask placed in it, landmarks."""

    def __init__(self, atlas: LungAtlas, k: int, size: int, rng: np.random.Generator):
        self.S = size
        self.k = k
        # Lung box in anatomy coordinates: width varies with habitus, height follows the source mask's aspect.
        w = float(rng.uniform(0.6, 0.7))
        h = float(np.clip(w * atlas.aspect[k] * rng.uniform(0.95, 1.05), 0.5, 0.7))
        top = float(rng.uniform(0.09, 0.14))
        split = float(atlas.split[k])
        x0 = 0.5 - split * w + float(rng.uniform(-0.005, 0.005))
        self.box = (x0, top, x0 + w, top + h)
        self.W, self.H = w, h
        self.xm = x0 + split * w  # midline: the gap between the lungs (spine, trachea)
        # Pose: small rotation, scale and shift. Pixel centre p (image coords in [0, 1]) -> anatomy a.
        self.angle = float(rng.uniform(-3.0, 3.0))
        self.scale = float(rng.uniform(0.93, 1.05))
        self.shift = (float(rng.uniform(-0.012, 0.012)), float(rng.uniform(-0.02, 0.03)))
        th = np.deg2rad(self.angle)
        self._R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]], dtype=np.float64)
        g = (np.arange(size, dtype=np.float32) + 0.5) / size
        px, py = g[None, :] - 0.5 - self.shift[0], g[:, None] - 0.5 - self.shift[1]
        c, s = np.cos(th), np.sin(th)
        # a = c + R^T (p - c - t) / scale
        self.X = ((c * px + s * py) / self.scale + 0.5).astype(np.float32)
        self.Y = ((-s * px + c * py) / self.scale + 0.5).astype(np.float32)
        # Lungs: nearest-neighbour gather from the canonical mask, padded with a zero border so that pixels outside
        # the lung box read 0 (the final blur smooths the steps).
        m = atlas.res
        padded = np.pad(atlas.masks[k], 1)
        ju = (self.X - x0) * (m / w)
        iv = (self.Y - top) * (m / h)
        j = (np.clip(ju, -1.0, float(m)) + 1.0).astype(np.int32)
        i = (np.clip(iv, -1.0, float(m)) + 1.0).astype(np.int32)
        lung = padded[i, j].astype(np.float32) * np.float32(1.0 / 255.0)
        right_of_split = self.X >= self.xm
        self.lungs = np.stack([np.where(right_of_split, 0.0, lung), np.where(right_of_split, lung, 0.0)]).astype(
            np.float32)  # (2, S, S)
        j = np.clip(j - 1, 0, m - 1)
        # Per-lung boxes and landmarks in anatomy coordinates.
        b = atlas.boxes[k]
        self.side_box = [
            (x0 + b[s_, 0] * w, top + b[s_, 1] * h, x0 + b[s_, 2] * w, top + b[s_, 3] * h) for s_ in (0, 1)
        ]
        self.notch = x0 + float(atlas.notch[k]) * w
        dome = atlas.dome[k]
        first, last = int(m * atlas.boxes[k, 0, 0]), int(m * atlas.boxes[k, 1, 2]) - 1
        # Beyond the costophrenic angles the diaphragm runs down the chest wall.
        outside = np.maximum(first - ju, 0) + np.maximum(ju - last - 1, 0)
        self.dome_y = top + (dome[j] + 0.8 * outside / m) * h  # (S, S) diaphragm height under each pixel
        self._atlas_mask = atlas.masks[k]
        self._dome = atlas.dome[k]
        self._m = m
        self.half_width = max(self.xm - self.box[0], self.box[2] - self.xm)
        self.occluder: np.ndarray | None = None  # heart and mediastinum, once drawn

    # --- helpers ---------------------------------------------------------------------------------------------
    def to_image(self, u: float, v: float) -> tuple[float, float]:
        """Anatomy point -> normalised image point (the forward pose)."""
        th = np.deg2rad(self.angle)
        au, av = u - 0.5, v - 0.5
        x = self.scale * (np.cos(th) * au - np.sin(th) * av) + 0.5 + self.shift[0]
        y = self.scale * (np.sin(th) * au + np.cos(th) * av) + 0.5 + self.shift[1]
        return float(x), float(y)

    def block(self, u0: float, v0: float, u1: float, v1: float) -> tuple[slice, slice]:
        """Rows and columns of the pixels whose anatomy coordinates can fall in ``[u0, u1] x [v0, v1]``: work on
        ``array[block]`` instead of the whole image."""
        pts = [self.to_image(u, v) for u in (u0, u1) for v in (v0, v1)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        c0 = max(0, int(np.floor(min(xs) * self.S)) - 2)
        c1 = min(self.S, int(np.ceil(max(xs) * self.S)) + 2)
        r0 = max(0, int(np.floor(min(ys) * self.S)) - 2)
        r1 = min(self.S, int(np.ceil(max(ys) * self.S)) + 2)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def lung_at(self, u: float, v: float) -> float:
        """Lung-mask value (0..1) at one anatomy point."""
        j = int((u - self.box[0]) / self.W * self._m)
        i = int((v - self.box[1]) / self.H * self._m)
        if not (0 <= i < self._m and 0 <= j < self._m):
            return 0.0
        return float(self._atlas_mask[i, j]) / 255.0

    def zone_point(self, side: int, zone: Zone, rng: np.random.Generator, radius: float = 0.0) -> tuple[float, float]:
        """A point in ``zone`` of lung ``side`` (0 image-left, 1 image-right), inside the lung by ``radius``."""
        bx0, by0, bx1, by1 = self.side_box[side]
        ya, yb, fa, fb = ZONE_SPAN[zone]
        medial, lateral = (bx1, bx0) if side == 0 else (bx0, bx1)
        best, best_score = None, -1.0
        for _ in range(40):
            v = by0 + rng.uniform(ya, yb) * (by1 - by0)
            f = rng.uniform(fa, fb)
            # Medial/lateral borders at this height, read from the mask row.
            row_i = int((v - self.box[1]) / self.H * self._m)
            row = self._atlas_mask[np.clip(row_i, 0, self._m - 1)] > 127
            sc = int(round((self.xm - self.box[0]) / self.W * self._m))
            xs = np.nonzero(row[:sc] if side == 0 else row[sc:])[0]
            if len(xs) == 0:
                continue
            xs = xs + (0 if side == 0 else sc)
            lo, hi = (self.box[0] + xs.min() / self._m * self.W, self.box[0] + (xs.max() + 1) / self._m * self.W)
            med_x, lat_x = (hi, lo) if side == 0 else (lo, hi)
            u = med_x + f * (lat_x - med_x)
            score = min(self.lung_at(u + dx * radius, v + dy * radius) for dx, dy in
                        ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (0.7, 0.7), (-0.7, 0.7), (0.7, -0.7), (-0.7, -0.7)))
            if zone != Zone.RETROCARDIAC:
                # Keep lesions out of the heart's shadow, where they would barely show (retrocardiac ones excepted).
                score -= max(self.occluded_at(u + dx * radius, v) for dx in (-1, 0, 1))
            if score > 0.5:
                return u, v
            if score > best_score:
                best, best_score = (u, v), score
        if best is None:
            best = (medial + 0.5 * (lateral - medial), by0 + 0.5 * (ya + yb) * (by1 - by0))
        return best

    def dome_at(self, u: float) -> float:
        """Diaphragm height (anatomy v) under anatomy x ``u``."""
        j = int(np.clip((u - self.box[0]) / self.W * self._m, 0, self._m - 1))
        return self.box[1] + float(self._dome[j]) * self.H

    def occluded_at(self, u: float, v: float) -> float:
        """Heart / mediastinum value (0..1) at one anatomy point (0 before they are drawn)."""
        if self.occluder is None:
            return 0.0
        x, y = self.to_image(u, v)
        i, j = int(y * self.S), int(x * self.S)
        if not (0 <= i < self.S and 0 <= j < self.S):
            return 0.0
        return float(self.occluder[i, j])

    def edt(self, side: int) -> np.ndarray:
        """Distance (anatomy units) from each pixel inside lung ``side`` to its border; 0 outside."""
        return (ndimage.distance_transform_edt(self.lungs[side] > 0.5) / (self.S * self.scale)).astype(np.float32)


def _region(spec: DrawSpec, mask: np.ndarray) -> Region | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    S = mask.shape[0]
    box = (xs.min() / S, ys.min() / S, (xs.max() + 1) / S, (ys.max() + 1) / S)
    return Region(spec=spec, box=tuple(round(float(b), 4) for b in box), mask=mask)


def _side_index(side: Side) -> int:
    return 1 if side == Side.LEFT else 0


class _Canvas:
    """Accumulators of one image: extra density, air fill (0 keeps the lung's air, 1 replaces it) and vessel
    suppression, plus drawn regions."""

    def __init__(self, S: int):
        self.extra = np.zeros((S, S), np.float32)
        self.keep_air = np.ones((S, S), np.float32)  # product of (1 - fill_i)
        self.keep_vessels = np.ones((S, S), np.float32)
        self.regions: list[Region] = []

    def fill(self, f: np.ndarray) -> None:
        self.keep_air *= 1.0 - np.clip(f, 0.0, 1.0)

    def add(self, spec: DrawSpec, mask: np.ndarray) -> None:
        r = _region(spec, mask)
        if r is not None:
            self.regions.append(r)


# --- findings ----------------------------------------------------------------------------------------------------


def _draw_effusion(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = _side_index(spec.side)
    sev = _severity(spec, rng, 0.2, 0.5)
    bx0, by0, bx1, by1 = fr.side_box[side]
    H = by1 - by0
    level = by1 - (0.1 + 0.45 * sev) * H
    medial, lateral = (bx1, bx0) if side == 0 else (bx0, bx1)
    lat = np.clip((fr.X - medial) / (lateral - medial), 0.0, 1.2)
    meniscus = level - (0.08 + 0.06 * sev) * H * lat**2  # fluid climbs the lateral chest wall
    fluid = fr.lungs[side] * _sig((fr.Y - meniscus) / 0.006)
    cv.fill(0.95 * fluid)
    cv.extra += 0.06 * fluid  # hides the hemidiaphragm
    cv.keep_vessels *= 1.0 - fluid
    cv.add(spec, fluid > 0.5)


def _draw_pneumothorax(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = _side_index(spec.side)
    sev = _severity(spec, rng, 0.25, 0.55)
    zone = spec.zone or Zone.APEX
    bx0, by0, bx1, by1 = fr.side_box[side]
    H = by1 - by0
    medial, lateral = (bx1, bx0) if side == 0 else (bx0, bx1)
    lat = (fr.X - medial) / (lateral - medial)
    depth = 0.03 + 0.09 * sev  # width of the air rim between the chest wall and the collapsed lung
    dist = fr.edt(side)
    inside = fr.lungs[side] > 0.5
    if zone == Zone.APEX:
        extent = by0 + (0.28 + 0.4 * sev) * H
        where = inside & (fr.Y < extent) & ((lat > 0.3) | (fr.Y < by0 + 0.12 * H))
    else:
        ya, yb, _, _ = ZONE_SPAN[zone]
        where = inside & (fr.Y > by0 + (ya - 0.1) * H) & (fr.Y < by0 + (yb + 0.1) * H) & (lat > 0.45)
    rim = where & (dist < depth)
    px = 1.0 / (fr.S * fr.scale)
    line = where & (np.abs(dist - depth) < 1.1 * px + 0.002)
    rim_f = rim.astype(np.float32)
    cv.keep_vessels *= 1.0 - rim_f
    cv.extra -= 0.05 * rim_f
    cv.extra += 0.12 * line.astype(np.float32)
    cv.add(spec, rim | line)


def _patch(fr: _Frame, spec: DrawSpec, rng: np.random.Generator, default_zone: Zone, radius: tuple[float, float],
           soft: float) -> tuple[np.ndarray, int]:
    side = _side_index(spec.side)
    sev = _severity(spec, rng)
    r = radius[0] + (radius[1] - radius[0]) * sev
    cx, cy = fr.zone_point(side, spec.zone or default_zone, rng, radius=0.3 * r)
    rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.7, 1.0)
    env = np.exp(-((fr.X - cx) / rx) ** 2 - ((fr.Y - cy) / ry) ** 2)
    tex = _smooth_noise(rng, fr.S, cells=int(rng.integers(9, 15)))
    blob = _sig((env * (0.5 + 1.0 * tex) - 0.45) * soft) * fr.lungs[side]
    return blob.astype(np.float32), side


def _draw_consolidation(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    dense = {Finding.CONSOLIDATION: 1.0, Finding.PNEUMONIA: 0.95, Finding.OPACITY: 0.85}[spec.kind]
    radius = (0.07, 0.14) if spec.kind != Finding.OPACITY else (0.08, 0.16)
    soft = 6.0 if spec.kind != Finding.OPACITY else 4.0
    blob, _ = _patch(fr, spec, rng, Zone.LOWER, radius, soft)
    cv.fill(dense * blob)
    cv.extra += 0.04 * blob
    cv.keep_vessels *= 1.0 - 0.6 * blob
    cv.add(spec, blob > 0.5)


def _draw_atelectasis(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = _side_index(spec.side)
    sev = _severity(spec, rng, 0.2, 0.5)
    length = 0.1 + 0.1 * sev
    thick = 0.02 + 0.015 * sev
    cx, cy = fr.zone_point(side, spec.zone or Zone.LOWER, rng, radius=0.4 * length)
    th = np.deg2rad(rng.uniform(-14, 14) + (8 if side == 1 else -8))
    a = (fr.X - cx) * np.cos(th) + (fr.Y - cy) * np.sin(th)
    n = -(fr.X - cx) * np.sin(th) + (fr.Y - cy) * np.cos(th)
    band = _sig((thick / 2 - np.abs(n)) / 0.004) * _sig((length / 2 - np.abs(a)) / 0.01) * fr.lungs[side]
    cv.fill(0.92 * band)
    cv.add(spec, band > 0.5)


def _draw_edema(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    sev = _severity(spec, rng, 0.35, 0.65)
    for side in (0, 1):
        bx0, by0, bx1, by1 = fr.side_box[side]
        medial = bx1 if side == 0 else bx0
        sign = -1.0 if side == 0 else 1.0
        hx = medial + sign * 0.05
        hy = by0 + 0.5 * (by1 - by0)
        R = 0.11 + 0.07 * sev
        haze = np.exp(-(((fr.X - hx) / (1.1 * R)) ** 2) - ((fr.Y - hy) / (1.5 * R)) ** 2) * fr.lungs[side]
        cv.fill((0.4 + 0.35 * sev) * haze)
        cv.keep_vessels *= 1.0 - 0.5 * haze
        sub = DrawSpec(spec.kind, Side.RIGHT if side == 0 else Side.LEFT, Zone.PERIHILAR, spec.severity,
                       None, spec.finding, spec.observation, spec.word)
        cv.add(sub, haze > 0.4)


def _draw_lesion(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator, sizes: LesionSizes) -> None:
    side = _side_index(spec.side)
    if spec.kind == Finding.GRANULOMA:
        diam = float(rng.uniform(0.022, 0.034))
    else:
        dist = sizes.mass if spec.kind == Finding.MASS else sizes.nodule
        q = spec.size
        q = float(rng.uniform(0.0, 1.0)) if q is None else float(np.clip(q + rng.uniform(-0.15, 0.15), 0, 1))
        diam = float(np.quantile(dist, q)) * 0.85
        diam = float(np.clip(diam, 0.07, 0.22) if spec.kind == Finding.MASS else np.clip(diam, 0.035, 0.1))
    r0 = diam / 2
    cx, cy = fr.zone_point(side, spec.zone or Zone(rng.choice(["upper", "mid", "lower"])), rng, radius=r0 * 1.1)
    dx, dy = fr.X - cx, fr.Y - cy
    rr = np.sqrt(dx * dx + dy * dy)
    if spec.kind == Finding.MASS:
        phi = np.arctan2(dy, dx)
        ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
        r_edge = r0 * (1 + 0.1 * np.sin(3 * phi + ph1) + 0.06 * np.sin(5 * phi + ph2))
    else:
        r_edge = r0
    edge = 0.002 if spec.kind == Finding.GRANULOMA else 0.004
    disk = _sig((r_edge - rr) / edge)
    cv.fill(0.95 * disk * fr.lungs[side])
    if spec.kind == Finding.GRANULOMA:
        cv.extra += 0.3 * disk  # calcified: brighter than bone
    elif spec.kind == Finding.MASS:
        cv.extra += 0.05 * disk
    cv.add(spec, (disk > 0.5) & (fr.lungs[side] > 0.2))


def _draw_pleural_other(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = _side_index(spec.side)
    sev = _severity(spec, rng, 0.2, 0.5)
    zone = spec.zone or Zone.APEX
    bx0, by0, bx1, by1 = fr.side_box[side]
    H = by1 - by0
    medial, lateral = (bx1, bx0) if side == 0 else (bx0, bx1)
    lat = (fr.X - medial) / (lateral - medial)
    dist = fr.edt(side)
    inside = fr.lungs[side] > 0.5
    thick = 0.012 + 0.02 * sev
    if zone == Zone.APEX:
        where = inside & (fr.Y < by0 + 0.22 * H)
    else:
        ya, yb, _, _ = ZONE_SPAN[zone]
        where = inside & (fr.Y > by0 + (ya - 0.08) * H) & (fr.Y < by0 + (yb + 0.08) * H) & (lat > 0.5)
    band = (where & (dist < thick)).astype(np.float32)
    cv.fill(0.9 * band)
    cv.extra += 0.04 * band
    cv.add(spec, band > 0.5)


def _draw_fracture(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator, ribs: _Ribs) -> None:
    side = _side_index(spec.side)
    zone = spec.zone or Zone.MID
    bx0, by0, bx1, by1 = fr.side_box[side]
    ya, yb, _, _ = ZONE_SPAN[zone]
    s_f = float(rng.uniform(0.55, 0.85))  # lateral position along the rib (0 spine, 1 chest wall)
    # The posterior rib whose centre at s_f lies in the zone.
    v_target = by0 + rng.uniform(ya, yb) * (by1 - by0)
    v = max(v_target - ribs.y0 - ribs.curve(s_f), 0.0) / ribs.spacing
    k = int(np.clip(np.floor(v * (1.12 - 0.006 * v)), 0, ribs.count - 1))
    gap = 0.04
    sign = -1.0 if side == 0 else 1.0
    blk = ribs.block
    on_side = (fr.X[blk] - fr.xm) * sign > 0
    near = on_side & (np.abs(ribs.s - s_f) < (gap / 2 + 0.5 / fr.S) / ribs.hw) & (ribs.index == k)
    cut_b = near & (ribs.core > 0.05)
    ribs.density[blk] *= 1.0 - cut_b
    # Healing callus: a bright knob on each end of the gap (IU's fractures are mostly old, healed ones).
    hw_side = fr.xm - fr.box[0] + 0.02 if side == 0 else fr.box[2] - fr.xm + 0.02
    v = (k + 0.5) / 1.12
    v = (k + 0.5) / (1.12 - 0.006 * v)
    yc = ribs.y0 + float(ribs.curve(s_f)) + v * ribs.spacing
    Xb, Yb = fr.X[blk], fr.Y[blk]
    knobs = np.zeros(Xb.shape, np.float32)
    for end in (-1.0, 1.0):
        xc = fr.xm + sign * (s_f * hw_side + end * (gap / 2 + 0.012))
        q = ((Xb - xc) / 0.021) ** 2 + ((Yb - yc) / 0.016) ** 2
        knobs = np.maximum(knobs, _sig((1.0 - q) * 3.0))
    cv.extra[blk] += 0.15 * knobs
    cut = np.zeros((fr.S, fr.S), bool)
    cut[blk] = cut_b | (knobs > 0.5)
    cv.add(spec, ndimage.binary_dilation(cut, iterations=max(1, fr.S // 128)))


def _device_pts(fr: _Frame, dev: Device, side: Side | None, rng: np.random.Generator) -> list[tuple[np.ndarray, float,
                                                                                                      float]]:
    """Polylines of a device: ``(points (N, 2), width, density)`` in anatomy coordinates."""
    xm, top, bot = fr.xm, fr.box[1], fr.box[3]
    H = bot - top
    carina = top + 0.3 * H
    out: list[tuple[np.ndarray, float, float]] = []
    sgn = 1.0 if side == Side.LEFT else -1.0  # toward the stated side on the image
    if dev == Device.ET_TUBE:
        tip = carina - rng.uniform(0.03, 0.06)
        pts = np.array([[xm - 0.004, -0.05], [xm - 0.002, 0.5 * (top + tip)], [xm, tip]], np.float32)
        out += [(pts, 0.014, 0.12), (pts, 0.004, 0.25)]
    elif dev == Device.NG_TUBE:
        dome = top + 0.95 * H
        pts = np.concatenate([
            np.array([[xm + 0.004, -0.05], [xm + 0.008, carina]], np.float32),
            _bezier((xm + 0.012, top + 0.8 * H), (xm + 0.03, dome + 0.06), (xm + 0.17, dome + 0.07)),
        ])
        out.append((pts, 0.006, 0.22))
    elif dev in (Device.CENTRAL_LINE, Device.PORT):
        start = (xm + sgn * (fr.half_width + 0.04), top + 0.02)
        pts = np.concatenate([
            _bezier(start, (xm + sgn * 0.12, top - 0.01), (xm - 0.035, top + 0.16 * H)),
            np.array([[xm - 0.035, top + rng.uniform(0.36, 0.46) * H]], np.float32),
        ])
        out.append((pts, 0.006, 0.35))
        if dev == Device.PORT:
            c = np.array([[xm + sgn * 0.2, top + 0.04]], np.float32)
            out.append((c, 0.035, 0.6))
    elif dev == Device.PACEMAKER:
        gx, gy = xm + sgn * rng.uniform(0.2, 0.27), top + rng.uniform(-0.01, 0.05)
        gen = np.array([[gx - 0.03, gy], [gx + 0.03, gy]], np.float32)
        out.append((gen, 0.055, 0.75))
        ra = (xm - 0.02, top + 0.55 * H)
        rv = (fr.notch + 0.02, top + 0.8 * H)
        out.append((_bezier((gx - sgn * 0.03, gy), (xm - 0.02, top + 0.05), ra), 0.006, 0.5))
        out.append((np.concatenate([_bezier((gx - sgn * 0.03, gy + 0.01), (xm - 0.04, top + 0.1), ra),
                                    _bezier(ra, (xm + 0.02, top + 0.8 * H), rv)[1:]]), 0.006, 0.5))
    elif dev == Device.STERNAL_WIRES:
        n = int(rng.integers(4, 7))
        for yy in np.linspace(top + 0.12 * H, top + 0.62 * H, n):
            cx = xm + rng.uniform(-0.008, 0.008)
            t = np.linspace(0, 2 * np.pi, 13)
            ring = np.stack([cx + 0.016 * np.cos(t), yy + 0.008 * np.sin(t)], 1).astype(np.float32)
            out.append((ring, 0.005, 0.6))
    elif dev == Device.CHEST_TUBE:
        sb = fr.side_box[0 if side == Side.RIGHT else 1]
        lat_x, med_x = (sb[0], sb[2]) if side == Side.RIGHT else (sb[2], sb[0])
        entry = (lat_x + sgn * 0.04, sb[1] + 0.78 * (sb[3] - sb[1]))
        pts = _bezier(entry, (lat_x + 0.25 * (med_x - lat_x), sb[1] + 0.5 * (sb[3] - sb[1])),
                      (lat_x + 0.45 * (med_x - lat_x), sb[1] + 0.1 * (sb[3] - sb[1])))
        out += [(pts, 0.014, 0.14), (pts, 0.004, 0.3)]
    elif dev == Device.STENT:
        c = np.array([xm + rng.uniform(0.03, 0.08), top + rng.uniform(0.55, 0.7) * H], np.float32)
        a = rng.uniform(0.3, 1.2)
        d = np.array([np.cos(a), np.sin(a)], np.float32) * 0.025
        n = np.array([-d[1], d[0]], np.float32) * 0.25
        for off in (-1, 1):
            out.append((np.stack([c - d + off * n, c + d + off * n]), 0.003, 0.45))
    elif dev == Device.VALVE:
        cx, cy = xm + rng.uniform(0.0, 0.04), top + rng.uniform(0.55, 0.65) * H
        t = np.linspace(0, 2 * np.pi, 15)
        ring = np.stack([cx + 0.022 * np.cos(t), cy + 0.014 * np.sin(t)], 1).astype(np.float32)
        out.append((ring, 0.006, 0.6))
    elif dev == Device.SPINAL_HARDWARE:
        y0, y1 = top + rng.uniform(0.2, 0.4) * H, top + rng.uniform(0.75, 1.0) * H
        for sx in (-1, 1):
            out.append((np.array([[xm + sx * 0.026, y0], [xm + sx * 0.026, y1]], np.float32), 0.008, 0.6))
            for yy in (y0 + 0.01, y1 - 0.01):
                out.append((np.array([[xm + sx * 0.01, yy], [xm + sx * 0.045, yy]], np.float32), 0.007, 0.6))
    elif dev == Device.SHOULDER_PROSTHESIS:
        hx = xm + sgn * (fr.half_width + 0.09)
        out.append((np.array([[hx, top + 0.01]], np.float32), 0.09, 0.6))
        out.append((np.array([[hx, top + 0.04], [hx + sgn * 0.02, top + 0.2]], np.float32), 0.025, 0.6))
    elif dev == Device.ECG_LEADS:
        for _ in range(int(rng.integers(3, 5))):
            ex, ey = xm + rng.uniform(-0.3, 0.3), top + rng.uniform(0.0, 0.9) * H
            t = np.linspace(0, 2 * np.pi, 11)
            out.append((np.stack([ex + 0.012 * np.cos(t), ey + 0.012 * np.sin(t)], 1).astype(np.float32), 0.004,
                        0.45))
            out.append((_bezier((ex, ey), (ex + rng.uniform(-0.1, 0.1), ey + 0.1), (ex + rng.uniform(-0.2, 0.2),
                                                                                  1.05)), 0.003, 0.25))
    elif dev == Device.LOOP_RECORDER:
        cx, cy = xm + rng.uniform(0.06, 0.14), top + rng.uniform(0.3, 0.45) * H
        out.append((np.array([[cx - 0.015, cy + 0.015], [cx + 0.015, cy - 0.015]], np.float32), 0.012, 0.7))
    else:  # clips
        s = side if side is not None else Side(rng.choice(["left", "right"]))
        cx = xm + (1 if s == Side.LEFT else -1) * rng.uniform(0.05, 0.12)
        cy = top + rng.uniform(0.25, 0.5) * H
        for _ in range(int(rng.integers(3, 6))):
            px, py = cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(-0.03, 0.03)
            a = rng.uniform(0, np.pi)
            seg = np.array([[px, py], [px + 0.016 * np.cos(a), py + 0.016 * np.sin(a)]], np.float32)
            out.append((seg, 0.006, 0.65))
    return out


def _draw_device(fr: _Frame, cv: _Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    dev = spec.device or Device.CENTRAL_LINE
    drawn = np.zeros((fr.S, fr.S), np.float32)
    px = 0.5 / (fr.S * fr.scale)
    for pts, width, dens in _device_pts(fr, dev, spec.side, rng):
        d = _polyline_distance(fr.X, fr.Y, pts) if len(pts) > 1 else _hypot(fr.X - pts[0, 0], fr.Y - pts[0, 1])
        core = _sig((width / 2 + px - d) / 0.0015)
        cv.extra += dens * core
        np.maximum(drawn, core, out=drawn)
    cv.add(spec, drawn > 0.4)


# --- anatomy -----------------------------------------------------------------------------------------------------


class _Ribs:
    """Posterior ribs as one warped periodic pattern per hemithorax (all ribs in a few array operations), with
    fainter anterior ribs crossing them. Computed on ``block`` (rows, columns) of the image only; ``s``, ``index``
    and ``core`` are block-shaped, ``density`` full-size."""

    def __init__(self, fr: _Frame, rng: np.random.Generator):
        self.y0 = fr.box[1] - fr.H * rng.uniform(0.02, 0.06)
        self.spacing = fr.H / rng.uniform(8.8, 9.8)
        self.count = 11
        self.H = fr.H
        self.bend = float(rng.uniform(0.26, 0.34))
        hw_l, hw_r = fr.xm - fr.box[0] + 0.02, fr.box[2] - fr.xm + 0.02
        self.block = fr.block(fr.xm - 1.05 * hw_l, self.y0 - 0.06, fr.xm + 1.05 * hw_r, fr.box[3] + 0.15)
        X, Y = fr.X[self.block], fr.Y[self.block]
        left = X < fr.xm
        self.hw = np.where(left, np.float32(hw_l), np.float32(hw_r))
        s = np.abs(X - fr.xm) / self.hw
        self.s = s
        # Lower ribs project further apart: a gently convex map from height to rib number.
        v = np.maximum(Y - self.y0 - self.curve(s), 0.0) / self.spacing
        p = v * (1.12 - 0.006 * v)
        self.index = np.floor(p).astype(np.int32)
        d = np.abs(p - self.index - 0.5)
        width = 0.19 + 0.05 * np.clip(s, 0, 1)  # ribs widen laterally
        self.core = _sig((width - d) / 0.03)
        e = (d - width) / 0.05
        cortex = np.maximum(1.0 - e * e, 0.0)
        window = (_sig((s - 0.09) / 0.025) * _sig((1.04 - s) / 0.015)
                  * ((self.index >= 0) & (self.index < self.count)))
        dens = (0.035 * self.core + 0.045 * cortex) * window
        # Anterior ribs: fainter, running down towards the midline, ending at the costal cartilages.
        pa = (Y - self.y0 - 0.04 - 0.3 * fr.H * (1.0 - s)) / (self.spacing * 1.25)
        da = np.abs(pa - np.floor(pa) - 0.5)
        wa = _sig((s - 0.42) / 0.05) * _sig((1.02 - s) / 0.02) * ((pa > 0.3) & (pa < 6.5))
        ea = (da - 0.2) / 0.055
        dens += (0.012 * _sig((0.2 - da) / 0.04) + 0.02 * np.maximum(1.0 - ea * ea, 0.0)) * wa
        self.density = np.zeros((fr.S, fr.S), np.float32)
        self.density[self.block] = dens

    def curve(self, s):
        """Posterior rib course: slightly up from the spine, then down along the chest wall."""
        return self.H * (-0.07 * s + self.bend * s * s)


def render_frontal(
    specs: list[DrawSpec],
    atlas: LungAtlas,
    mask_index: int,
    size: int,
    rng: np.random.Generator,
    lesions: LesionSizes,
) -> Frontal:
    """Draw one frontal (PA/AP) chest X-ray with ``specs`` drawn; ``(S, S)`` uint8 plus ground truth."""
    S = size
    fr = _Frame(atlas, mask_index, S, rng)
    X, Y, xm = fr.X, fr.Y, fr.xm
    x0, top, x1, bot = fr.box
    H = fr.H
    T = x1 - x0
    kinds = {s.kind for s in specs}
    cardio = next((s for s in specs if s.kind == Finding.CARDIOMEGALY), None)
    ecm = next((s for s in specs if s.kind == Finding.ENLARGED_CARDIOMEDIASTINUM), None)
    ctr = float(rng.uniform(0.4, 0.47)) if cardio is None else 0.53 + 0.16 * _severity(cardio, rng, 0.3, 0.6)
    med_w = float(rng.uniform(0.12, 0.15)) if ecm is None else 0.2 + 0.08 * _severity(ecm, rng, 0.3, 0.6)

    # Body: neck, sloping shoulders, chest wall; soft tissue thicker centrally; humeral heads at the corners.
    hw_chest = fr.half_width + rng.uniform(0.05, 0.09)
    neck_y = top - rng.uniform(0.02, 0.05)
    hw = 0.13 + (hw_chest + 0.06 - 0.13) * _sig((Y - neck_y) / 0.045)
    ax = np.abs(X - xm)
    body = _sig((hw - ax) / 0.012)
    prof = np.sqrt(np.clip(1.0 - (ax / (hw + 0.03)) ** 2, 0.0, 1.0))
    D = body * (0.3 + 0.28 * prof)
    sh_y = top + rng.uniform(-0.02, 0.03)
    for sgn in (-1.0, 1.0):
        hd = _hypot(X - (xm + sgn * (hw_chest + 0.03)), Y - sh_y)
        D += 0.05 * _sig((0.065 - hd) / 0.006) * body + 0.03 * np.exp(-(((hd - 0.065) / 0.006) ** 2)) * body
    # Breast / pectoral soft tissue over the lower lateral chest.
    if rng.random() < 0.5:
        for sgn in (-1.0, 1.0):
            bxc, byc = xm + sgn * 0.2 * T / 0.65, bot - 0.05 * H
            D += 0.035 * _sig((0.12 - _hypot((X - bxc) / 1.3, Y - byc)) / 0.015) * body

    # Abdomen below the diaphragm domes (the lungs' lower border), gastric bubble under the left dome.
    abdomen = _sig((Y - fr.dome_y - 0.004) / 0.006) * body * (Y > top + 0.3 * H)
    D += 0.15 * abdomen
    if rng.random() < 0.65:
        gx = (fr.side_box[1][0] + fr.side_box[1][2]) / 2 + rng.uniform(-0.03, 0.03)
        gy = fr.side_box[1][3] + rng.uniform(0.03, 0.05)
        D -= 0.12 * _sig((1.0 - _hypot((X - gx) / 0.05, (Y - gy) / 0.025)) * 4) * abdomen

    # Heart: a sheared ellipse, about a third left of the midline and two thirds right (patient's left), sitting
    # on the diaphragm; it blends upwards into the mediastinum, which widens from the thoracic inlet down.
    Wh = ctr * T
    b = (rng.uniform(0.23, 0.29) + 0.2 * (ctr - 0.45)) * H
    cx = xm + rng.uniform(0.16, 0.22) * Wh
    cy = min(top + 0.96 * H, fr.dome_at(cx + 0.25 * Wh) + 0.01) - b  # on the left hemidiaphragm
    xs = (X - cx) - rng.uniform(0.2, 0.4) * (Y - cy)
    ellipse = 1.0 - (xs / (Wh / 2)) ** 2 - ((Y - cy) / b) ** 2
    sharp = min(Wh / 2, b) / 0.012  # edge about 0.006 wide
    heart = _sig(ellipse * sharp) * (1.0 - abdomen)  # it merges with the diaphragm below
    heart_gt = (ellipse > 0) & (Y < fr.dome_y)
    t_med = np.clip((Y - (top - 0.02)) / (cy - top), 0.0, 1.0)
    med_half = med_w / 2 + (0.38 * Wh - med_w / 2) * t_med**2
    med = _sig((med_half - np.abs(X - xm - 0.012 * t_med)) / 0.008) * _sig((cy - Y) / 0.02) * _sig((Y - top + 0.04) / 0.01)
    knob_x, knob_y = xm + med_w / 2 - 0.002, top + 0.2 * H
    med = np.maximum(med, _sig((0.028 - _hypot(X - knob_x, Y - knob_y)) / 0.006))
    cardiomed = np.maximum(heart, med)
    D += 0.1 * cardiomed + 0.02 * heart
    fr.occluder = cardiomed

    # Lungs: air removed from the soft tissue (less where heart or mediastinum overlap).
    lung = fr.lungs[0] + fr.lungs[1]
    cv = _Canvas(S)
    ribs = _Ribs(fr, rng)
    draw_order = sorted(specs, key=lambda s: list(Finding).index(s.kind))
    for spec in draw_order:
        if spec.kind == Finding.CARDIOMEGALY:
            cv.add(spec, heart_gt)
        elif spec.kind == Finding.ENLARGED_CARDIOMEDIASTINUM:
            cv.add(spec, (med > 0.5) & (Y < cy - 0.6 * b) & (Y > top))
        elif spec.kind == Finding.EFFUSION:
            _draw_effusion(fr, cv, spec, rng)
        elif spec.kind == Finding.PNEUMOTHORAX:
            _draw_pneumothorax(fr, cv, spec, rng)
        elif spec.kind in (Finding.CONSOLIDATION, Finding.PNEUMONIA, Finding.OPACITY):
            _draw_consolidation(fr, cv, spec, rng)
        elif spec.kind == Finding.ATELECTASIS:
            _draw_atelectasis(fr, cv, spec, rng)
        elif spec.kind == Finding.EDEMA:
            _draw_edema(fr, cv, spec, rng)
        elif spec.kind in (Finding.NODULE, Finding.MASS, Finding.GRANULOMA):
            _draw_lesion(fr, cv, spec, rng, lesions)
        elif spec.kind == Finding.PLEURAL_OTHER:
            _draw_pleural_other(fr, cv, spec, rng)
        elif spec.kind == Finding.FRACTURE:
            _draw_fracture(fr, cv, spec, rng, ribs)
        elif spec.kind == Finding.DEVICE:
            _draw_device(fr, cv, spec, rng)

    # Air depth: more towards the bases, less at the medial and lateral borders (thinner lung there).
    lat_frac = np.where(X >= xm, (X - fr.side_box[1][0]) / (fr.side_box[1][2] - fr.side_box[1][0]),
                        (fr.side_box[0][2] - X) / (fr.side_box[0][2] - fr.side_box[0][0]))
    edge = np.sqrt(np.clip(np.sin(np.pi * np.clip(lat_frac, 0.0, 1.0)), 0.0, 1.0))
    air_depth = (0.25 + 0.06 * (Y - top) / H) * (0.7 + 0.3 * edge) + 0.05
    D -= air_depth * lung * (1.0 - 0.97 * np.maximum(cardiomed, abdomen)) * cv.keep_air

    # Lung markings: vessels radiating from each hilum, fading to the periphery.
    hil = [
        (fr.side_box[0][2] - 0.025, top + 0.47 * H),
        (fr.side_box[1][0] + 0.03, top + 0.43 * H),
    ]
    rs, cs = fr.block(x0 - 0.02, top - 0.02, x1 + 0.02, bot + 0.02)
    Xb, Yb = X[rs, cs], Y[rs, cs]
    right = Xb >= xm
    dx = Xb - np.where(right, hil[1][0], hil[0][0])
    dy = Yb - np.where(right, hil[1][1], hil[0][1])
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    ph = rng.uniform(0, 2 * np.pi, 4)
    st1 = _pow2k((1 + np.cos(29 * theta + ph[0] + 2.2 * np.sin(17 * r + ph[1]))) * 0.5, 3)
    st2 = _pow2k((1 + np.cos(47 * theta + ph[2] + 3.0 * np.sin(23 * r + ph[3]))) * 0.5, 3)
    vessels = 0.15 * (0.6 * st1 + 0.4 * st2) * np.exp(-r / 0.16) + 0.08 * np.exp(-((r / 0.035) ** 2))
    D[rs, cs] += vessels * lung[rs, cs] * cv.keep_vessels[rs, cs] * (0.4 + 0.6 * cv.keep_air[rs, cs])

    # Spine (vertebral bodies with darker disc spaces), trachea and main bronchi.
    vert = 0.7 + 0.3 * np.cos(np.pi * (Y - top) / ribs.spacing) ** 2
    D += 0.035 * _sig((0.03 - np.abs(X - xm)) / 0.005) * vert * body
    carina = top + 0.3 * H
    rs, cs = fr.block(xm - 0.2, top - 0.2, xm + 0.2, top + 0.55 * H)
    Xb, Yb = X[rs, cs], Y[rs, cs]
    trachea = _sig((0.015 - np.abs(Xb - xm + 0.004)) / 0.004) * _sig((carina - Yb) / 0.01)
    bronchi = np.minimum(
        _polyline_distance(Xb, Yb, np.array([[xm - 0.004, carina], [hil[0][0] + 0.01, hil[0][1] - 0.01]], np.float32)),
        _polyline_distance(Xb, Yb, np.array([[xm - 0.004, carina], [hil[1][0] - 0.01, hil[1][1] - 0.02]], np.float32)),
    )
    D[rs, cs] -= 0.09 * np.maximum(trachea, _sig((0.008 - bronchi) / 0.003) * (1 - lung[rs, cs]))

    # Bones: ribs, clavicles.
    D += ribs.density * body * (1.0 - 0.6 * abdomen)
    s_c = (ax - 0.03) / (hw_chest * 0.85)
    clav_y = top + 0.04 - 0.08 * s_c + 0.015 * np.sin(np.pi * s_c) + rng.uniform(-0.015, 0.015)
    clav_w = 0.032 - 0.01 * s_c
    dcl = np.abs(Y - clav_y)
    clav = (_sig((clav_w / 2 - dcl) / 0.003) * 0.6 + 0.4 * np.exp(-(((dcl - clav_w / 2) / 0.004) ** 2)))
    clav *= _sig(s_c * 25) * _sig((1 - s_c) * 25)
    D += 0.12 * clav

    D += cv.extra

    # Exposure, noise, blur -> 8-bit.
    lo = rng.uniform(-0.02, 0.04)
    hi = rng.uniform(0.78, 0.9)
    gamma = rng.uniform(0.8, 1.2)
    img = np.clip((D - lo) / (hi - lo), 0.0, 1.0) ** gamma
    img += float(rng.uniform(0.01, 0.025)) * _noise(rng, S)
    sigma = rng.uniform(0.4, 1.0) * S / 256
    img = ndimage.gaussian_filter(img, sigma, truncate=2.5)
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    anatomy = np.stack([fr.lungs[0] > 0.5, fr.lungs[1] > 0.5, heart_gt, (med > 0.5) & (lung < 0.5) & ~heart_gt])
    params = {
        "mask": atlas.names[mask_index],
        "ctr": round(ctr, 3),
        "angle": round(fr.angle, 2),
        "scale": round(fr.scale, 3),
        "kinds": sorted(k.value for k in kinds),
    }
    return Frontal(image=image, regions=cv.regions, anatomy=anatomy, params=params)


def render_lateral(size: int, rng: np.random.Generator) -> np.ndarray:
    """A simple lateral projection ``(S, S)`` uint8: anterior on the image left, spine on the right."""
    S = size
    g = (np.arange(S, dtype=np.float32) + 0.5) / S
    X, Y = g[None, :], g[:, None]
    sx, sy = rng.uniform(-0.03, 0.03, 2)
    X, Y = X + sx, Y + sy
    body = _sig((1.0 - _hypot((X - 0.5) / 0.4, (Y - 0.62) / 0.62)) * 12)
    D = 0.65 * body
    dome = 0.7 + 0.08 * (X - 0.3) ** 2 / 0.1
    lung = _sig((1.0 - _hypot((X - 0.52) / 0.27, (Y - 0.43) / 0.32)) * 10) * _sig((dome - Y) / 0.01)
    heart = _sig((1.0 - _hypot((X - 0.38) / 0.14, (Y - 0.6) / 0.13)) * 6)
    D -= 0.4 * lung * (1 - 0.8 * heart)
    spine_x = 0.78 + 0.03 * (Y - 0.5)
    vert = 0.7 + 0.3 * np.cos(np.pi * Y / 0.06) ** 2
    D += 0.15 * _sig((0.04 - np.abs(X - spine_x)) / 0.006) * vert * body
    D += 0.08 * _sig((0.008 - np.abs(X - 0.17 - 0.05 * Y)) / 0.003) * (Y > 0.15) * (Y < 0.6)
    D += 0.1 * _sig((Y - dome) / 0.01) * body
    img = np.clip((D - 0.0) / 0.85, 0, 1) ** rng.uniform(0.85, 1.15)
    img += 0.02 * _noise(rng, S)
    img = ndimage.gaussian_filter(img.astype(np.float32), 0.8 * S / 256)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

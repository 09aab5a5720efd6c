"""What drawing an IU-Phantom image works with: the per-image geometry (:class:`Frame`: anatomy coordinates of
every pixel, the lung mask placed in them, landmarks), the accumulators of the drawing (:class:`Canvas`), the ribs
(:class:`Ribs`), what to draw (:class:`DrawSpec`) and what was drawn (:class:`Region`), and the vectorised shape
helpers.

Coordinates: *anatomy* coordinates ``(u, v)`` in [0, 1], ``u`` to the image's right, ``v`` down, describe the
patient before the per-image pose (rotation, scale, shift); every pixel of the output knows its anatomy coordinates
(``Frame.X``, ``Frame.Y``), so shapes are evaluated analytically at each pixel and nothing is resampled twice.
Radiology convention: on the frontal PA image the patient's LEFT is on the image's RIGHT. Side index 0 is the
image-left lung (patient right), 1 the image-right lung (patient left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from medvl.data.phantom.anatomy import LungAtlas
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


def sig(z: np.ndarray | float) -> np.ndarray:
    """Smooth step 0 -> 1 around z = 0 (logistic through tanh, fast in numpy)."""
    return 0.5 + 0.5 * np.tanh(z)


def hypot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sqrt(a^2 + b^2)``; numpy's ``hypot`` is several times slower on float32 arrays."""
    return np.sqrt(a * a + b * b)


def pow2k(x: np.ndarray, k: int) -> np.ndarray:
    """``x ** (2 ** k)`` by repeated squaring (``**`` with a float exponent is slow)."""
    for _ in range(k):
        x = x * x
    return x


_NOISE: dict[int, np.ndarray] = {}


def noise_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size)`` unit-variance Gaussian field: a random window of a fixed per-size bank (4 x the area),
    flipped at random. Drawing fresh normals for every image costs more than the rest of the exposure step."""
    bank = _NOISE.get(size)
    if bank is None:
        bank = _NOISE[size] = np.random.default_rng(20240611).standard_normal(
            (2 * size, 2 * size), dtype=np.float32
        )
    oy, ox = (int(v) for v in rng.integers(0, size, 2))
    win = bank[oy : oy + size, ox : ox + size]
    flip = int(rng.integers(0, 4))
    return win[:: (-1 if flip & 1 else 1), :: (-1 if flip & 2 else 1)]


def severity_of(spec: DrawSpec, rng: np.random.Generator, lo: float = 0.25, hi: float = 0.6) -> float:
    s = spec.size
    return float(rng.uniform(lo, hi)) if s is None else s


def polyline_distance(X: np.ndarray, Y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance (anatomy units) from each pixel to a polyline ``pts`` (N, 2)."""
    d = np.full(X.shape, np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        vx, vy = bx - ax, by - ay
        L2 = vx * vx + vy * vy + 1e-12
        t = np.clip(((X - ax) * vx + (Y - ay) * vy) / L2, 0.0, 1.0)
        px, py = X - (ax + t * vx), Y - (ay + t * vy)
        np.minimum(d, np.sqrt(px * px + py * py), out=d)
    return d


def bezier(p0, p1, p2, n: int = 12) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float32) for p in (p0, p1, p2))
    return ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, cells: int = 10) -> np.ndarray:
    """Smooth random field ``(size, size)`` in about [0, 1] (bicubic upsampling of ``cells`` x ``cells`` noise)."""
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    return sig(0.9 * up).astype(np.float32)


class Frame:
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
        self.lungs = np.stack(
            [np.where(right_of_split, 0.0, lung), np.where(right_of_split, lung, 0.0)]
        ).astype(np.float32)  # (2, S, S)
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

    def zone_point(
        self, side: int, zone: Zone, rng: np.random.Generator, radius: float = 0.0
    ) -> tuple[float, float]:
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
            lo, hi = (
                self.box[0] + xs.min() / self._m * self.W,
                self.box[0] + (xs.max() + 1) / self._m * self.W,
            )
            med_x, lat_x = (hi, lo) if side == 0 else (lo, hi)
            u = med_x + f * (lat_x - med_x)
            score = min(
                self.lung_at(u + dx * radius, v + dy * radius)
                for dx, dy in (
                    (0, 0),
                    (1, 0),
                    (-1, 0),
                    (0, 1),
                    (0, -1),
                    (0.7, 0.7),
                    (-0.7, 0.7),
                    (0.7, -0.7),
                    (-0.7, -0.7),
                )
            )
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
        return (ndimage.distance_transform_edt(self.lungs[side] > 0.5) / (self.S * self.scale)).astype(
            np.float32
        )


def region_of(spec: DrawSpec, mask: np.ndarray) -> Region | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    S = mask.shape[0]
    box = (xs.min() / S, ys.min() / S, (xs.max() + 1) / S, (ys.max() + 1) / S)
    return Region(spec=spec, box=tuple(round(float(b), 4) for b in box), mask=mask)


def side_index(side: Side) -> int:
    return 1 if side == Side.LEFT else 0


class Canvas:
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
        r = region_of(spec, mask)
        if r is not None:
            self.regions.append(r)


class Ribs:
    """Posterior ribs as one warped periodic pattern per hemithorax (all ribs in a few array operations), with
    fainter anterior ribs crossing them. Computed on ``block`` (rows, columns) of the image only; ``s``, ``index``
    and ``core`` are block-shaped, ``density`` full-size."""

    def __init__(self, fr: Frame, rng: np.random.Generator):
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
        self.core = sig((width - d) / 0.03)
        e = (d - width) / 0.05
        cortex = np.maximum(1.0 - e * e, 0.0)
        window = (
            sig((s - 0.09) / 0.025)
            * sig((1.04 - s) / 0.015)
            * ((self.index >= 0) & (self.index < self.count))
        )
        dens = (0.035 * self.core + 0.045 * cortex) * window
        # Anterior ribs: fainter, running down towards the midline, ending at the costal cartilages.
        pa = (Y - self.y0 - 0.04 - 0.3 * fr.H * (1.0 - s)) / (self.spacing * 1.25)
        da = np.abs(pa - np.floor(pa) - 0.5)
        wa = sig((s - 0.42) / 0.05) * sig((1.02 - s) / 0.02) * ((pa > 0.3) & (pa < 6.5))
        ea = (da - 0.2) / 0.055
        dens += (0.012 * sig((0.2 - da) / 0.04) + 0.02 * np.maximum(1.0 - ea * ea, 0.0)) * wa
        self.density = np.zeros((fr.S, fr.S), np.float32)
        self.density[self.block] = dens

    def curve(self, s):
        """Posterior rib course: slightly up from the spine, then down along the chest wall."""
        return self.H * (-0.07 * s + self.bend * s * s)

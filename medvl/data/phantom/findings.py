"""How each kind of finding is drawn into a :class:`~medvl.data.phantom.frame.Canvas`: effusion, pneumothorax,
consolidation / pneumonia / opacity, atelectasis, edema, nodule / mass / granuloma, other pleural findings, rib
fractures and support devices, each on the side and in the zone its :class:`~medvl.data.phantom.frame.DrawSpec`
gives, sized by its severity. (Cardiomegaly and an enlarged cardiomediastinum are the heart and mediastinum that
:func:`medvl.data.phantom.draw.render_frontal` draws.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medvl.data.phantom.anatomy import LesionSizes
from medvl.data.phantom.frame import (
    ZONE_SPAN,
    Canvas,
    DrawSpec,
    Frame,
    Ribs,
    bezier,
    hypot,
    polyline_distance,
    severity_of,
    side_index,
    sig,
    smooth_noise,
)
from medvl.text.layout import Device, Side, Zone
from medvl.text.phrases import Finding


def draw_effusion(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = side_index(spec.side)
    sev = severity_of(spec, rng, 0.2, 0.5)
    bx0, by0, bx1, by1 = fr.side_box[side]
    H = by1 - by0
    level = by1 - (0.1 + 0.45 * sev) * H
    medial, lateral = (bx1, bx0) if side == 0 else (bx0, bx1)
    lat = np.clip((fr.X - medial) / (lateral - medial), 0.0, 1.2)
    meniscus = level - (0.08 + 0.06 * sev) * H * lat**2  # fluid climbs the lateral chest wall
    fluid = fr.lungs[side] * sig((fr.Y - meniscus) / 0.006)
    cv.fill(0.95 * fluid)
    cv.extra += 0.06 * fluid  # hides the hemidiaphragm
    cv.keep_vessels *= 1.0 - fluid
    cv.add(spec, fluid > 0.5)


def _pleura(fr: Frame, side: int) -> tuple[float, float, np.ndarray, np.ndarray, np.ndarray]:
    """Lung ``side``'s top and height, and per pixel: medial (0) to lateral (1) position, distance to the lung's
    border, inside the lung."""
    bx0, by0, bx1, by1 = fr.side_box[side]
    medial, lateral = (bx1, bx0) if side == 0 else (bx0, bx1)
    return by0, by1 - by0, (fr.X - medial) / (lateral - medial), fr.edt(side), fr.lungs[side] > 0.5


def draw_pneumothorax(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = side_index(spec.side)
    sev = severity_of(spec, rng, 0.25, 0.55)
    zone = spec.zone or Zone.APEX
    by0, H, lat, dist, inside = _pleura(fr, side)
    depth = 0.03 + 0.09 * sev  # width of the air rim between the chest wall and the collapsed lung
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


def _patch(
    fr: Frame,
    spec: DrawSpec,
    rng: np.random.Generator,
    default_zone: Zone,
    radius: tuple[float, float],
    soft: float,
) -> tuple[np.ndarray, int]:
    side = side_index(spec.side)
    sev = severity_of(spec, rng)
    r = radius[0] + (radius[1] - radius[0]) * sev
    cx, cy = fr.zone_point(side, spec.zone or default_zone, rng, radius=0.3 * r)
    rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.7, 1.0)
    env = np.exp(-(((fr.X - cx) / rx) ** 2) - ((fr.Y - cy) / ry) ** 2)
    tex = smooth_noise(rng, fr.S, cells=int(rng.integers(9, 15)))
    blob = sig((env * (0.5 + 1.0 * tex) - 0.45) * soft) * fr.lungs[side]
    return blob.astype(np.float32), side


def draw_consolidation(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    dense = {Finding.CONSOLIDATION: 1.0, Finding.PNEUMONIA: 0.95, Finding.OPACITY: 0.85}[spec.kind]
    radius = (0.07, 0.14) if spec.kind != Finding.OPACITY else (0.08, 0.16)
    soft = 6.0 if spec.kind != Finding.OPACITY else 4.0
    blob, _ = _patch(fr, spec, rng, Zone.LOWER, radius, soft)
    cv.fill(dense * blob)
    cv.extra += 0.04 * blob
    cv.keep_vessels *= 1.0 - 0.6 * blob
    cv.add(spec, blob > 0.5)


def draw_atelectasis(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = side_index(spec.side)
    sev = severity_of(spec, rng, 0.2, 0.5)
    length = 0.1 + 0.1 * sev
    thick = 0.02 + 0.015 * sev
    cx, cy = fr.zone_point(side, spec.zone or Zone.LOWER, rng, radius=0.4 * length)
    th = np.deg2rad(rng.uniform(-14, 14) + (8 if side == 1 else -8))
    a = (fr.X - cx) * np.cos(th) + (fr.Y - cy) * np.sin(th)
    n = -(fr.X - cx) * np.sin(th) + (fr.Y - cy) * np.cos(th)
    band = sig((thick / 2 - np.abs(n)) / 0.004) * sig((length / 2 - np.abs(a)) / 0.01) * fr.lungs[side]
    cv.fill(0.92 * band)
    cv.add(spec, band > 0.5)


def draw_edema(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    sev = severity_of(spec, rng, 0.35, 0.65)
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
        sub = DrawSpec(
            spec.kind,
            Side.RIGHT if side == 0 else Side.LEFT,
            Zone.PERIHILAR,
            spec.severity,
            None,
            spec.finding,
            spec.observation,
            spec.word,
        )
        cv.add(sub, haze > 0.4)


def draw_lesion(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator, sizes: LesionSizes) -> None:
    side = side_index(spec.side)
    if spec.kind == Finding.GRANULOMA:
        diam = float(rng.uniform(0.022, 0.034))
    else:
        dist = sizes.mass if spec.kind == Finding.MASS else sizes.nodule
        q = spec.size
        q = float(rng.uniform(0.0, 1.0)) if q is None else float(np.clip(q + rng.uniform(-0.15, 0.15), 0, 1))
        diam = float(np.quantile(dist, q)) * 0.85
        diam = float(np.clip(diam, 0.07, 0.22) if spec.kind == Finding.MASS else np.clip(diam, 0.035, 0.1))
    r0 = diam / 2
    cx, cy = fr.zone_point(
        side, spec.zone or Zone(rng.choice(["upper", "mid", "lower"])), rng, radius=r0 * 1.1
    )
    dx, dy = fr.X - cx, fr.Y - cy
    rr = np.sqrt(dx * dx + dy * dy)
    if spec.kind == Finding.MASS:
        phi = np.arctan2(dy, dx)
        ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
        r_edge = r0 * (1 + 0.1 * np.sin(3 * phi + ph1) + 0.06 * np.sin(5 * phi + ph2))
    else:
        r_edge = r0
    edge = 0.002 if spec.kind == Finding.GRANULOMA else 0.004
    disk = sig((r_edge - rr) / edge)
    cv.fill(0.95 * disk * fr.lungs[side])
    if spec.kind == Finding.GRANULOMA:
        cv.extra += 0.3 * disk  # calcified: brighter than bone
    elif spec.kind == Finding.MASS:
        cv.extra += 0.05 * disk
    cv.add(spec, (disk > 0.5) & (fr.lungs[side] > 0.2))


def draw_pleural_other(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    side = side_index(spec.side)
    sev = severity_of(spec, rng, 0.2, 0.5)
    zone = spec.zone or Zone.APEX
    by0, H, lat, dist, inside = _pleura(fr, side)
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


def draw_fracture(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator, ribs: Ribs) -> None:
    side = side_index(spec.side)
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
        knobs = np.maximum(knobs, sig((1.0 - q) * 3.0))
    cv.extra[blk] += 0.15 * knobs
    cut = np.zeros((fr.S, fr.S), bool)
    cut[blk] = cut_b | (knobs > 0.5)
    cv.add(spec, ndimage.binary_dilation(cut, iterations=max(1, fr.S // 128)))


def _device_pts(
    fr: Frame, dev: Device, side: Side | None, rng: np.random.Generator
) -> list[tuple[np.ndarray, float, float]]:
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
        pts = np.concatenate(
            [
                np.array([[xm + 0.004, -0.05], [xm + 0.008, carina]], np.float32),
                bezier((xm + 0.012, top + 0.8 * H), (xm + 0.03, dome + 0.06), (xm + 0.17, dome + 0.07)),
            ]
        )
        out.append((pts, 0.006, 0.22))
    elif dev in (Device.CENTRAL_LINE, Device.PORT):
        start = (xm + sgn * (fr.half_width + 0.04), top + 0.02)
        pts = np.concatenate(
            [
                bezier(start, (xm + sgn * 0.12, top - 0.01), (xm - 0.035, top + 0.16 * H)),
                np.array([[xm - 0.035, top + rng.uniform(0.36, 0.46) * H]], np.float32),
            ]
        )
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
        out.append((bezier((gx - sgn * 0.03, gy), (xm - 0.02, top + 0.05), ra), 0.006, 0.5))
        out.append(
            (
                np.concatenate(
                    [
                        bezier((gx - sgn * 0.03, gy + 0.01), (xm - 0.04, top + 0.1), ra),
                        bezier(ra, (xm + 0.02, top + 0.8 * H), rv)[1:],
                    ]
                ),
                0.006,
                0.5,
            )
        )
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
        pts = bezier(
            entry,
            (lat_x + 0.25 * (med_x - lat_x), sb[1] + 0.5 * (sb[3] - sb[1])),
            (lat_x + 0.45 * (med_x - lat_x), sb[1] + 0.1 * (sb[3] - sb[1])),
        )
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
            out.append(
                (
                    np.stack([ex + 0.012 * np.cos(t), ey + 0.012 * np.sin(t)], 1).astype(np.float32),
                    0.004,
                    0.45,
                )
            )
            out.append(
                (
                    bezier(
                        (ex, ey), (ex + rng.uniform(-0.1, 0.1), ey + 0.1), (ex + rng.uniform(-0.2, 0.2), 1.05)
                    ),
                    0.003,
                    0.25,
                )
            )
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


def draw_device(fr: Frame, cv: Canvas, spec: DrawSpec, rng: np.random.Generator) -> None:
    dev = spec.device or Device.CENTRAL_LINE
    drawn = np.zeros((fr.S, fr.S), np.float32)
    px = 0.5 / (fr.S * fr.scale)
    for pts, width, dens in _device_pts(fr, dev, spec.side, rng):
        d = polyline_distance(fr.X, fr.Y, pts) if len(pts) > 1 else hypot(fr.X - pts[0, 0], fr.Y - pts[0, 1])
        core = sig((width / 2 + px - d) / 0.0015)
        cv.extra += dens * core
        np.maximum(drawn, core, out=drawn)
    cv.add(spec, drawn > 0.4)

"""Vectorised drawing of IU-Phantom chest X-rays: anatomy around a real lung mask (body, heart, mediastinum,
lungs and their vessels, spine, trachea, ribs, clavicles), the findings where a report places them
(:mod:`medvl.data.phantom.findings`), then exposure, noise and blur; and a simple lateral view.

Geometry and coordinates: :mod:`medvl.data.phantom.frame`. Radiology convention: on the frontal PA image the
patient's LEFT is on the image's RIGHT.

Intensity: a density map (soft tissue, bone, heart bright; air in the lungs removed) mapped through a per-image
exposure curve to 8-bit grey, lungs dark (torchxrayvision's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medvl.data.phantom.anatomy import LesionSizes, LungAtlas
from medvl.data.phantom.findings import (
    draw_atelectasis,
    draw_consolidation,
    draw_device,
    draw_edema,
    draw_effusion,
    draw_fracture,
    draw_lesion,
    draw_pleural_other,
    draw_pneumothorax,
)
from medvl.data.phantom.frame import (
    Canvas,
    DrawSpec,
    Frame,
    Region,
    Ribs,
    hypot,
    noise_field,
    polyline_distance,
    pow2k,
    severity_of,
    sig,
)
from medvl.text.phrases import Finding

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
    fr = Frame(atlas, mask_index, S, rng)
    X, Y, xm = fr.X, fr.Y, fr.xm
    x0, top, x1, bot = fr.box
    H = fr.H
    T = x1 - x0
    kinds = {s.kind for s in specs}
    cardio = next((s for s in specs if s.kind == Finding.CARDIOMEGALY), None)
    ecm = next((s for s in specs if s.kind == Finding.ENLARGED_CARDIOMEDIASTINUM), None)
    ctr = (
        float(rng.uniform(0.4, 0.47)) if cardio is None else 0.53 + 0.16 * severity_of(cardio, rng, 0.3, 0.6)
    )
    med_w = float(rng.uniform(0.12, 0.15)) if ecm is None else 0.2 + 0.08 * severity_of(ecm, rng, 0.3, 0.6)

    # Body: neck, sloping shoulders, chest wall; soft tissue thicker centrally; humeral heads at the corners.
    hw_chest = fr.half_width + rng.uniform(0.05, 0.09)
    neck_y = top - rng.uniform(0.02, 0.05)
    hw = 0.13 + (hw_chest + 0.06 - 0.13) * sig((Y - neck_y) / 0.045)
    ax = np.abs(X - xm)
    body = sig((hw - ax) / 0.012)
    prof = np.sqrt(np.clip(1.0 - (ax / (hw + 0.03)) ** 2, 0.0, 1.0))
    D = body * (0.3 + 0.28 * prof)
    sh_y = top + rng.uniform(-0.02, 0.03)
    for sgn in (-1.0, 1.0):
        hd = hypot(X - (xm + sgn * (hw_chest + 0.03)), Y - sh_y)
        D += 0.05 * sig((0.065 - hd) / 0.006) * body + 0.03 * np.exp(-(((hd - 0.065) / 0.006) ** 2)) * body
    # Breast / pectoral soft tissue over the lower lateral chest.
    if rng.random() < 0.5:
        for sgn in (-1.0, 1.0):
            bxc, byc = xm + sgn * 0.2 * T / 0.65, bot - 0.05 * H
            D += 0.035 * sig((0.12 - hypot((X - bxc) / 1.3, Y - byc)) / 0.015) * body

    # Abdomen below the diaphragm domes (the lungs' lower border), gastric bubble under the left dome.
    abdomen = sig((Y - fr.dome_y - 0.004) / 0.006) * body * (Y > top + 0.3 * H)
    D += 0.15 * abdomen
    if rng.random() < 0.65:
        gx = (fr.side_box[1][0] + fr.side_box[1][2]) / 2 + rng.uniform(-0.03, 0.03)
        gy = fr.side_box[1][3] + rng.uniform(0.03, 0.05)
        D -= 0.12 * sig((1.0 - hypot((X - gx) / 0.05, (Y - gy) / 0.025)) * 4) * abdomen

    # Heart: a sheared ellipse, about a third left of the midline and two thirds right (patient's left), sitting
    # on the diaphragm; it blends upwards into the mediastinum, which widens from the thoracic inlet down.
    Wh = ctr * T
    b = (rng.uniform(0.23, 0.29) + 0.2 * (ctr - 0.45)) * H
    cx = xm + rng.uniform(0.16, 0.22) * Wh
    cy = min(top + 0.96 * H, fr.dome_at(cx + 0.25 * Wh) + 0.01) - b  # on the left hemidiaphragm
    xs = (X - cx) - rng.uniform(0.2, 0.4) * (Y - cy)
    ellipse = 1.0 - (xs / (Wh / 2)) ** 2 - ((Y - cy) / b) ** 2
    sharp = min(Wh / 2, b) / 0.012  # edge about 0.006 wide
    heart = sig(ellipse * sharp) * (1.0 - abdomen)  # it merges with the diaphragm below
    heart_gt = (ellipse > 0) & (Y < fr.dome_y)
    t_med = np.clip((Y - (top - 0.02)) / (cy - top), 0.0, 1.0)
    med_half = med_w / 2 + (0.38 * Wh - med_w / 2) * t_med**2
    med = (
        sig((med_half - np.abs(X - xm - 0.012 * t_med)) / 0.008)
        * sig((cy - Y) / 0.02)
        * sig((Y - top + 0.04) / 0.01)
    )
    knob_x, knob_y = xm + med_w / 2 - 0.002, top + 0.2 * H
    med = np.maximum(med, sig((0.028 - hypot(X - knob_x, Y - knob_y)) / 0.006))
    cardiomed = np.maximum(heart, med)
    D += 0.1 * cardiomed + 0.02 * heart
    fr.occluder = cardiomed

    # Lungs: air removed from the soft tissue (less where heart or mediastinum overlap).
    lung = fr.lungs[0] + fr.lungs[1]
    cv = Canvas(S)
    ribs = Ribs(fr, rng)
    draw_order = sorted(specs, key=lambda s: list(Finding).index(s.kind))
    for spec in draw_order:
        if spec.kind == Finding.CARDIOMEGALY:
            cv.add(spec, heart_gt)
        elif spec.kind == Finding.ENLARGED_CARDIOMEDIASTINUM:
            cv.add(spec, (med > 0.5) & (Y < cy - 0.6 * b) & (Y > top))
        elif spec.kind == Finding.EFFUSION:
            draw_effusion(fr, cv, spec, rng)
        elif spec.kind == Finding.PNEUMOTHORAX:
            draw_pneumothorax(fr, cv, spec, rng)
        elif spec.kind in (Finding.CONSOLIDATION, Finding.PNEUMONIA, Finding.OPACITY):
            draw_consolidation(fr, cv, spec, rng)
        elif spec.kind == Finding.ATELECTASIS:
            draw_atelectasis(fr, cv, spec, rng)
        elif spec.kind == Finding.EDEMA:
            draw_edema(fr, cv, spec, rng)
        elif spec.kind in (Finding.NODULE, Finding.MASS, Finding.GRANULOMA):
            draw_lesion(fr, cv, spec, rng, lesions)
        elif spec.kind == Finding.PLEURAL_OTHER:
            draw_pleural_other(fr, cv, spec, rng)
        elif spec.kind == Finding.FRACTURE:
            draw_fracture(fr, cv, spec, rng, ribs)
        elif spec.kind == Finding.DEVICE:
            draw_device(fr, cv, spec, rng)

    # Air depth: more towards the bases, less at the medial and lateral borders (thinner lung there).
    lat_frac = np.where(
        X >= xm,
        (X - fr.side_box[1][0]) / (fr.side_box[1][2] - fr.side_box[1][0]),
        (fr.side_box[0][2] - X) / (fr.side_box[0][2] - fr.side_box[0][0]),
    )
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
    st1 = pow2k((1 + np.cos(29 * theta + ph[0] + 2.2 * np.sin(17 * r + ph[1]))) * 0.5, 3)
    st2 = pow2k((1 + np.cos(47 * theta + ph[2] + 3.0 * np.sin(23 * r + ph[3]))) * 0.5, 3)
    vessels = 0.15 * (0.6 * st1 + 0.4 * st2) * np.exp(-r / 0.16) + 0.08 * np.exp(-((r / 0.035) ** 2))
    D[rs, cs] += vessels * lung[rs, cs] * cv.keep_vessels[rs, cs] * (0.4 + 0.6 * cv.keep_air[rs, cs])

    # Spine (vertebral bodies with darker disc spaces), trachea and main bronchi.
    vert = 0.7 + 0.3 * np.cos(np.pi * (Y - top) / ribs.spacing) ** 2
    D += 0.035 * sig((0.03 - np.abs(X - xm)) / 0.005) * vert * body
    carina = top + 0.3 * H
    rs, cs = fr.block(xm - 0.2, top - 0.2, xm + 0.2, top + 0.55 * H)
    Xb, Yb = X[rs, cs], Y[rs, cs]
    trachea = sig((0.015 - np.abs(Xb - xm + 0.004)) / 0.004) * sig((carina - Yb) / 0.01)
    bronchi = np.minimum(
        polyline_distance(
            Xb, Yb, np.array([[xm - 0.004, carina], [hil[0][0] + 0.01, hil[0][1] - 0.01]], np.float32)
        ),
        polyline_distance(
            Xb, Yb, np.array([[xm - 0.004, carina], [hil[1][0] - 0.01, hil[1][1] - 0.02]], np.float32)
        ),
    )
    D[rs, cs] -= 0.09 * np.maximum(trachea, sig((0.008 - bronchi) / 0.003) * (1 - lung[rs, cs]))

    # Bones: ribs, clavicles.
    D += ribs.density * body * (1.0 - 0.6 * abdomen)
    s_c = (ax - 0.03) / (hw_chest * 0.85)
    clav_y = top + 0.04 - 0.08 * s_c + 0.015 * np.sin(np.pi * s_c) + rng.uniform(-0.015, 0.015)
    clav_w = 0.032 - 0.01 * s_c
    dcl = np.abs(Y - clav_y)
    clav = sig((clav_w / 2 - dcl) / 0.003) * 0.6 + 0.4 * np.exp(-(((dcl - clav_w / 2) / 0.004) ** 2))
    clav *= sig(s_c * 25) * sig((1 - s_c) * 25)
    D += 0.12 * clav

    D += cv.extra

    # Exposure, noise, blur -> 8-bit.
    lo = rng.uniform(-0.02, 0.04)
    hi = rng.uniform(0.78, 0.9)
    gamma = rng.uniform(0.8, 1.2)
    img = np.clip((D - lo) / (hi - lo), 0.0, 1.0) ** gamma
    img += float(rng.uniform(0.01, 0.025)) * noise_field(rng, S)
    sigma = rng.uniform(0.4, 1.0) * S / 256
    img = ndimage.gaussian_filter(img, sigma, truncate=2.5)
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    anatomy = np.stack(
        [fr.lungs[0] > 0.5, fr.lungs[1] > 0.5, heart_gt, (med > 0.5) & (lung < 0.5) & ~heart_gt]
    )
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
    body = sig((1.0 - hypot((X - 0.5) / 0.4, (Y - 0.62) / 0.62)) * 12)
    D = 0.65 * body
    dome = 0.7 + 0.08 * (X - 0.3) ** 2 / 0.1
    lung = sig((1.0 - hypot((X - 0.52) / 0.27, (Y - 0.43) / 0.32)) * 10) * sig((dome - Y) / 0.01)
    heart = sig((1.0 - hypot((X - 0.38) / 0.14, (Y - 0.6) / 0.13)) * 6)
    D -= 0.4 * lung * (1 - 0.8 * heart)
    spine_x = 0.78 + 0.03 * (Y - 0.5)
    vert = 0.7 + 0.3 * np.cos(np.pi * Y / 0.06) ** 2
    D += 0.15 * sig((0.04 - np.abs(X - spine_x)) / 0.006) * vert * body
    D += 0.08 * sig((0.008 - np.abs(X - 0.17 - 0.05 * Y)) / 0.003) * (Y > 0.15) * (Y < 0.6)
    D += 0.1 * sig((Y - dome) / 0.01) * body
    img = np.clip((D - 0.0) / 0.85, 0, 1) ** rng.uniform(0.85, 1.15)
    img += 0.02 * noise_field(rng, S)
    img = ndimage.gaussian_filter(img.astype(np.float32), 0.8 * S / 256)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

"""Explanations of AdaMatch on a scan: adaptive boxes with their matched keywords, free-form point
sets, and a word's similarity map (``medvl explain SCAN --run RUN --out OUT.png [--word W]``).

Everything is drawn in the run's image frame (the scan resized to the run's square size the way
``medvl prepare`` does, aspect kept and padded), where the patches' normalised boxes live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medvl.models.adamatch import AdaMatchRun, ImagePatches, Keyword

_COLOURS = (
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
)


@dataclass
class Explanation:
    """What was drawn: the keywords (with boxes), all patch boxes (P, 4), and the word map if asked."""

    keywords: list[Keyword]
    boxes: np.ndarray
    word: str | None = None
    word_map: np.ndarray | None = None  # (H, W) cosine of the word with the patch covering each pixel
    out: Path | None = None


def similarity_map(boxes: np.ndarray, scores: np.ndarray, size: int) -> np.ndarray:
    """Per-pixel map (size, size): the highest score among patches whose box covers the pixel
    (NaN where none does). boxes (P, 4) normalised, scores (P,)."""
    c = (np.arange(size) + 0.5) / size
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))  # (P, 1)
    in_x = (c[None] >= x0) & (c[None] <= x1)  # (P, size)
    in_y = (c[None] >= y0) & (c[None] <= y1)
    inside = in_y[:, :, None] & in_x[:, None, :]  # (P, size, size)
    vals = np.where(inside, scores[:, None, None], -np.inf).max(0)
    return np.where(np.isfinite(vals), vals, np.nan)


def _draw_patches(
    ax, patches: ImagePatches, b: int, size: int, keywords: list[Keyword] | None, freeform: bool
):
    from matplotlib.patches import Polygon, Rectangle

    boxes = patches.boxes[b].detach().cpu().numpy() * size
    for x0, y0, x1, y1 in boxes:  # every adaptive box, faint
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.4, ec="#00e5ff", alpha=0.35))
    if freeform:
        pts = patches.points[b].detach().cpu().numpy() * size  # (P, K, 2)
        ax.scatter(pts[..., 0].ravel(), pts[..., 1].ravel(), s=1.0, c="#00e5ff", alpha=0.4, linewidths=0)
    by_patch: dict[int, list[Keyword]] = {}
    for kw in keywords or []:  # keywords sharing a patch share one outline and one label
        by_patch.setdefault(kw.patch, []).append(kw)
    for i, (patch, kws) in enumerate(by_patch.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        x0, y0, x1, y1 = (v * size for v in kws[0].box)
        if freeform:
            pts = patches.points[b, patch].detach().cpu().numpy() * size
            hull = _convex_hull(pts)
            ax.add_patch(Polygon(hull, closed=True, fill=False, lw=1.6, ec=colour))
            ax.scatter(pts[:, 0], pts[:, 1], s=6, c=colour)
        else:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.6, ec=colour))
        label = ", ".join(kw.word for kw in kws)
        ax.text(
            x0 + 1,
            max(y0 - 1, 6),
            label,
            color="black",
            fontsize=7,
            bbox={"facecolor": colour, "alpha": 0.85, "pad": 1, "lw": 0},
        )


def _convex_hull(pts: np.ndarray) -> np.ndarray:
    """Monotone-chain hull of (K, 2) points (a free-form patch's outline)."""
    p = sorted({(float(x), float(y)) for x, y in pts})
    if len(p) < 3:
        return np.array(p)

    def half(seq):
        h: list[tuple[float, float]] = []
        for q in seq:
            while (
                len(h) >= 2
                and (h[-1][0] - h[-2][0]) * (q[1] - h[-2][1]) - (h[-1][1] - h[-2][1]) * (q[0] - h[-2][0]) <= 0
            ):
                h.pop()
            h.append(q)
        return h

    lower, upper = half(p), half(reversed(p))
    return np.array(lower[:-1] + upper[:-1])


def render_explanation(
    image: np.ndarray,
    patches: ImagePatches,
    b: int = 0,
    *,
    keywords: list[Keyword] | None,
    word: str | None = None,
    word_scores: np.ndarray | None = None,
    title: str | None = None,
    freeform: bool = False,
    out: str | Path | None = None,
) -> np.ndarray:
    """Draw one scan (S, S) in [-1024, 1024] with its patches; returns the figure as (H, W, 3) uint8 and
    writes it as PNG to ``out`` when given. With ``word_scores`` (P,) a second panel shows the word's map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    size = image.shape[-1]
    panels = 2 if word_scores is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.4), dpi=110, squeeze=False)
    ax = axes[0, 0]
    ax.imshow(image, cmap="gray", vmin=-1024, vmax=1024, extent=(0, size, size, 0))
    _draw_patches(ax, patches, b, size, keywords, freeform)
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.set_axis_off()
    ax.set_title(title or "adaptive patches and keywords", fontsize=9)
    if word_scores is not None:
        ax2 = axes[0, 1]
        boxes = patches.boxes[b].detach().cpu().numpy()
        smap = similarity_map(boxes, np.asarray(word_scores, dtype=np.float32), size)
        ax2.imshow(image, cmap="gray", vmin=-1024, vmax=1024, extent=(0, size, size, 0))
        im = ax2.imshow(smap, cmap="inferno", alpha=0.55, extent=(0, size, size, 0))
        best = int(np.argmax(word_scores))
        x0, y0, x1, y1 = boxes[best] * size
        from matplotlib.patches import Rectangle

        ax2.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.6, ec="#00ff66"))
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.02)
        ax2.set_axis_off()
        ax2.set_title(f"similarity to '{word}'", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(out), format="png")
    plt.close(fig)
    return rgb


def explain_image(
    run: AdaMatchRun,
    image: np.ndarray | torch.Tensor,
    *,
    out: str | Path | None = None,
    word: str | None = None,
    top_k: int = 6,
) -> Explanation:
    """Explain one image (S, S) already in the run's frame and [-1024, 1024]; draws it to ``out`` (PNG)."""
    img = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if img.dim() == 3:
        img = img[0]
    s = run.image_size
    if img.shape != (s, s):
        img = torch.nn.functional.interpolate(
            img[None, None], size=(s, s), mode="bilinear", antialias=True, align_corners=False
        )[0, 0]
    patches = run.encode_images(img[None, None])
    keywords = run.image_keywords(None, top_k, patches=patches)[0] if run.keywords is not None else []
    word_scores = None
    if word:
        word_scores = run.word_similarity(img[None, None], word)[0].cpu().numpy()
    freeform = str(getattr(run.config.patches.mode, "value", run.config.patches.mode)) == "freeform"
    render_explanation(
        img.numpy(),
        patches,
        0,
        keywords=keywords,
        word=word,
        word_scores=word_scores,
        freeform=freeform,
        out=out,
    )
    smap = similarity_map(patches.boxes[0].cpu().numpy(), word_scores, s) if word_scores is not None else None
    return Explanation(keywords, patches.boxes[0].cpu().numpy(), word, smap, Path(out) if out else None)


def explain_command(scan: str | Path, *, run: str | Path, out: str | Path, word: str | None = None) -> int:
    """``medvl explain SCAN --run RUN --out OUT.png [--word W]``: prints the keywords, writes the PNG."""
    from medvl.data.scans import load_scan
    from medvl.errors import InvalidImageError
    from medvl.runs import trained_jpg_compatible

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InvalidImageError(f"--out must name a .png file, got {out}")
    am = AdaMatchRun.from_pretrained(run)
    # as the prepared dataset would hold the file (DICOMs read as the run's training data were)
    pixels = load_scan(scan, am.image_size, jpg_compatible=trained_jpg_compatible(run))[0]
    exp = explain_image(am, pixels, out=out, word=word)
    for kw in exp.keywords:
        box = ", ".join(f"{v:.3f}" for v in kw.box)
        print(f"{kw.word}\tscore {kw.score:.2f}\tcosine {kw.similarity:.3f}\tbox [{box}]")
    print(f"wrote {out}")
    return 0

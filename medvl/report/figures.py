"""The page's figures as PNG: per-label ROC curves of real and synthesized scans, training curves from a run's
TensorBoard logs, and the pointing game per finding word beside its baselines.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot: the caller's backend, a notebook's inline
one say, is left alone), at ``PIXEL_RATIO`` x 96 dpi, to be shown at 96 dpi: a point of text is then 4/3 CSS
pixels on the page, and no text is smaller than ``MIN_FONT_PT``.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from medvl.report.overlay import PIXEL_RATIO, Picture

logger = logging.getLogger(__name__)
P = ParamSpec("P")

CSS_DPI = 96
MIN_FONT_PT = 9  # 12 CSS px on the page
STYLE = {
    "font.size": MIN_FONT_PT,
    "axes.titlesize": MIN_FONT_PT + 1,
    "axes.labelsize": MIN_FONT_PT,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "figure.titlesize": MIN_FONT_PT + 2,
}
REAL, SYNTHESIZED = "#1f77b4", "#d62728"
TRAINING_LOG_DIR = "logs"  # RUN/logs/: the training loop's TensorBoard events


def _styled(draw: Callable[P, Picture | None]) -> Callable[P, Picture | None]:
    """Draw (and save) the figure under the page's text sizes."""

    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Picture | None:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(width_in, height_in), dpi=CSS_DPI * PIXEL_RATIO, layout="constrained")


def _picture(fig: Figure) -> Picture:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=CSS_DPI * PIXEL_RATIO)
    width, height = Image.open(io.BytesIO(buf.getvalue())).size
    return Picture(buf.getvalue(), width // PIXEL_RATIO, height // PIXEL_RATIO, MIN_FONT_PT * CSS_DPI / 72)


def _grid(n: int, columns: int, panel_in: float, extra_h: float = 0.0) -> tuple[Figure, list]:
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _figure(cols * panel_in, rows * panel_in + extra_h)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


# ---- ROC curves


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates over every threshold (ties step together) and the area under the curve.
    scores, positive: (N,); both classes must be present."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids


@_styled
def roc_figure(scan_scores: Mapping[str, Any], columns: int = 5) -> Picture | None:
    """Per-label ROC curves of the evaluation classifier on real test scans and on the scans synthesized from
    their reports (``meta.scan_scores`` of a diffusion evaluation); None when no label has both classes."""
    names = list(scan_scores["labels"])
    positive = np.asarray(scan_scores["positive"], dtype=bool)
    real = np.asarray(scan_scores["real"], dtype=float)
    fake = np.asarray(scan_scores["synthesized"], dtype=float)
    shown = [k for k in range(len(names)) if 0 < positive[:, k].sum() < len(positive)]
    if not shown:
        return None
    fig, axes = _grid(len(shown), columns, 2.3, extra_h=0.3)
    for ax, k in zip(axes, shown, strict=True):
        for scores, colour, what in ((real, REAL, "real"), (fake, SYNTHESIZED, "synth.")):
            fpr, tpr, auc = roc_curve(scores[:, k], positive[:, k])
            ax.plot(fpr, tpr, color=colour, lw=1.6, label=f"{what} {auc:.2f}")
        ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
        ax.set_title(f"{names[k]} (n+={int(positive[:, k].sum())})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_aspect("equal")
        ax.legend(loc="lower right", title="AUC", frameon=False, handlelength=1.2)
    axes[0].set_xlabel("false positive rate")
    axes[0].set_ylabel("true positive rate")
    fig.suptitle(
        f"ROC per label: real test scans (blue) and scans synthesized from their reports (red), {len(positive)} scans"
    )
    return _picture(fig)


# ---- training curves


def read_training_scalars(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar the training loop logged in ``RUN/logs/`` (TensorBoard events): tag -> (steps, values).
    Empty when the run keeps no logs (a saved pipeline folder leaves them out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # heavy: on use

    log_dir = Path(run_dir) / TRAINING_LOG_DIR
    if not log_dir.is_dir():
        return {}
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        last: dict[int, float] = {}
        for e in events:  # a resumed run logs some steps again: the later value wins
            last[int(e.step)] = float(e.value)
        steps = np.array(sorted(last), dtype=np.int64)
        out[tag] = (steps, np.array([last[s] for s in steps], dtype=float))
    return out


def _smooth(values: np.ndarray, weight: float = 0.8) -> np.ndarray:
    out, acc = np.empty_like(values), values[0]
    for i, v in enumerate(values):  # TensorBoard's exponential moving average
        acc = weight * acc + (1 - weight) * v
        out[i] = acc
    return out


@_styled
def training_figure(
    scalars: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    select_metric: str | None = None,
    best_step: int | None = None,
) -> Picture | None:
    """Training loss, validation loss and the validation metric the run was selected on (best step marked);
    None when nothing was logged."""
    panels: list[tuple[str, str]] = []
    if "train/loss" in scalars:
        panels.append(("train/loss", "training loss"))
    if "val/val_loss" in scalars:
        panels.append(("val/val_loss", "validation loss"))
    select = f"val/{select_metric}" if select_metric else None
    if select and select in scalars and select != "val/val_loss":
        panels.append((select, f"validation {select_metric} (selection)"))
    if not panels:
        return None
    fig, axes = _grid(len(panels), 3, 3.0)
    fig.set_size_inches(3.6 * len(panels), 2.7)
    for ax, (tag, name) in zip(axes, panels, strict=True):
        steps, values = scalars[tag]
        if tag.startswith("train/") and len(values) > 5:
            ax.plot(steps, values, color="#9ecae1", lw=0.8)
            ax.plot(steps, _smooth(values), color=REAL, lw=1.6)
        else:
            ax.plot(steps, values, color=REAL, lw=1.6, marker="o" if len(values) < 30 else None, ms=3)
        if best_step is not None and tag.startswith("val/"):
            ax.axvline(best_step, color="#2ca02c", ls="--", lw=1, label=f"kept: step {best_step}")
            ax.legend(frameon=False)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _picture(fig)


# ---- pointing game

POINTING_SERIES = (  # (key suffix, legend, colour)
    ("pointing_game", "AdaMatch (best patch of the word)", REAL),
    ("pointing_game_prior", "no-pixel baseline: the finding's training box", "#ff7f0e"),
    ("pointing_game_centre", "no-pixel baseline: the image centre", "#8c564b"),
    ("pointing_game_chance", "chance: a random patch of the image", "#999999"),
)


def pointing_words(metrics: Mapping[str, Any], prefix: str = "localization.per_finding.") -> list[str]:
    """The finding words with a per-finding pointing game in an AdaMatch evaluation's metrics."""
    words = {
        key[len(prefix) : -len(".pointing_game")]
        for key in metrics
        if key.startswith(prefix) and key.endswith(".pointing_game")
    }
    return sorted(words, key=lambda w: (-(metrics.get(f"{prefix}{w}.count") or 0), w))


@_styled
def pointing_figure(metrics: Mapping[str, Any], prefix: str = "localization.per_finding.") -> Picture | None:
    """Horizontal bars per finding word: AdaMatch's pointing game beside the baselines the metrics hold
    (``..._prior`` and ``..._centre`` when present, ``..._chance``); None without per-finding results."""
    words = pointing_words(metrics, prefix)
    if not words:
        return None
    series = [s for s in POINTING_SERIES if any(f"{prefix}{w}.{s[0]}" in metrics for w in words)]
    height = 0.22 * len(series) + 0.12
    fig = _figure(7.5, 1.5 + len(words) * height)
    ax = fig.subplots()
    ys = np.arange(len(words), dtype=float) * height
    bar = 0.2
    for j, (suffix, legend, colour) in enumerate(series):
        vals = [metrics.get(f"{prefix}{w}.{suffix}") for w in words]
        vals = [np.nan if v is None else float(v) for v in vals]
        ax.barh(ys + j * bar, vals, height=bar * 0.9, color=colour, label=legend)
        for y, v in zip(ys + j * bar, vals, strict=True):
            if np.isfinite(v):
                ax.text(v + 0.01, y, f"{v:.2f}", va="center", fontsize=MIN_FONT_PT)
    ax.set_yticks(ys + bar * (len(series) - 1) / 2)
    ax.set_yticklabels([f"{w} (n={int(metrics.get(f'{prefix}{w}.count') or 0)})" for w in words])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("pointing game: share of (image, word) pairs whose point lands in the finding's box")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    ax.set_title("Pointing game per finding word")
    return _picture(fig)

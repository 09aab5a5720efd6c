"""Per-scan scores of the evaluation classifier, kept in the diffusion evaluation record (``meta.scan_scores``)
so that per-label ROC curves of real and synthesized scans can be drawn later (``medvl report``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from medvl.eval.classifier import positive_labels, predict
from medvl.text.chexpert import CHEXPERT_LABELS


def _shortest(probs: np.ndarray) -> list[list[float]]:
    """(N, K) float32 -> lists of floats written with the fewest digits that read back as the same float32: the
    record stays small and rounding makes no ties (a tie moves an AUC, and a barely trained classifier's
    probabilities differ only in the sixth decimal)."""
    return [
        [float(np.format_float_positional(v, unique=True)) for v in row] for row in probs.astype(np.float32)
    ]


def scan_scores(classifier, real: np.ndarray, synthesized: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``{"labels": the 14 names, "positive": (N, 14) 0/1 (label 1 positive; 0, -1 and blank negative),
    "real": (N, 14) probabilities on the real scans, "synthesized": (N, 14) on the scans synthesized from their
    reports}`` as JSON lists. real, synthesized: (N, 1, S, S) in [-1024, 1024]; labels (N, 14)."""
    p_real = predict(classifier, real)[0]
    p_fake = predict(classifier, synthesized)[0]
    return {
        "labels": list(CHEXPERT_LABELS),
        "positive": positive_labels(labels).astype(int).tolist(),
        "real": _shortest(p_real),
        "synthesized": _shortest(p_fake),
    }

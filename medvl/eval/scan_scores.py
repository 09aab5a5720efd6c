"""Per-scan scores of the evaluation classifier, kept in the diffusion evaluation record (``meta.scan_scores``)
so that per-label ROC curves of real and synthesized scans can be drawn later (``medvl report``) and two runs
scored on the same split can be compared study by study (``benchmarks/paired_runs.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medvl.eval.classifier import laterality_hits, positive_labels, predict
from medvl.text.chexpert import CHEXPERT_LABELS


def _shortest(probs: np.ndarray) -> list[list[float]]:
    """(N, K) float32 -> lists of floats written with the fewest digits that read back as the same float32: the
    record stays small and rounding makes no ties (a tie moves an AUC, and a barely trained classifier's
    probabilities differ only in the sixth decimal)."""
    return [
        [float(np.format_float_positional(v, unique=True)) for v in row] for row in probs.astype(np.float32)
    ]


def scan_scores(
    classifier,
    real: np.ndarray,
    synthesized: np.ndarray,
    labels: np.ndarray,
    studies: Sequence[str] | None = None,
    pairs: Sequence[tuple[int, int, int]] = (),
) -> dict[str, Any]:
    """``{"labels": the 14 names, "positive": (N, 14) 0/1 (label 1 positive; 0, -1 and blank negative),
    "real": (N, 14) probabilities on the real scans, "synthesized": (N, 14) on the scans synthesized from their
    reports}`` as JSON lists; with ``studies`` also ``"studies"`` (N ids), and with ``pairs`` (the laterality
    pairs ``(scan, finding, side)``) ``"laterality": {"pairs": ..., "real": hits, "synthesized": hits}`` (1 when
    the stated side's logit is higher). real, synthesized: (N, 1, S, S) in [-1024, 1024]; labels (N, 14)."""
    p_real, s_real, _ = predict(classifier, real)
    p_fake, s_fake, _ = predict(classifier, synthesized)
    out: dict[str, Any] = {
        "labels": list(CHEXPERT_LABELS),
        "positive": positive_labels(labels).astype(int).tolist(),
        "real": _shortest(p_real),
        "synthesized": _shortest(p_fake),
    }
    if studies is not None:
        out["studies"] = [str(s) for s in studies]
    if pairs:
        out["laterality"] = {
            "pairs": [[int(i), int(j), int(h)] for i, j, h in pairs],
            "real": laterality_hits(s_real, pairs).astype(int).tolist(),
            "synthesized": laterality_hits(s_fake, pairs).astype(int).tolist(),
        }
    return out

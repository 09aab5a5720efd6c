"""Bootstrap intervals of the clinical-efficacy F1 scores (``ce.*.f1_ci``), resampled over studies.

Every F1 of :func:`medvl.eval.clinical.ce_metrics` is a ratio of sums over the reports, ``2 TP / (2 TP + FP + FN)``:
micro F1 sums over the 14 labels (micro5 over CheXbert's five), per-label F1 over one label. Each report's own
``2 TP`` and ``2 TP + FP + FN`` are therefore all a resample needs (:meth:`StudyResampler.ratio_interval`); macro F1,
a mean over the labels with a positive reference *in the resample*, is recomputed per resample
(:meth:`StudyResampler.interval`). The point values stay those of ``ce_metrics``; on the full sample the
statistics below give exactly those values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medvl.eval.bootstrap import StudyResampler
from medvl.eval.clinical import positives
from medvl.text.chexpert import CHEXPERT_5, CHEXPERT_LABELS

CI_CONVENTION = (
    "ce.*.f1_ci: the F1 recomputed on each resample of studies (micro, micro5 and per-label F1 as the ratio "
    "2TP / (2TP + FP + FN) of the resample's sums; macro F1 over the labels with a positive reference in the "
    "resample); nlg.* have no interval (corpus-level BLEU / CIDEr, whose document statistics a study resample "
    "would change)"
)


def _counts(reference: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per report and label: ``2 TP``, ``2 TP + FP + FN`` (float, (N, L)) and the positive references (bool)."""
    ref, gen = positives(reference), positives(generated)
    if ref.shape != gen.shape or ref.ndim != 2:
        raise ValueError(f"label arrays must have one shape (N, L), got {ref.shape} and {gen.shape}")
    tp = (ref & gen).astype(np.float64)
    fp = (~ref & gen).astype(np.float64)
    fn = (ref & ~gen).astype(np.float64)
    return 2 * tp, 2 * tp + fp + fn, ref


def micro_f1_interval(
    resampler: StudyResampler,
    reference: np.ndarray,
    generated: np.ndarray,
    columns: Sequence[int] | None = None,
) -> list[float] | None:
    """Interval of the micro F1 of ``generated`` against ``reference`` ((N, L) labels) over ``columns`` (all)."""
    num, den, _ = _counts(reference, generated)
    if columns is not None:
        num, den = num[:, list(columns)], den[:, list(columns)]
    return resampler.ratio_interval(num.sum(1), den.sum(1))


def micro_f1_gap(
    resampler: StudyResampler,
    reference: np.ndarray,
    model: np.ndarray,
    baseline: np.ndarray,
    columns: Sequence[int] | None = None,
) -> tuple[float, list[float] | None]:
    """Micro F1 of ``model`` minus that of ``baseline`` (both (N, L) labels against ``reference``) over
    ``columns`` (all), and its paired interval: both F1s recomputed on the same resample of studies."""
    cols = slice(None) if columns is None else list(columns)
    num_m, den_m, _ = _counts(reference, model)
    num_b, den_b, _ = _counts(reference, baseline)
    num_m, den_m = num_m[:, cols].sum(1), den_m[:, cols].sum(1)
    num_b, den_b = num_b[:, cols].sum(1), den_b[:, cols].sum(1)

    def gap(idx: np.ndarray) -> float | None:
        dm, db = den_m[idx].sum(), den_b[idx].sum()
        if dm <= 0 or db <= 0:
            return None
        return float(num_m[idx].sum() / dm - num_b[idx].sum() / db)

    point = gap(np.arange(len(num_m)))
    return (float("nan") if point is None else point), resampler.interval(gap)


def ce_intervals(
    resampler: StudyResampler,
    reference: np.ndarray,
    generated: np.ndarray,
    prefix: str = "",
    label_names: Sequence[str] = CHEXPERT_LABELS,
) -> dict[str, list[float] | None]:
    """``<prefix>ce.micro.f1_ci``, ``ce.micro5.f1_ci``, ``ce.macro.f1_ci`` and ``ce.per_label.<name>.f1_ci`` for
    CheXbert's five labels; ``None`` where the F1 is undefined on more than half of the resamples."""
    names = list(label_names)
    num, den, ref = _counts(reference, generated)
    five = [names.index(n) for n in CHEXPERT_5 if n in names]
    out: dict[str, list[float] | None] = {
        f"{prefix}ce.micro.f1_ci": resampler.ratio_interval(num.sum(1), den.sum(1)),
        f"{prefix}ce.micro5.f1_ci": resampler.ratio_interval(num[:, five].sum(1), den[:, five].sum(1)),
    }

    def macro(idx: np.ndarray) -> float | None:
        supported = ref[idx].any(0)
        if not supported.any():
            return None
        return float((num[idx][:, supported].sum(0) / den[idx][:, supported].sum(0)).mean())

    out[f"{prefix}ce.macro.f1_ci"] = resampler.interval(macro)
    for j in five:
        out[f"{prefix}ce.per_label.{names[j]}.f1_ci"] = resampler.ratio_interval(num[:, j], den[:, j])
    return out


__all__ = ["CI_CONVENTION", "ce_intervals", "micro_f1_gap", "micro_f1_interval"]

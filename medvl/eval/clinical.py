"""Clinical efficacy (CE) of generated reports: CheXpert labels of generated vs reference reports.

Both reports are labelled by medvl's labeler (:func:`medvl.text.labeler.label_report`). Convention
(R2Gen's): a label counts as positive only when the labeler says 1; uncertain (-1), negative (0) and
blank (not mentioned) are all negative. Then

- ``ce.micro.precision|recall|f1``: pooled counts over all 14 labels (No Finding included);
- ``ce.macro.f1``: mean per-label F1 over the labels with at least one positive reference (test support);
- ``ce.micro5.precision|recall|f1``: pooled over CheXbert's 5 (Atelectasis, Cardiomegaly,
  Consolidation, Edema, Pleural Effusion);
- ``ce.macro5.f1``: mean per-label F1 over those 5, among them the labels with a positive reference;
- ``ce.example.precision|recall|f1`` and ``ce.example5.*``: example-based (per report, then averaged over
  reports; scikit-learn's ``average="samples"``): a report's F1 is ``2 TP / (2 TP + FP + FN)`` over its labels,
  0 when neither the reference nor the generated report has a positive label (scikit-learn's default
  ``zero_division=0``), precision 0 without a positive prediction, recall 0 without a positive reference;
- ``ce.per_label.<name>.precision|recall|f1|support`` with CheXpert's own label names.

With ``--labeler chexbert:CKPT`` (:mod:`medvl.eval.chexbert`) the same keys are computed on CheXbert's labels of both
reports, under ``ce_chexbert.`` (:class:`ReferenceLabels`).

F1 is ``2 TP / (2 TP + FP + FN)``; it is NaN (null in JSON) only when a label has neither positive
references nor positive predictions. Precision with no positive prediction is 0; recall with no
positive reference is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medvl.errors import ConfigError
from medvl.eval.chexbert import CheXbertLabeler
from medvl.text import labeler
from medvl.text.chexpert import CHEXPERT_5, CHEXPERT_LABELS

CE_CONVENTION = (
    "labeler: medvl.text.labeler.label_report on generated and reference reports; R2Gen convention: "
    "positive = 1, uncertain (-1) / negative (0) / blank = negative; micro over the 14 CheXpert labels "
    "(No Finding included); macro F1 over labels with >= 1 positive reference; micro5 over Atelectasis, "
    "Cardiomegaly, Consolidation, Edema, Pleural Effusion; macro5 the mean F1 over those 5 with support; "
    "example / example5: per-report P/R/F1 averaged over reports (scikit-learn average='samples', "
    "zero_division=0: a report with no positive label in reference or generated scores 0)"
)


def positives(labels: np.ndarray) -> np.ndarray:
    """(N, L) labels with 1 / 0 / -1 / NaN -> (N, L) bool, True where the label is 1."""
    return np.nan_to_num(np.asarray(labels, dtype=np.float64), nan=0.0) == 1.0


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else math.nan
    return precision, recall, f1


def ce_metrics(
    reference: np.ndarray, generated: np.ndarray, label_names: Sequence[str] = CHEXPERT_LABELS
) -> dict[str, float]:
    """reference, generated: (N, L) label arrays (1 / 0 / -1 / NaN) in ``label_names`` order -> ``ce.*`` keys."""
    ref, gen = positives(reference), positives(generated)
    if ref.shape != gen.shape or ref.ndim != 2 or ref.shape[1] != len(label_names):
        raise ValueError(
            f"label arrays must both be (N, {len(label_names)}), got {ref.shape} and {gen.shape}"
        )
    tp = (ref & gen).sum(0).astype(float)
    fp = (~ref & gen).sum(0).astype(float)
    fn = (ref & ~gen).sum(0).astype(float)
    out: dict[str, float] = {}
    p, r, f = _prf(tp.sum(), fp.sum(), fn.sum())
    out.update({"ce.micro.precision": p, "ce.micro.recall": r, "ce.micro.f1": f})
    five = [list(label_names).index(n) for n in CHEXPERT_5 if n in label_names]
    p, r, f = _prf(tp[five].sum(), fp[five].sum(), fn[five].sum())
    out.update({"ce.micro5.precision": p, "ce.micro5.recall": r, "ce.micro5.f1": f})
    f1s = []
    for j, name in enumerate(label_names):
        p, r, f = _prf(tp[j], fp[j], fn[j])
        support = tp[j] + fn[j]
        out.update(
            {
                f"ce.per_label.{name}.precision": p,
                f"ce.per_label.{name}.recall": r,
                f"ce.per_label.{name}.f1": f,
                f"ce.per_label.{name}.support": float(support),
            }
        )
        if support > 0:
            f1s.append(f)
    out["ce.macro.f1"] = float(np.mean(f1s)) if f1s else math.nan
    f1s5 = [out[f"ce.per_label.{label_names[j]}.f1"] for j in five if tp[j] + fn[j] > 0]
    out["ce.macro5.f1"] = float(np.mean(f1s5)) if f1s5 else math.nan
    for key, cols in (("example", slice(None)), ("example5", five)):
        p, r, f = example_prf(ref[:, cols], gen[:, cols])
        out.update({f"ce.{key}.precision": p, f"ce.{key}.recall": r, f"ce.{key}.f1": f})
    return out


def example_prf(ref: np.ndarray, gen: np.ndarray) -> tuple[float, float, float]:
    """Example-based precision, recall, F1 of (N, L) bool arrays: per row, then the mean over rows
    (scikit-learn's ``average="samples"`` with ``zero_division=0``). NaN with no rows."""
    if len(ref) == 0:
        return math.nan, math.nan, math.nan
    tp = (ref & gen).sum(1).astype(float)
    n_gen, n_ref = gen.sum(1).astype(float), ref.sum(1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_gen > 0, tp / n_gen, 0.0)
        recall = np.where(n_ref > 0, tp / n_ref, 0.0)
        f1 = np.where(n_gen + n_ref > 0, 2 * tp / (n_gen + n_ref), 0.0)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def renamed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``ce.*`` keys under another prefix (``ce_chexbert.*`` for the labels of another labeler)."""
    return {prefix + k.removeprefix("ce."): v for k, v in metrics.items()}


def label_reports(texts: Sequence[str]) -> np.ndarray:
    """CheXpert labels of each report by medvl's labeler: (N, 14) float, 1 / 0 / -1, NaN blank."""
    return np.asarray(labeler.label_reports(list(texts)), dtype=np.float64).reshape(
        len(texts), len(CHEXPERT_LABELS)
    )


def load_labeler(spec: str, device: str = "cpu") -> CheXbertLabeler:
    """The labeler ``--labeler`` names (``chexbert:CKPT[,bert=DIR]``), loaded from local disk."""
    if str(spec).startswith("chexbert:"):
        return CheXbertLabeler.load(str(spec), device=device)
    raise ConfigError(f"--labeler {spec!r}: the labelers beside medvl's are: chexbert:CKPT[,bert=DIR]")


class ReferenceLabels:
    """A second labeler with its labels of the reference reports: ``metrics(generated)`` -> the ``ce.*`` keys
    computed on its labels, under ``ce_<labeler name>.`` (e.g. ``ce_chexbert.micro5.f1``)."""

    def __init__(self, second, references: Sequence[str]):
        self.labeler = second
        self.prefix = f"ce_{second.name}."
        self.reference = second.label_reports(list(references))

    def metrics(self, generated: Sequence[str]) -> dict[str, float]:
        return renamed(ce_metrics(self.reference, self.labeler.label_reports(list(generated))), self.prefix)

    @property
    def convention(self) -> dict[str, str]:
        return {self.prefix.rstrip("."): self.labeler.convention}

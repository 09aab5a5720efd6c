"""The classifier-template baseline of the report evaluation (``baselines.classifier_template.*``).

The dataset's evaluation classifier (:mod:`medvl.eval.classifier`: a CNN trained on the real training scans) reads
each test scan; every finding it calls positive becomes one template sentence ("There is cardiomegaly."), in
CheXpert's label order, and a scan with no positive finding gets "No acute cardiopulmonary abnormality.". It is what
a scan classifier alone, with no language model, writes: a report head that reads the image should beat it.

A finding is positive when its probability reaches the label's threshold, chosen on the *validation* scans (the
same selection of scans as the test split) as the threshold with the highest F1 against the validation reports'
labels by medvl's labeler (the labels the clinical-efficacy scores use). A label without a positive validation
report gets no threshold and is never called. No Finding has no threshold of its own: it is what the labeler reads
in a report that states no finding. Every template sentence, labelled by medvl's labeler, gives back its own label
positive and nothing else (CheXpert's convention also sets No Finding beside a lone Support Devices).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medvl.eval.classifier import predict
from medvl.eval.clinical import label_reports, positives
from medvl.text.chexpert import CHEXPERT_LABELS

NORMAL_SENTENCE = "No acute cardiopulmonary abnormality."

#: One sentence per CheXpert finding (No Finding is :data:`NORMAL_SENTENCE`, written when no finding is called).
TEMPLATE_SENTENCES: dict[str, str] = {
    "Enlarged Cardiomediastinum": "The cardiomediastinal silhouette is enlarged.",
    "Cardiomegaly": "There is cardiomegaly.",
    "Lung Opacity": "There is a lung opacity.",
    "Lung Lesion": "There is a lung nodule.",
    "Edema": "There is pulmonary edema.",
    "Consolidation": "There is consolidation.",
    "Pneumonia": "There is pneumonia.",
    "Atelectasis": "There is atelectasis.",
    "Pneumothorax": "There is a pneumothorax.",
    "Pleural Effusion": "There is a pleural effusion.",
    "Pleural Other": "There is pleural thickening.",
    "Fracture": "There is a fracture.",
    "Support Devices": "There is a support device.",
}
FINDINGS = [name for name in CHEXPERT_LABELS if name in TEMPLATE_SENTENCES]

CONVENTION = (
    "the evaluation classifier's findings on each scan (probability >= the label's threshold, the threshold "
    "of highest F1 on the validation scans against medvl's labels of their reports, meta.classifier_template), "
    "one template sentence per finding in CheXpert's order ('There is cardiomegaly.'), 'No acute "
    "cardiopulmonary abnormality.' when none (No Finding has no threshold: the labeler reads it in that "
    "sentence); a label without a positive validation report is never called"
)


def template_report(findings: Sequence[str]) -> str:
    """The template report stating ``findings`` (CheXpert names other than No Finding), in CheXpert's order."""
    unknown = [f for f in findings if f not in TEMPLATE_SENTENCES]
    if unknown:
        raise ValueError(f"no template sentence for {unknown} (findings: {', '.join(FINDINGS)})")
    chosen = set(findings)
    sentences = [TEMPLATE_SENTENCES[name] for name in FINDINGS if name in chosen]
    return " ".join(sentences) if sentences else NORMAL_SENTENCE


def max_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float | None, float | None]:
    """The threshold ``t`` (one of ``scores``) whose prediction ``scores >= t`` has the highest F1 against
    ``positive``, and that F1 (ties: the higher threshold); ``(None, None)`` without a positive."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0 or len(scores) == 0:
        return None, None
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    tp = np.cumsum(p)
    k = np.arange(1, len(s) + 1)  # predicted positives when cutting after position k - 1
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a cut can only fall between distinct scores
    f1 = np.where(last_of_tie, 2 * tp / (k + n_pos), -1.0)
    best = int(np.argmax(f1))  # first maximum: the highest threshold reaching it
    return float(s[best]), float(f1[best])


def classifier_probabilities(classifier, dataset, batch_size: int = 128) -> np.ndarray:
    """(N, 14) label probabilities of the classifier on the scans of ``dataset`` (PreparedDataset-like)."""
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = torch.stack(
            [dataset[i]["image"] for i in range(start, min(len(dataset), start + batch_size))]
        )
        out.append(predict(classifier, batch.numpy())[0])
    return np.concatenate(out) if out else np.zeros((0, len(CHEXPERT_LABELS)), np.float32)


def choose_thresholds(
    probabilities: np.ndarray, reports: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Per finding: ``{"threshold": t, "validation_f1": f1, "validation_positives": n}`` from validation scans'
    probabilities (N, 14) and their reports (labelled by medvl's labeler)."""
    pos = positives(label_reports(list(reports)))
    out = {}
    for name in FINDINGS:
        j = CHEXPERT_LABELS.index(name)
        t, f1 = max_f1_threshold(probabilities[:, j], pos[:, j])
        out[name] = {"threshold": t, "validation_f1": f1, "validation_positives": int(pos[:, j].sum())}
    return out


def template_reports(probabilities: np.ndarray, thresholds: dict[str, dict[str, float | None]]) -> list[str]:
    """The template report of each scan from its probabilities (N, 14) and :func:`choose_thresholds`."""
    called = np.zeros((len(probabilities), len(FINDINGS)), bool)
    for k, name in enumerate(FINDINGS):
        t = thresholds[name]["threshold"]
        if t is not None:
            called[:, k] = probabilities[:, CHEXPERT_LABELS.index(name)] >= t
    return [template_report([FINDINGS[k] for k in np.flatnonzero(row)]) for row in called]


__all__ = [
    "CONVENTION",
    "FINDINGS",
    "NORMAL_SENTENCE",
    "TEMPLATE_SENTENCES",
    "choose_thresholds",
    "classifier_probabilities",
    "max_f1_threshold",
    "template_report",
    "template_reports",
]

"""``medvl evaluate cyclic``: scan -> report -> scan and report -> scan -> report, scored beside the one-way
scores (docs/design.md sections 4 and 6).

For every frontal test scan (scan ``I``, reference report ``R``; ``max_studies`` limits them, default all):

* report -> scan -> report: ``I' = synthesize(R)``, ``R'' = generate(I')``. Scored by the labeler:
  ``cyclic.report_image_report.ce_f1`` (micro F1 of R'' against R, R2Gen convention), ``...ce_micro5_f1``;
  and by AdaMatch: ``...adamatch_similarity`` (cosine of AdaMatch's global text features of R and R'').
* scan -> report -> scan: ``R' = generate(I)``, ``I'' = synthesize(R')``. Scored by the image classifier:
  ``cyclic.image_report_image.label_auroc`` (macro AUROC of the classifier on I'' against R's labels, over the
  labels with at least ``min_positives`` (10) positive studies, named in ``meta.labels_used``; per label for every
  label with both classes); and by AdaMatch: ``...adamatch_similarity`` (cosine of AdaMatch's global image
  features of I and I'').
* one way, same studies, same settings: ``cyclic.one_way.image_to_report.ce_f1`` (R' against R),
  ``cyclic.one_way.report_to_image.label_auroc`` (classifier on I'), ``cyclic.real.label_auroc``
  (classifier on I), and AdaMatch retrieval R@1 of each generated item against its source among the
  studies (``cyclic.one_way.*.adamatch_r1``; chance is 1/N).
* references: ``...adamatch_similarity_random_pair``, the same cosine between an original and the reconstruction
  of another study (a seeded derangement); ``<key>_ci`` bootstrap intervals of the CE F1 and label AUROC keys
  (1,000 resamples of the studies, :mod:`medvl.eval.bootstrap`).

The cycles are run by :func:`run_cycles` and scored by :func:`score_cycles`, which take the two directions and the
scorers as plain callables. ``--run`` is a diffusion run (or a demo directory); the report run is found through
``stage.json``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medvl.data.prepared import INDEX_FILE
from medvl.errors import RunError
from medvl.eval.bootstrap import CONVENTION as BOOTSTRAP_CONVENTION
from medvl.eval.bootstrap import StudyResampler, binary_auroc
from medvl.eval.ce_intervals import micro_f1_interval
from medvl.eval.classifier import (
    ClassifierLike,
    label_aurocs,
    load_split,
    positive_labels,
    predict,
    resolve_classifier,
)
from medvl.eval.clinical import ReferenceLabels, ce_metrics, label_reports, load_labeler
from medvl.eval.common import metrics_record, write_metrics
from medvl.eval.image import synthesize_reports
from medvl.inference.generate import ReportGenerator
from medvl.inference.synthesize import Synthesizer
from medvl.runs import find_runs
from medvl.text.chexpert import CHEXPERT_LABELS

logger = logging.getLogger(__name__)

#: A label enters the macro label AUROC with at least this many positive studies among those evaluated.
MIN_POSITIVES = 10
#: Added to the seed of the scans drawn from generated reports (the other cycle's scans use ``seed``).
CYCLE_SEED_OFFSET = 500_009


def _generate(generator, images: np.ndarray, beams: int | None, batch_size: int, desc: str) -> list[str]:
    texts: list[str] = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        texts.extend(r.text for r in generator.generate(batch, beams=beams))
    return texts


def _safe_reports(texts: list[str]) -> list[str]:
    # A decoder can emit an empty report; the synthesizer refuses those, so such a study is drawn
    # from a neutral placeholder word and counted under meta.empty_generated.
    return [t if t.strip() else "normal" for t in texts]


class AdaMatchScorer:
    """AdaMatch's global features and retrieval R@1, the scores the cycles are compared by."""

    def __init__(self, run, batch_size: int = 64):
        self.run = run
        self.batch_size = batch_size

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """(N, D) unit vectors: the mean of each scan's patch features."""
        feats, bs = [], self.batch_size
        for i in range(0, len(images), bs):
            p = self.run.encode_images(torch.from_numpy(np.ascontiguousarray(images[i : i + bs])))
            feats.append(F.normalize(p.features.mean(1), dim=-1).cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors: the mean of each report's content-word features."""
        feats, bs = [], self.batch_size
        for i in range(0, len(texts), bs):
            tok = self.run.encode_reports(list(texts[i : i + bs]))
            m = tok.word_mask.unsqueeze(-1).float()
            pooled = (tok.features * m).sum(1) / m.sum(1).clamp(min=1.0)
            feats.append(F.normalize(pooled, dim=-1).cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def retrieval_r1(self, images: np.ndarray, texts: Sequence[str], image_to_text: bool) -> float:
        """Share of items whose own partner scores highest among all N (AdaMatch token-wise score)."""
        bs = self.batch_size
        patches = [
            self.run.encode_images(torch.from_numpy(np.ascontiguousarray(images[i : i + bs])))
            for i in range(0, len(images), bs)
        ]
        rows = []
        for i in range(0, len(texts), bs):
            tok = self.run.encode_reports(list(texts[i : i + bs]))
            cols = [self.run.model.scores(p, tok) for p in patches]
            s = torch.cat([c[0] if image_to_text else c[1] for c in cols], 0)  # (N_images, b_texts)
            rows.append(s.cpu())
        scores = torch.cat(rows, 1)  # (N_images, N_texts)
        n = scores.shape[0]
        hits = (scores.argmax(1) if image_to_text else scores.argmax(0)) == torch.arange(n)
        return float(hits.float().mean())


@dataclass
class CycleOutputs:
    """The studies and what each direction made of them."""

    images: np.ndarray  # I (N, 1, S, S) in [-1024, 1024]
    references: list[str]  # R
    labels: np.ndarray  # (N, 14) CheXpert values of the dataset, the classifier's targets
    studies: list[str]  # study of each record (bootstrap clusters)
    synth_from_ref: np.ndarray  # I' = synthesize(R)
    cycle_reports: list[str]  # R'' = generate(I')
    generated: list[str]  # R' = generate(I)
    cycle_images: np.ndarray  # I'' = synthesize(R')


def run_cycles(
    images: np.ndarray,
    references: list[str],
    labels: np.ndarray,
    studies: list[str],
    *,
    generate: Callable[[np.ndarray], list[str]],
    synthesize: Callable[[list[str], int], np.ndarray],
    seed: int = 0,
) -> CycleOutputs:
    """Both cycles: ``generate(images) -> reports`` and ``synthesize(reports, seed) -> images`` (N, 1, S, S)."""
    synth_from_ref = synthesize(references, seed)  # report -> scan (one way), then -> report (cycle)
    cycle_reports = generate(synth_from_ref)
    generated = generate(images)  # scan -> report (one way), then -> scan (cycle)
    cycle_images = synthesize(_safe_reports(generated), seed + CYCLE_SEED_OFFSET)
    return CycleOutputs(
        images, references, labels, studies, synth_from_ref, cycle_reports, generated, cycle_images
    )


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)`` moving every item (one n-cycle); identity for n < 2."""
    if n < 2:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def labels_with_positives(labels: np.ndarray, min_positives: int = MIN_POSITIVES) -> list[str]:
    """CheXpert names with at least ``min_positives`` positive (label 1) records and at least one negative."""
    y = positive_labels(labels)
    n_pos = y.sum(0)
    return [name for k, name in enumerate(CHEXPERT_LABELS) if n_pos[k] >= min_positives and n_pos[k] < len(y)]


def _auroc_interval(
    resampler: StudyResampler, scores: np.ndarray, labels: np.ndarray, used: Sequence[str]
) -> list[float] | None:
    y = positive_labels(labels).astype(bool)
    cols = [CHEXPERT_LABELS.index(n) for n in used]
    if not cols:
        return None

    def stat(idx: np.ndarray) -> float | None:
        values = [binary_auroc(scores[idx, k], y[idx, k]) for k in cols]
        return None if any(v is None for v in values) else float(np.mean(values))

    return resampler.interval(stat)


def score_cycles(
    out: CycleOutputs,
    *,
    probabilities: Callable[[np.ndarray], np.ndarray],
    adamatch: AdaMatchScorer,
    second: ReferenceLabels | None = None,
    min_positives: int = MIN_POSITIVES,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, str], dict]:
    """``cyclic.*`` metrics of :func:`run_cycles`' outputs, with ``probabilities(images) -> (N, 14)`` the
    evaluation classifier and ``adamatch`` the features (:class:`AdaMatchScorer` or the same methods); returns
    (metrics, missing reasons, extra meta: labels used and their positives)."""
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    resampler = StudyResampler(out.studies, seed=seed)
    ref_labels = label_reports(out.references)
    cycle_labels = label_reports(out.cycle_reports)
    one_labels = label_reports(out.generated)
    ce_cycle = ce_metrics(ref_labels, cycle_labels)
    ce_one = ce_metrics(ref_labels, one_labels)
    metrics["cyclic.report_image_report.ce_f1"] = ce_cycle["ce.micro.f1"]
    metrics["cyclic.report_image_report.ce_micro5_f1"] = ce_cycle["ce.micro5.f1"]
    metrics["cyclic.one_way.image_to_report.ce_f1"] = ce_one["ce.micro.f1"]
    metrics["cyclic.one_way.image_to_report.ce_micro5_f1"] = ce_one["ce.micro5.f1"]
    metrics["cyclic.report_image_report.ce_f1_ci"] = micro_f1_interval(resampler, ref_labels, cycle_labels)
    metrics["cyclic.one_way.image_to_report.ce_f1_ci"] = micro_f1_interval(resampler, ref_labels, one_labels)
    if second is not None:
        for key, texts in (
            ("report_image_report", out.cycle_reports),
            ("one_way.image_to_report", out.generated),
        ):
            m = second.metrics(texts)
            metrics[f"cyclic.{key}.ce_chexbert_f1"] = m["ce_chexbert.micro.f1"]
            metrics[f"cyclic.{key}.ce_chexbert_micro5_f1"] = m["ce_chexbert.micro5.f1"]

    used = labels_with_positives(out.labels, min_positives)
    n_pos = positive_labels(out.labels).sum(0)
    for key, images in (
        ("image_report_image", out.cycle_images),
        ("one_way.report_to_image", out.synth_from_ref),
        ("real", out.images),
    ):
        probs = probabilities(images)
        per = label_aurocs(probs, out.labels)
        values = [per[n] for n in used if n in per]
        metrics[f"cyclic.{key}.label_auroc"] = float(np.mean(values)) if values else math.nan
        metrics[f"cyclic.{key}.label_auroc_ci"] = _auroc_interval(resampler, probs, out.labels, used)
        if not values:
            missing[f"cyclic.{key}.label_auroc"] = (
                f"no label has {min_positives} or more positive studies (and a negative) among the "
                f"{len(out.labels)} evaluated"
            )
        if key == "image_report_image":
            for name, v in per.items():
                metrics[f"cyclic.image_report_image.per_label.{name}.auroc"] = v

    ad = adamatch
    real_img, cyc_img = ad.image_features(out.images), ad.image_features(out.cycle_images)
    ref_txt = ad.text_features(out.references)
    cyc_txt = ad.text_features(_safe_reports(out.cycle_reports))
    perm = torch.from_numpy(derangement(len(out.references), seed))
    metrics["cyclic.image_report_image.adamatch_similarity"] = float((real_img * cyc_img).sum(1).mean())
    metrics["cyclic.image_report_image.adamatch_similarity_random_pair"] = float(
        (real_img * cyc_img[perm]).sum(1).mean()
    )
    metrics["cyclic.report_image_report.adamatch_similarity"] = float((ref_txt * cyc_txt).sum(1).mean())
    metrics["cyclic.report_image_report.adamatch_similarity_random_pair"] = float(
        (ref_txt * cyc_txt[perm]).sum(1).mean()
    )
    metrics["cyclic.one_way.image_to_report.adamatch_r1"] = ad.retrieval_r1(
        out.images, _safe_reports(out.generated), image_to_text=False
    )
    metrics["cyclic.one_way.report_to_image.adamatch_r1"] = ad.retrieval_r1(
        out.synth_from_ref, out.references, image_to_text=True
    )
    metrics["cyclic.real.adamatch_r1"] = ad.retrieval_r1(out.images, out.references, image_to_text=True)
    for key, value in list(metrics.items()):
        if key.endswith("_ci") and value is None and key.removesuffix("_ci") not in missing:
            missing[key] = "undefined on more than half of the bootstrap resamples"
    extra = {
        "labels_used": used,
        "label_positives": {name: int(n_pos[k]) for k, name in enumerate(CHEXPERT_LABELS)},
        "min_positives": min_positives,
    }
    return metrics, missing, extra


def _study_ids(data: Path, dicom_ids: Sequence[str]) -> list[str]:
    """The study of each image (the bootstrap's clusters); an image without one is its own study."""
    index = pd.read_csv(
        Path(data) / INDEX_FILE, dtype=str, keep_default_na=False, usecols=["dicom_id", "study_id"]
    )
    study = dict(zip(index["dicom_id"], index["study_id"], strict=True))
    return [study.get(str(d)) or f"image:{d}" for d in dicom_ids]


def evaluate_cyclic(
    *,
    run: Path,
    data: Path,
    split: str = "test",
    out: Path | None = None,
    max_studies: int | None = None,
    min_positives: int = MIN_POSITIVES,
    steps: int | None = None,
    guidance: float | None = None,
    beams: int | None = None,
    seed: int = 0,
    device: str | None = None,
    classifier: ClassifierLike,
    labeler: str | None = None,
) -> dict:
    """Score both cycles on the frontal scans of ``split`` (the first ``max_studies`` of them; None: all) with the
    dataset's evaluation ``classifier`` (see :mod:`medvl.eval.classifier`); write metrics to ``out``.
    ``labeler="chexbert:CKPT"`` also scores the generated reports' labels by CheXbert (``..._ce_chexbert_f1``,
    :mod:`medvl.eval.chexbert`)."""
    runs = find_runs(run)
    for need in ("report", "diffusion"):
        if need not in runs:
            raise RunError(
                f"cyclic evaluation needs a {need} run; {run} leads to {sorted(runs)} only "
                "(pass the diffusion run trained --from the report run, or a demo directory)"
            )
    synth = Synthesizer.load(runs["diffusion"], device=device)
    generator = ReportGenerator.load(runs["report"], device=str(synth.device))
    classifier, _ = resolve_classifier(classifier, device=synth.device)
    # a missing labeler file fails here, before any scan is drawn
    second_labeler = load_labeler(labeler, str(synth.device)) if labeler else None

    arrays = load_split(data, split, synth.image_size, limit=max_studies or 0)
    keep = [i for i, r in enumerate(arrays.reports) if r.strip()]
    references = [" ".join(arrays.reports[i].split()) for i in keep]
    n = len(keep)
    bs = generator.generation.batch_size
    steps = int(steps or synth.sampler.steps)
    guidance = float(synth.sampler.guidance if guidance is None else guidance)
    cycles = run_cycles(
        arrays.images[keep],
        references,
        arrays.labels[keep],
        _study_ids(data, [arrays.dicom_ids[i] for i in keep]),
        generate=lambda images: _generate(generator, images, beams, bs, "scan->report"),
        synthesize=lambda texts, s: synthesize_reports(
            synth, texts, steps=steps, guidance=guidance, seed=s, desc="report->scan"
        ),
        seed=seed,
    )
    metrics, missing, extra = score_cycles(
        cycles,
        probabilities=lambda images: predict(classifier, images)[0],
        adamatch=AdaMatchScorer(generator.adamatch_run),
        second=ReferenceLabels(second_labeler, references) if second_labeler is not None else None,
        min_positives=min_positives,
        seed=seed,
    )

    conventions = {
        "cyclic.*.ce_f1": "micro F1 over CheXpert's 14 labels by medvl's labeler, R2Gen convention (uncertain and "
        "blank negative), against the reference report's labels",
        **({"cyclic.*.ce_chexbert_f1": second_labeler.convention} if second_labeler else {}),
        "cyclic.*.label_auroc": f"macro ROC AUC over the labels with at least {min_positives} positive studies "
        "(and a negative) among those evaluated (meta.labels_used, the same for every label_auroc key), medvl's "
        "evaluation classifier (trained on real train scans, selected on validation), against the dataset's "
        "labels of the reference report; per_label: every label with both classes",
        "cyclic.*.adamatch_similarity": "cosine of AdaMatch global features (mean of patch / content-word "
        "features) between the original and its cycle reconstruction",
        "cyclic.*.adamatch_similarity_random_pair": "the same cosine between each original and the cycle "
        "reconstruction of another study (a seeded derangement of the studies): the level of unrelated pairs",
        "cyclic.*.adamatch_r1": f"AdaMatch retrieval R@1 of the generated item's own source among the {n} "
        f"studies (chance {1 / max(n, 1):.4f})",
        "intervals": BOOTSTRAP_CONVENTION + "; ce_f1_ci: micro F1 of the resample's pooled counts; "
        "label_auroc_ci: the macro over meta.labels_used recomputed per resample",
        "sampling": f"{synth.sampler.name.value}, {steps} steps, guidance {guidance:g}; beams "
        f"{beams or generator.generation.beams}",
    }
    record = metrics_record(
        metrics,
        split=split,
        num_samples=n,
        conventions=conventions,
        seed=seed,
        config_hash=None,
        missing=missing,
        extra={
            "runs": {k: str(v) for k, v in runs.items()},
            "empty_generated": sum(not t.strip() for t in cycles.generated),
            "max_studies": max_studies,
            **extra,
        },
    )
    write_metrics(out, record)
    if out is not None:
        with open(Path(out).with_suffix(".examples.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["study", "reference", "generated", "cycle_report"])
            for i in range(min(n, 50)):
                w.writerow(
                    [arrays.dicom_ids[keep[i]], references[i], cycles.generated[i], cycles.cycle_reports[i]]
                )
    return record


__all__ = [
    "MIN_POSITIVES",
    "AdaMatchScorer",
    "CycleOutputs",
    "derangement",
    "evaluate_cyclic",
    "labels_with_positives",
    "run_cycles",
    "score_cycles",
]

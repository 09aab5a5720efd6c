"""``medvl evaluate cyclic``: scan -> report -> scan and report -> scan -> report, scored beside the one-way
scores (docs/design.md sections 4 and 6).

For the test studies (scan ``I``, reference report ``R``):

* report -> scan -> report: ``I' = synthesize(R)``, ``R'' = generate(I')``. Scored by the labeler:
  ``cyclic.report_image_report.ce_f1`` (micro F1 of R'' against R, R2Gen convention), ``...ce_micro5_f1``;
  and by AdaMatch: ``...adamatch_similarity`` (cosine of AdaMatch's global text features of R and R'').
* scan -> report -> scan: ``R' = generate(I)``, ``I'' = synthesize(R')``. Scored by the image classifier:
  ``cyclic.image_report_image.label_auroc`` (macro AUROC of the classifier on I'' against R's labels);
  and by AdaMatch: ``...adamatch_similarity`` (cosine of AdaMatch's global image features of I and I'').
* one way, same studies, same settings: ``cyclic.one_way.image_to_report.ce_f1`` (R' against R),
  ``cyclic.one_way.report_to_image.label_auroc`` (classifier on I'), ``cyclic.real.label_auroc``
  (classifier on I), and AdaMatch retrieval R@1 of each generated item against its source among the
  studies (``cyclic.one_way.*.adamatch_r1``; chance is 1/N).

``--run`` is a diffusion run (or a demo directory); the report run is found through ``stage.json``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medvl.errors import RunError
from medvl.eval.classifier import ClassifierLike, label_aurocs, load_split, predict, resolve_classifier
from medvl.eval.clinical import ReferenceLabels, ce_metrics, label_reports, load_labeler
from medvl.eval.common import metrics_record, write_metrics
from medvl.eval.image import synthesize_reports
from medvl.inference.generate import ReportGenerator
from medvl.inference.synthesize import Synthesizer
from medvl.runs import find_runs

logger = logging.getLogger(__name__)


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


@torch.no_grad()
def _global_image(run, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    feats = []
    for i in range(0, len(images), batch_size):
        p = run.encode_images(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
        feats.append(F.normalize(p.features.mean(1), dim=-1).cpu())
    return torch.cat(feats)


@torch.no_grad()
def _global_text(run, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    feats = []
    for i in range(0, len(texts), batch_size):
        tok = run.encode_reports(texts[i : i + batch_size])
        m = tok.word_mask.unsqueeze(-1).float()
        pooled = (tok.features * m).sum(1) / m.sum(1).clamp(min=1.0)
        feats.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(feats)


@torch.no_grad()
def _retrieval_r1(
    run, images: np.ndarray, texts: list[str], image_to_text: bool, batch_size: int = 64
) -> float:
    """Share of items whose own partner scores highest among all N (AdaMatch token-wise score)."""
    patches = [
        run.encode_images(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    rows = []
    for i in range(0, len(texts), batch_size):
        tok = run.encode_reports(texts[i : i + batch_size])
        cols = [run.model.scores(p, tok) for p in patches]
        s = torch.cat([c[0] if image_to_text else c[1] for c in cols], 0)  # (N_images, b_texts)
        rows.append(s.cpu())
    scores = torch.cat(rows, 1)  # (N_images, N_texts)
    n = scores.shape[0]
    if image_to_text:
        hits = scores.argmax(1) == torch.arange(n)
    else:
        hits = scores.argmax(0) == torch.arange(n)
    return float(hits.float().mean())


def evaluate_cyclic(
    *,
    run: Path,
    data: Path,
    split: str = "test",
    out: Path | None = None,
    max_studies: int = 200,
    steps: int | None = None,
    guidance: float | None = None,
    beams: int | None = None,
    seed: int = 0,
    device: str | None = None,
    classifier: ClassifierLike,
    labeler: str | None = None,
) -> dict:
    """Score both cycles on up to ``max_studies`` frontal studies of ``split`` with the dataset's evaluation
    ``classifier`` (see :mod:`medvl.eval.classifier`); write metrics to ``out``. ``labeler="chexbert:CKPT"`` also
    scores the generated reports' labels by CheXbert (``..._ce_chexbert_f1``, :mod:`medvl.eval.chexbert`)."""
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
    adamatch = generator.adamatch_run
    second_labeler = load_labeler(labeler, str(synth.device)) if labeler else None  # a missing file fails here

    arrays = load_split(data, split, synth.image_size, limit=max_studies)
    keep = [i for i, r in enumerate(arrays.reports) if r.strip()]
    images = arrays.images[keep]
    references = [" ".join(arrays.reports[i].split()) for i in keep]
    labels = arrays.labels[keep]
    n = len(keep)
    bs = generator.generation.batch_size
    steps = int(steps or synth.sampler.steps)
    guidance = float(synth.sampler.guidance if guidance is None else guidance)

    # report -> scan (one way), then -> report (cycle)
    synth_from_ref = synthesize_reports(
        synth, references, steps=steps, guidance=guidance, seed=seed, desc="report->scan"
    )
    cycle_reports = _generate(generator, synth_from_ref, beams, bs, "scan'->report")
    # scan -> report (one way), then -> scan (cycle)
    generated = _generate(generator, images, beams, bs, "scan->report")
    empty = sum(not t.strip() for t in generated)
    cycle_images = synthesize_reports(
        synth,
        _safe_reports(generated),
        steps=steps,
        guidance=guidance,
        seed=seed + 500_009,
        desc="report'->scan",
    )

    ref_labels = label_reports(references)
    metrics: dict[str, float] = {}
    ce_cycle = ce_metrics(ref_labels, label_reports(cycle_reports))
    ce_one = ce_metrics(ref_labels, label_reports(generated))
    metrics["cyclic.report_image_report.ce_f1"] = ce_cycle["ce.micro.f1"]
    metrics["cyclic.report_image_report.ce_micro5_f1"] = ce_cycle["ce.micro5.f1"]
    metrics["cyclic.one_way.image_to_report.ce_f1"] = ce_one["ce.micro.f1"]
    metrics["cyclic.one_way.image_to_report.ce_micro5_f1"] = ce_one["ce.micro5.f1"]
    if second_labeler is not None:
        second = ReferenceLabels(second_labeler, references)
        for key, texts in (("report_image_report", cycle_reports), ("one_way.image_to_report", generated)):
            m = second.metrics(texts)
            metrics[f"cyclic.{key}.ce_chexbert_f1"] = m["ce_chexbert.micro.f1"]
            metrics[f"cyclic.{key}.ce_chexbert_micro5_f1"] = m["ce_chexbert.micro5.f1"]

    def macro(scores: np.ndarray) -> tuple[float, dict[str, float]]:
        per = label_aurocs(scores, labels)
        return (float(np.mean(list(per.values()))) if per else float("nan")), per

    probs_cycle = predict(classifier, cycle_images)[0]
    probs_one = predict(classifier, synth_from_ref)[0]
    probs_real = predict(classifier, images)[0]
    metrics["cyclic.image_report_image.label_auroc"], per_cycle = macro(probs_cycle)
    metrics["cyclic.one_way.report_to_image.label_auroc"], _ = macro(probs_one)
    metrics["cyclic.real.label_auroc"], _ = macro(probs_real)
    for name, v in per_cycle.items():
        metrics[f"cyclic.image_report_image.per_label.{name}.auroc"] = v

    metrics["cyclic.image_report_image.adamatch_similarity"] = float(
        (_global_image(adamatch, images) * _global_image(adamatch, cycle_images)).sum(1).mean()
    )
    metrics["cyclic.report_image_report.adamatch_similarity"] = float(
        (_global_text(adamatch, references) * _global_text(adamatch, _safe_reports(cycle_reports)))
        .sum(1)
        .mean()
    )
    metrics["cyclic.one_way.image_to_report.adamatch_r1"] = _retrieval_r1(
        adamatch, images, _safe_reports(generated), image_to_text=False
    )
    metrics["cyclic.one_way.report_to_image.adamatch_r1"] = _retrieval_r1(
        adamatch, synth_from_ref, references, image_to_text=True
    )
    metrics["cyclic.real.adamatch_r1"] = _retrieval_r1(adamatch, images, references, image_to_text=True)

    conventions = {
        "cyclic.*.ce_f1": "micro F1 over CheXpert's 14 labels by medvl's labeler, R2Gen convention (uncertain and "
        "blank negative), against the reference report's labels",
        **({"cyclic.*.ce_chexbert_f1": second_labeler.convention} if second_labeler else {}),
        "cyclic.*.label_auroc": "macro ROC AUC over labels with both classes, medvl's evaluation classifier "
        "(trained on real train scans, selected on validation), against the reference "
        "report's labels",
        "cyclic.*.adamatch_similarity": "cosine of AdaMatch global features (mean of patch / content-word "
        "features) between the original and its cycle reconstruction",
        "cyclic.*.adamatch_r1": f"AdaMatch retrieval R@1 of the generated item's own source among the {n} "
        f"studies (chance {1 / max(n, 1):.4f})",
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
        extra={
            "runs": {k: str(v) for k, v in runs.items()},
            "empty_generated": empty,
            "max_studies": max_studies,
        },
    )
    write_metrics(out, record)
    if out is not None:
        with open(Path(out).with_suffix(".examples.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["study", "reference", "generated", "cycle_report"])
            for i in range(min(n, 50)):
                w.writerow([arrays.dicom_ids[keep[i]], references[i], generated[i], cycle_reports[i]])
    return record

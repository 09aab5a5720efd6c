"""``medvl evaluate report``: NLG and clinical-efficacy metrics of a report run, with baselines and ablations.

On the chosen split (one frontal image per study, as in training), in one run:

- the report run itself: ``nlg.*`` and ``ce.*`` (keys of docs/design.md section 4);
- ``baselines.most_frequent.*``: every study gets the most frequent training report;
- ``baselines.retrieval.*``: every study gets the training report AdaMatch scores highest for its image
  (``s_i2t + s_t2i``, the token-wise scores AdaMatch was trained with; the report run's AdaMatch copy);
- ``baselines.classifier_template.*``: every study gets the evaluation classifier's findings on its scan written
  as template sentences, thresholds chosen on the validation split (:mod:`medvl.eval.template_reports`); missing
  (with its reason under ``meta.missing``) when no classifier is given;
- ``ablations.<name>.*``: every finished report run under ``RUN/ablations/<name>/`` (e.g. trained with
  ``--out RUN/ablations/no_memory --set model.use_memory=false``), decoded the same way.

Scored on the validation split, where the classifier templates' thresholds and a head's finding-state thresholds
(``model.label_states``) are chosen, both are cross-fitted (:mod:`medvl.eval.crossfit`): each fold of the studies
is written with thresholds chosen on the other folds, and ``meta.conventions.thresholds`` says so.

Beside each one: ``<prefix>report.repeated_sentences`` (the share of reports that say one sentence twice, case
and whitespace aside) and bootstrap intervals ``ce.micro.f1_ci``, ``ce.micro5.f1_ci``, ``ce.macro.f1_ci`` and
``ce.per_label.<name>.f1_ci`` for CheXbert's five labels (:mod:`medvl.eval.ce_intervals`, 1,000 resamples of the
studies, seeded); for each baseline, the report head's micro and micro5 F1 minus the baseline's,
``ce.micro.f1_gap_<baseline>`` and ``ce.micro5.f1_gap_<baseline>``, with paired intervals.

Writes ``out`` (metrics with provenance) and ``<out without .json>.predictions.csv``
(``study_id,reference,generated``).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medvl.data.prepared import PreparedDataset
from medvl.devices import resolve_device
from medvl.errors import DataError, RunError
from medvl.eval import template_reports as templates
from medvl.eval.bootstrap import CONVENTION as BOOTSTRAP_CONVENTION
from medvl.eval.bootstrap import StudyResampler
from medvl.eval.ce_intervals import CI_CONVENTION, ce_intervals, micro_f1_gap
from medvl.eval.classifier import ClassifierLike, resolve_classifier
from medvl.eval.clinical import CE_CONVENTION, ReferenceLabels, ce_metrics, label_reports, load_labeler
from medvl.eval.common import metrics_record, run_config_hash, saved_config, write_metrics
from medvl.eval.crossfit import CONVENTION as CROSSFIT_CONVENTION
from medvl.eval.crossfit import crossfit
from medvl.eval.nlg import TOKENISATION, NLGScorer
from medvl.inference.generate import ReportGenerator
from medvl.models.report_bundle import ReportHeadBundle
from medvl.models.report_labels import f1_thresholds
from medvl.runs import CONFIG_FILE
from medvl.text.chexpert import CHEXPERT_5, CHEXPERT_LABELS
from medvl.text.sentences import split_sentences

ABLATIONS_DIR = "ablations"


def predictions_path(out: Path) -> Path:
    """``eval/report.json`` -> ``eval/report.predictions.csv``."""
    return (
        out.with_name(out.stem + ".predictions.csv")
        if out.suffix == ".json"
        else Path(str(out) + ".predictions.csv")
    )


def _run_config(run: Path) -> dict[str, Any]:
    """The report run's saved config (plain data)."""
    config = saved_config(run)
    if config is None:
        raise RunError(f"{run} has no {CONFIG_FILE}; it is not a report run written by `medvl train report`")
    return config


def report_studies(data: Path, split: str, data_config: dict[str, Any]) -> PreparedDataset:
    """The images of ``split`` the report stage reads, by the run's ``data:`` settings: its ``views`` (a blank
    view left out) and, with ``one_image_per_study``, the first such image of each study."""
    ds = PreparedDataset(data, split).select(
        views=data_config["views"], keep_blank_view=False, one_per_study=data_config["one_image_per_study"]
    )
    if len(ds) == 0:
        views = sorted({v.upper() for v in data_config["views"]})
        raise DataError(f"{data}: the '{split}' split has no reports with views {views}")
    return ds


def _generate_rows(
    generator: Any, dataset: Any, rows: Sequence[int], beams: int | None, desc: str
) -> list[str]:
    bs = generator.generation.batch_size
    texts: list[str] = []
    for start in tqdm(range(0, len(rows), bs), desc=desc, unit="batch", leave=False):
        images = torch.stack([dataset[int(i)]["image"] for i in rows[start : start + bs]])
        texts.extend(r.text for r in generator.generate(images, beams=beams))
    return texts


def generate_for_split(
    generator: Any,
    dataset: Any,
    *,
    beams: int | None = None,
    desc: str = "generating",
    crossfit_thresholds: bool = False,
) -> list[str]:
    """Decode every item of ``dataset`` (PreparedDataset-like) with a :class:`ReportGenerator`. With
    ``crossfit_thresholds`` (``dataset`` is the split a head with finding states chose its thresholds on) each
    study is written with thresholds fitted on the other studies' labels (:mod:`medvl.eval.crossfit`); the head's
    own thresholds are left as they were."""
    head = generator.head
    if not (crossfit_thresholds and head.cfg.label_states):
        return _generate_rows(generator, dataset, range(len(dataset)), beams, desc)
    bs = generator.generation.batch_size
    probs = []
    for start in range(0, len(dataset), bs):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(len(dataset), start + bs))])
        features, boxes, _, _ = generator.conditions(images)
        with torch.no_grad():
            probs.append(head.predict_labels(features, boxes).cpu())
    scores = torch.cat(probs)
    targets = torch.as_tensor(np.asarray(dataset.labels) == 1).float()
    saved = head.label_thresholds.clone()
    texts = [""] * len(dataset)
    try:
        for rows, thresholds in crossfit(lambda r: f1_thresholds(scores[r], targets[r]), len(dataset)):
            head.label_thresholds.copy_(thresholds)
            for i, text in zip(rows, _generate_rows(generator, dataset, rows, beams, desc), strict=True):
                texts[i] = text
    finally:
        head.label_thresholds.copy_(saved)
    return texts


def most_frequent_report(reports: Sequence[str]) -> str:
    """The most frequent report text (whitespace-normalised; ties broken by first occurrence)."""
    norm = [" ".join(r.split()) for r in reports if r and r.strip()]
    if not norm:
        raise ValueError("no training reports")
    counts = Counter(norm)
    best = max(counts.values())
    return next(r for r in norm if counts[r] == best)


@torch.no_grad()
def retrieve_reports(
    adamatch_run: Any,
    dataset: Any,
    candidates: Sequence[str],
    *,
    image_batch: int = 32,
    report_batch: int = 256,
) -> list[str]:
    """For each image of ``dataset`` the candidate report with the highest AdaMatch score s_i2t + s_t2i."""
    candidates = list(candidates)
    reports_tokens = []
    for start in range(0, len(candidates), report_batch):
        reports_tokens.append(adamatch_run.encode_reports(candidates[start : start + report_batch]))
    chosen: list[str] = []
    for start in tqdm(
        range(0, len(dataset), image_batch), desc="retrieval baseline", unit="batch", leave=False
    ):
        images = torch.stack(
            [dataset[i]["image"] for i in range(start, min(len(dataset), start + image_batch))]
        )
        patches = adamatch_run.encode_images(images)
        scores = []
        for tokens in reports_tokens:
            s_i2t, s_t2i = adamatch_run.model.scores(patches, tokens)
            scores.append(s_i2t + s_t2i)
        best = torch.cat(scores, dim=1).argmax(1).tolist()
        chosen.extend(candidates[j] for j in best)
    return chosen


def repeats_a_sentence(text: str) -> bool:
    """Whether ``text`` says one sentence twice (sentences compared in lower case, whitespace and end
    punctuation aside)."""
    seen: set[str] = set()
    for a, b in split_sentences(text):
        sentence = " ".join(text[a:b].lower().split()).strip(" .!?;:,")
        if sentence in seen:
            return True
        seen.add(sentence)
    return False


def repeated_sentence_share(texts: Sequence[str]) -> float:
    """Share of ``texts`` that say one sentence twice (:func:`repeats_a_sentence`); NaN without texts."""
    return float(np.mean([repeats_a_sentence(t) for t in texts])) if len(texts) else math.nan


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()} if prefix else dict(metrics)


def score_reports(
    scorer: NLGScorer,
    references: list[str],
    ref_labels: np.ndarray,
    generated: list[str],
    prefix: str = "",
    second: ReferenceLabels | None = None,
    resampler: StudyResampler | None = None,
    gen_labels: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """``nlg.*``, ``ce.*`` and ``report.repeated_sentences`` of ``generated`` against ``references`` (keys under
    ``prefix``); with ``second``, the ``ce_<labeler>.*`` keys of a second labeler too; with ``resampler`` (one
    study per record), the ``ce.*.f1_ci`` intervals (:func:`medvl.eval.ce_intervals.ce_intervals`);
    ``gen_labels``: ``generated``'s labels when already computed."""
    nlg = scorer.score(references, generated)
    gen_labels = label_reports(generated) if gen_labels is None else gen_labels
    ce = ce_metrics(ref_labels, gen_labels)
    if second is not None:
        ce.update(second.metrics(generated))
    intervals = ce_intervals(resampler, ref_labels, gen_labels) if resampler is not None else {}
    repeated = {"report.repeated_sentences": repeated_sentence_share(generated)}
    metrics = _prefixed(prefix, {**nlg.scores, **ce, **intervals, **repeated})
    missing = _prefixed(prefix, nlg.missing)
    for key, value in intervals.items():
        if value is None:
            missing[prefix + key] = "F1 undefined on more than half of the bootstrap resamples"
    undefined = sorted(
        {
            k.split(".")[2]
            for k, v in ce.items()
            if k.startswith("ce.per_label.") and k.endswith(".f1") and math.isnan(v)
        }
    )
    if undefined:
        missing[prefix + "ce.per_label"] = (
            "F1 and recall null (no positive reference and no positive prediction) "
            "for: " + ", ".join(undefined)
        )
    return metrics, missing


def baseline_gaps(
    resampler: StudyResampler, ref_labels: np.ndarray, model: np.ndarray, baseline: np.ndarray, name: str
) -> dict[str, Any]:
    """``ce.micro.f1_gap_<name>`` and ``ce.micro5.f1_gap_<name>``: the model's F1 minus the baseline's, with
    paired intervals (``..._ci``, both recomputed on the same resamples of studies)."""
    five = [CHEXPERT_LABELS.index(n) for n in CHEXPERT_5]
    out: dict[str, Any] = {}
    for key, cols in (("ce.micro.f1", None), ("ce.micro5.f1", five)):
        gap, ci = micro_f1_gap(resampler, ref_labels, model, baseline, cols)
        out[f"{key}_gap_{name}"], out[f"{key}_gap_{name}_ci"] = gap, ci
    return out


def find_ablations(run: Path) -> dict[str, Path]:
    """Finished report runs under ``RUN/ablations/<name>/`` (name -> path)."""
    root = run / ABLATIONS_DIR
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / ReportHeadBundle.DIRNAME).is_dir()}


def classifier_template_baseline(
    classifier: ClassifierLike,
    test: Any,
    data: Path,
    data_config: dict[str, Any],
    device: Any,
    split: str = "test",
) -> tuple[list[str], dict[str, Any]]:
    """The classifier-template report of every scan of ``test`` (:mod:`medvl.eval.template_reports`), thresholds
    chosen on the validation scans the run's ``data:`` settings select, and the thresholds (for the record's meta).
    When ``split`` is the validation split itself, each study's thresholds are chosen on the other studies
    (:mod:`medvl.eval.crossfit`); the meta keeps the thresholds of the whole split.
    """
    model, _ = resolve_classifier(classifier, device=device)
    val = report_studies(data, "validate", data_config)
    val_probs = templates.classifier_probabilities(model, val)
    val_reports = [str(r) for r in val.index["report"]]
    thresholds = templates.choose_thresholds(val_probs, val_reports)
    if split != "validate":
        texts = templates.template_reports(templates.classifier_probabilities(model, test), thresholds)
        return texts, {"validation_studies": len(val), "thresholds": thresholds}
    texts = [""] * len(val)
    fits = crossfit(
        lambda r: templates.choose_thresholds(val_probs[r], [val_reports[i] for i in r]), len(val)
    )
    for rows, fold_thresholds in fits:
        for i, text in zip(rows, templates.template_reports(val_probs[rows], fold_thresholds), strict=True):
            texts[i] = text
    return texts, {"validation_studies": len(val), "thresholds": thresholds, "cross_fitted": True}


def evaluate_report(
    *,
    run: Path,
    data: Path,
    split: str = "test",
    out: Path | None = None,
    labeler: str | None = None,
    classifier: ClassifierLike | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Score the report run ``run`` on ``split`` of the prepared dataset ``data``; see the module docstring.
    Reports are decoded on ``device`` (None: CUDA when available, else the CPU).
    ``labeler="chexbert:CKPT[,bert=DIR]"`` adds ``ce_chexbert.*`` (:mod:`medvl.eval.chexbert`); ``classifier``
    (the dataset's evaluation classifier, :mod:`medvl.eval.classifier`) adds ``baselines.classifier_template.*``."""
    run, data = Path(run), Path(data)
    ReportHeadBundle.read_config(
        run
    )  # a one-line RunError when RUN holds no report head (or an older layout)
    cfg = _run_config(run)
    device = resolve_device(device)
    generator = ReportGenerator.load(run, device=device)
    test = report_studies(data, split, cfg["data"])
    train = report_studies(data, "train", cfg["data"])
    references = [str(r) for r in test.index["report"]]
    ref_labels = label_reports(references)
    second = ReferenceLabels(load_labeler(labeler, str(generator.device)), references) if labeler else None

    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    # Thresholds chosen on the validation split (finding states, classifier templates) are cross-fitted there.
    on_threshold_split = split == "validate"
    generated = generate_for_split(
        generator, test, desc=f"report head ({split})", crossfit_thresholds=on_threshold_split
    )
    baselines = {
        "most_frequent": [most_frequent_report(list(train.index["report"]))] * len(test),
        "retrieval": retrieve_reports(
            generator.adamatch_run, test, sorted({" ".join(r.split()) for r in train.index["report"]})
        ),
    }
    template_meta: dict[str, Any] | None = None
    if classifier is None:
        missing["baselines.classifier_template"] = (
            "no evaluation classifier given (medvl evaluate and medvl.evaluate pass the dataset's)"
        )
    else:
        baselines["classifier_template"], template_meta = classifier_template_baseline(
            classifier, test, data, cfg["data"], generator.device, split
        )
    resampler = StudyResampler(list(test.index["study_id"]))
    ablations = {}
    for name, path in find_ablations(run).items():
        ablations[name] = generate_for_split(
            ReportGenerator.load(path, device=device),
            test,
            desc=f"ablation {name}",
            crossfit_thresholds=on_threshold_split,
        )
    gen_labels = {name: label_reports(texts) for name, texts in {"": generated, **baselines}.items()}
    with NLGScorer() as scorer:
        m, miss = score_reports(
            scorer,
            references,
            ref_labels,
            generated,
            second=second,
            resampler=resampler,
            gen_labels=gen_labels[""],
        )
        metrics.update(m)
        missing.update(miss)
        for name, texts in baselines.items():
            m, miss = score_reports(
                scorer,
                references,
                ref_labels,
                texts,
                prefix=f"baselines.{name}.",
                second=second,
                resampler=resampler,
                gen_labels=gen_labels[name],
            )
            metrics.update(m)
            missing.update(miss)
            metrics.update(baseline_gaps(resampler, ref_labels, gen_labels[""], gen_labels[name], name))
        for name, texts in ablations.items():
            m, miss = score_reports(
                scorer,
                references,
                ref_labels,
                texts,
                prefix=f"ablations.{name}.",
                second=second,
                resampler=resampler,
            )
            metrics.update(m)
            missing.update(miss)
    metrics["generated.empty_share"] = float(np.mean([not t.strip() for t in generated]))
    metrics["generated.mean_words"] = float(np.mean([len(t.split()) for t in generated]))

    g = generator.generation
    conventions = {
        "nlg": TOKENISATION,
        "ce": CE_CONVENTION,
        **(second.convention if second else {}),
        "decoding": (
            (
                f"beam search, {g.beams} beams, length_penalty {g.length_penalty}, "
                if g.beams > 1
                else "greedy, "
            )
            + f"no_repeat_ngram_size {g.no_repeat_ngram_size}, "
            + (f"no_repeat_word_window {g.no_repeat_word_window}, " if g.no_repeat_word_window else "")
            + f"at most {generator.head.cfg.max_length - 1} tokens, KV cache (run's generation settings)"
        ),
        "samples": f"one frontal image ({', '.join(cfg['data']['views'])}) per study",
        "baselines.most_frequent": "the most frequent training report for every study",
        "baselines.retrieval": "the training report with the highest AdaMatch s_i2t + s_t2i for the image",
        "baselines.classifier_template": templates.CONVENTION,
        "report.repeated_sentences": "share of reports that say one sentence twice (sentences compared in "
        "lower case, whitespace and end punctuation aside)",
        "intervals": BOOTSTRAP_CONVENTION,
        "ce.*.f1_ci": CI_CONVENTION,
        "ce.*.f1_gap_<baseline>": "the report head's F1 minus the baseline's on the same studies; its _ci is "
        "paired (both F1s recomputed on each resample)",
        "ablations": "report runs under RUN/ablations/<name>/, decoded like the main run",
        **({"thresholds": CROSSFIT_CONVENTION} if on_threshold_split else {}),
    }
    record = metrics_record(
        metrics,
        split=split,
        num_samples=len(test),
        conventions=conventions,
        seed=cfg["train"]["seed"],
        config_hash=run_config_hash(run),
        missing=missing,
        extra={
            "run": str(run),
            "data": str(data),
            "ablations": sorted(ablations),
            "most_frequent_report": baselines["most_frequent"][0],
            **({"classifier_template": template_meta} if template_meta is not None else {}),
        },
    )
    if out is not None:
        out = Path(out)
        write_metrics(out, record)
        pred = predictions_path(out)
        with open(pred, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["study_id", "reference", "generated"])
            for sid, ref, gen in zip(test.index["study_id"], references, generated, strict=True):
                w.writerow([sid, ref, gen])
    return record


__all__ = [
    "classifier_template_baseline",
    "evaluate_report",
    "find_ablations",
    "most_frequent_report",
    "predictions_path",
    "repeated_sentence_share",
    "repeats_a_sentence",
    "retrieve_reports",
]

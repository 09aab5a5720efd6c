"""``medvl evaluate diffusion``: scans synthesized from test reports, scored (docs/design.md section 4).

* ``image.label_auroc`` (macro) and ``image.per_label.<name>.auroc``: the dataset's classifier
  (:mod:`medvl.eval.classifier`, trained on real training scans, selected on validation) run on scans
  synthesized from the test reports, scored against those reports' labels; beside it the same classifier on
  the real test scans (``image.real_label_auroc``, ``image.real_per_label.<name>.auroc``).
* ``image.laterality_accuracy``: for findings drawn on one side (from the phantom's regions of the report's
  study) *on the side the report states* (docs/design.md section 4: "one-sided findings drawn on the side the report states"; the
  phantom draws a finding whose report gives no side on a random side, and those are left out) and large enough
  to resolve (box's shorter side >= 10% of the image: 6 px at 64 px; granulomas,
  nodules, rib fractures and thin atelectasis bands fall below and are scored in ``..._all_sizes``), is the
  classifier's half-image logit for that finding higher on the side the report states?
  ``image.real_laterality_accuracy`` is the same measurement on the real test scans (it validates it);
  ``image.per_finding.<kind>.laterality_accuracy`` breaks it down.
* ``image.fid`` on ``image.fid_features`` (torchxrayvision's DenseNet if its weights are on local disk, else the
  classifier's penultimate features: not comparable with papers' Inception FIDs), MONAI's ``FIDMetric``.
* ``image.ms_ssim_diversity``: mean MONAI MS-SSIM between two samples (different seeds) of the same report
  (lower = more diverse); ``image.ms_ssim_real_pairs``: the same between random pairs of different real scans.
* ``baselines.unconditional.*``: the same label and laterality scores for guidance-0 samples (the null
  context ignores the report, so these sit near chance; they show the scores come from the report).
* ``baselines.autoencoder_reconstruction.*``: the same scores on autoencoder reconstructions of the real test
  scans: the ceiling the autoencoder's blur sets for any sampler.

A grid PNG of real scans beside scans synthesized from their reports is written next to ``out``.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medvl.errors import DataError
from medvl.eval.bootstrap import CONVENTION as BOOTSTRAP_CONVENTION
from medvl.eval.bootstrap import StudyResampler, binary_auroc
from medvl.eval.classifier import (
    RESOLVABLE_MIN_SIDE,
    ClassifierLike,
    fid_extractor,
    label_aurocs,
    laterality_accuracy,
    laterality_hits,
    laterality_pairs,
    load_split,
    positive_labels,
    predict,
    read_regions,
    resolve_classifier,
)
from medvl.eval.common import metrics_record, run_config_hash, write_metrics
from medvl.eval.grounding import CONVENTION as GROUNDING_CONVENTION
from medvl.eval.scan_scores import scan_scores
from medvl.eval.xrv import load_features, xrv_block
from medvl.inference.synthesize import Synthesizer
from medvl.models.diffusion import DiffusionBundle, load_scheduler_config, save_scheduler_config
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import extract_mentions
from medvl.text.layout import stated_sides

logger = logging.getLogger(__name__)

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def synthesize_reports(
    synth,
    reports: Sequence[str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    desc: str = "synthesize",
) -> np.ndarray:
    """(N, 1, S, S) float32 scans, report i drawn with noise seed ``seed + i``."""
    out = []
    for i in tqdm(range(0, len(reports), batch_size), desc=desc, unit="batch", leave=False):
        out.append(
            synth.synthesize(
                list(reports[i : i + batch_size]),
                steps=steps,
                guidance=guidance,
                seed=seed + i,
                sampler=sampler,
                batch_size=batch_size,
            ).numpy()
        )
    return np.concatenate(out)


def ms_ssim_weights(size: int, kernel_size: int = 11) -> tuple[float, ...]:
    """MONAI's five MS-SSIM scale weights, cut to the scales a ``size`` px image allows, renormalised."""
    for n in range(len(MS_SSIM_WEIGHTS), 1, -1):
        if size // max(1, (n - 1)) ** 2 > kernel_size - 1:
            w = np.asarray(MS_SSIM_WEIGHTS[:n])
            return tuple((w / w.sum()).tolist())
    raise DataError(f"images of {size} px are too small for MS-SSIM with an {kernel_size}-px kernel")


def mean_ms_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Mean MS-SSIM (MONAI) over pairs a[i], b[i], each (N, 1, S, S) in [-1024, 1024]; also the scale count."""
    from monai.metrics import MultiScaleSSIMMetric

    weights = ms_ssim_weights(a.shape[-1])
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=2048.0, kernel_size=11, weights=weights)
    values = metric(torch.from_numpy(a).float() + 1024, torch.from_numpy(b).float() + 1024)
    return float(values.mean()), len(weights)


@torch.no_grad()
def reconstruct(autoencoder, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, 1, S, S) real scans -> autoencoder reconstructions from the posterior means, same shape."""
    out = []
    for i in range(0, len(images), batch_size):
        mu, _ = autoencoder.encode(torch.from_numpy(images[i : i + batch_size]))
        out.append(autoencoder.decode(mu * autoencoder.latent.scale_factor).cpu().numpy())
    return np.concatenate(out)


def fid(extractor, real: np.ndarray, fake: np.ndarray, batch_size: int = 64) -> float:
    from monai.metrics import FIDMetric

    device = next(extractor.parameters()).device

    @torch.no_grad()
    def feats(x: np.ndarray) -> torch.Tensor:
        return torch.cat(
            [
                extractor.features(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu()
                for i in range(0, len(x), batch_size)
            ]
        )

    return float(FIDMetric()(feats(fake), feats(real)))


def auroc_intervals(probs: np.ndarray, labels: np.ndarray, boot: StudyResampler) -> dict[str, list | None]:
    """Bootstrap intervals of each label's AUROC (labels with both classes in the full set) and of their macro
    mean (over the labels defined in each resample), one pass over the resamples; keys ``macro`` and names."""
    y = positive_labels(labels).astype(bool)
    cols = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    per: dict[int, list[float]] = {k: [] for k in cols}
    macro: list[float] = []
    for idx in boot.indices():
        vals = []
        for k in cols:
            a = binary_auroc(probs[idx, k], y[idx, k])
            if a is not None:
                per[k].append(a)
                vals.append(a)
        if vals:
            macro.append(float(np.mean(vals)))

    def ci(values: list[float]) -> list[float] | None:
        if len(values) < boot.resamples / 2:
            return None
        return [float(v) for v in np.percentile(values, [2.5, 97.5])]

    out: dict[str, list | None] = {"macro": ci(macro)}
    out.update({CHEXPERT_LABELS[k]: ci(per[k]) for k in cols})
    return out


def score_scans(
    classifier,
    images: np.ndarray,
    labels: np.ndarray,
    pairs,
    prefix: str,
    all_pairs=None,
    studies: Sequence[str] | None = None,
) -> dict[str, float]:
    """``{prefix}label_auroc``, ``{prefix}per_label.<name>.auroc``, ``{prefix}laterality_accuracy`` (resolvable
    findings), ``{prefix}laterality_accuracy_all_sizes`` and per finding kind (``per_finding.<kind>``); with
    ``studies`` (one per scan) bootstrap intervals ``<key>_ci`` of the label AUROCs and the laterality."""
    probs, sides, _ = predict(classifier, images)
    aucs = label_aurocs(probs, labels)
    real = prefix.endswith("real_")
    per = "real_per_label" if real else "per_label"
    per_finding = "real_per_finding" if real else "per_finding"
    base = prefix[: -len("real_")] if real else prefix
    out = {
        f"{prefix}label_auroc": float(np.mean(list(aucs.values()))) if aucs else float("nan"),
        f"{prefix}laterality_accuracy": laterality_accuracy(sides, pairs),
    }
    out.update({f"{base}{per}.{name}.auroc": v for name, v in aucs.items()})
    if studies is not None:
        cis = auroc_intervals(probs, labels, StudyResampler(studies))
        out[f"{prefix}label_auroc_ci"] = cis.pop("macro")
        out.update({f"{base}{per}.{name}.auroc_ci": v for name, v in cis.items() if name in aucs})
        if pairs:
            hits = laterality_hits(sides, pairs).astype(np.float64)
            pair_boot = StudyResampler([studies[i] for i, _, _ in pairs])
            out[f"{prefix}laterality_accuracy_ci"] = pair_boot.mean_interval(hits)
    if all_pairs is not None:
        out[f"{prefix}laterality_accuracy_all_sizes"] = laterality_accuracy(sides, all_pairs)
        for j, kind in enumerate(classifier.side_findings):
            kind_pairs = [p for p in pairs if p[1] == j]
            if kind_pairs:
                out[f"{base}{per_finding}.{kind}.laterality_accuracy"] = laterality_accuracy(
                    sides, kind_pairs
                )
    return out


def _grid_rows(labels: np.ndarray, reports: Sequence[str], n: int) -> list[int]:
    """Up to ``n`` test studies for the figure: first one per positive label, then normal ones."""
    chosen: list[int] = []
    for k, _name in enumerate(CHEXPERT_LABELS):
        for i in np.flatnonzero(labels[:, k] == 1):
            if i not in chosen and reports[i].strip():
                chosen.append(int(i))
                break
        if len(chosen) >= n:
            break
    for i in range(len(reports)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen[:n]


def write_grid(
    path: str | Path,
    real: np.ndarray,
    fake: np.ndarray,
    reports: Sequence[str],
    rows: Sequence[int],
    title: str = "",
) -> Path:
    """A PNG: each column pair is a real test scan and the scan synthesized from its report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = 4  # two studies per figure row
    per_row = cols // 2
    nrows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 2.6, nrows * 3.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(rows):
        r, c = divmod(k, per_row)
        text = "\n".join(textwrap.wrap(" ".join(reports[i].split())[:150], 38)[:4])
        for j, (img, label) in enumerate(((real[i], "real"), (fake[i], "synthesized"))):
            ax = axes[r, 2 * c + j]
            ax.imshow(img[0], cmap="gray", vmin=-1024, vmax=1024)
            ax.set_title(label, fontsize=8)
        axes[r, 2 * c].text(
            0.0, -0.02, text, transform=axes[r, 2 * c].transAxes, fontsize=6, va="top", ha="left"
        )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class ScoringSplit:
    """The scans of one split that can be scored: each has a non-empty report (whitespace collapsed).
    images (N, 1, S, S), labels (N, 14); pairs / all_pairs: laterality pairs (resolvable / every size)."""

    images: np.ndarray
    labels: np.ndarray
    reports: list[str]
    pairs: list
    all_pairs: list
    studies: list[str] | None = None  # one per scan, for the bootstrap intervals
    dicom_ids: list[str] | None = None  # one per scan


def report_stated_sides(reports: Sequence[str]) -> list[set[tuple[str, str]]]:
    """Per report, the ``(finding, patient side)`` pairs it states (:func:`medvl.text.layout.stated_sides` of
    medvl's labeler's reading; the phantom drew from the same reading)."""
    return [stated_sides(extract_mentions(r)) for r in reports]


def _scoring_inputs(
    run: Path, data: Path, split: str, max_reports: int, device: str | None, classifier: ClassifierLike
):
    """The diffusion run, the evaluation classifier (loaded onto the run's device when given as a directory), its
    training report, and the split's scorable scans: what :func:`evaluate_diffusion` and :func:`tune_guidance`
    both score against."""
    synth = Synthesizer.load(run, device=device)
    classifier, creport = resolve_classifier(classifier, device=synth.device)
    arrays = load_split(data, split, synth.image_size, limit=max_reports)
    reports = [" ".join(r.split()) for r in arrays.reports]
    keep = [i for i, r in enumerate(reports) if r]
    if len(keep) < len(reports):
        logger.warning("%d %s scans have an empty report and are skipped", len(reports) - len(keep), split)
    dicom_ids = [arrays.dicom_ids[i] for i in keep]
    regions = read_regions(data)
    kept = [reports[i] for i in keep]
    stated = report_stated_sides(kept) if regions is not None else None
    split_in = ScoringSplit(
        images=arrays.images[keep],
        labels=arrays.labels[keep],
        reports=kept,
        pairs=laterality_pairs(
            regions, dicom_ids, classifier.side_findings, min_side=RESOLVABLE_MIN_SIDE, stated=stated
        ),
        all_pairs=laterality_pairs(regions, dicom_ids, classifier.side_findings, stated=stated),
        studies=[arrays.study_ids[i] for i in keep] if arrays.study_ids else None,
        dicom_ids=dicom_ids,
    )
    return synth, classifier, creport, split_in


def evaluate_diffusion(
    *,
    run: Path,
    data: Path,
    split: str = "test",
    out: Path | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    max_reports: int = 0,
    diversity_reports: int = 32,
    seed: int = 0,
    unconditional_baseline: bool = True,
    grid_studies: int = 8,
    device: str | None = None,
    classifier: ClassifierLike,
    features: str | None = None,
    grounding: bool = False,
) -> dict:
    """Score the diffusion run ``run`` on ``split`` of ``data`` with the dataset's evaluation ``classifier`` (see
    :mod:`medvl.eval.classifier`); write the metrics to ``out`` (and a grid PNG). ``features="xrv:PATH"`` adds
    ``image.xrv.*`` (FID and label AUROC on a local torchxrayvision DenseNet, :mod:`medvl.eval.xrv`);
    ``grounding`` adds ``grounding.localization.*``, the pointing game of the head's cross-attention on the real
    scans (:mod:`medvl.eval.grounding`), when the dataset has region boxes."""
    run, data = Path(run), Path(data)
    synth, classifier, creport, split_in = _scoring_inputs(run, data, split, max_reports, device, classifier)
    xrv_model = load_features(features, synth.device) if features else None  # a missing file fails here
    images, labels, reports = split_in.images, split_in.labels, split_in.reports
    pairs, all_pairs = split_in.pairs, split_in.all_pairs

    steps = int(steps or synth.sampler.steps)
    guidance = float(synth.sampler.guidance if guidance is None else guidance)
    sampler = str(sampler or synth.sampler.name.value)
    fake = synthesize_reports(synth, reports, steps=steps, guidance=guidance, sampler=sampler, seed=seed)

    metrics: dict[str, float | str] = {}
    studies = split_in.studies
    metrics.update(score_scans(classifier, fake, labels, pairs, "image.", all_pairs, studies))
    metrics.update(score_scans(classifier, images, labels, pairs, "image.real_", all_pairs, studies))
    extractor = fid_extractor(classifier)
    metrics["image.fid"] = fid(extractor, images, fake)
    # The floor of FID on this data: real validation scans against the real test scans (no synthesis at all).
    floor_missing = None
    if split == "validate":
        floor_missing = "evaluated on the validation split itself"
    else:
        try:
            other = load_split(data, "validate", synth.image_size, limit=max_reports)
            metrics["image.fid_real_floor"] = fid(extractor, other.images, images)
        except DataError as exc:
            floor_missing = str(exc)
    xrv_metrics, xrv_notes = xrv_block(xrv_model, images, fake, labels) if xrv_model else ({}, {})
    metrics.update(xrv_metrics)
    metrics["image.fid_features"] = (
        extractor.name
        if extractor is not classifier
        else f"medvl-classifier (penultimate, {classifier.feature_dim}-d, trained on {data.name} train split)"
    )
    nd = min(diversity_reports, len(reports))
    if nd >= 2:
        second = synthesize_reports(
            synth,
            reports[:nd],
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seed=seed + 100_003,
            desc="diversity",
        )
        metrics["image.ms_ssim_diversity"], scales = mean_ms_ssim(fake[:nd], second)
        g = np.random.default_rng(seed)
        a, b = g.choice(len(images), nd), g.choice(len(images), nd)
        b = np.where(a == b, (b + 1) % len(images), b)
        metrics["image.ms_ssim_real_pairs"], _ = mean_ms_ssim(images[a], images[b])
    else:
        scales = 0
    metrics["image.laterality_pairs"] = len(pairs)
    metrics["image.laterality_pairs_all_sizes"] = len(all_pairs)
    # The ceiling the autoencoder sets: the classifier on autoencoder reconstructions of the real test scans.
    recon = reconstruct(synth.autoencoder, images)
    for k, v in score_scans(classifier, recon, labels, pairs, "image.", all_pairs).items():
        metrics[f"baselines.autoencoder_reconstruction.{k}"] = v
    # What the autoencoder alone costs: FID of its reconstructions of the real test scans (a sample cannot get below
    # it by much; blur beyond it comes from the diffusion head).
    metrics["baselines.autoencoder_reconstruction.image.fid"] = fid(extractor, images, recon)
    if unconditional_baseline:
        uncond = synthesize_reports(
            synth,
            reports,
            steps=steps,
            guidance=0.0,
            sampler=sampler,
            seed=seed,
            desc="unconditional baseline",
        )
        for k, v in score_scans(classifier, uncond, labels, pairs, "image.", all_pairs).items():
            metrics[f"baselines.unconditional.{k}"] = v

    grounding_note = {}
    if grounding:
        metrics.update(_grounding_metrics(synth, data, split_in, seed))
        grounding_note = {"grounding": GROUNDING_CONVENTION}
    conventions = {
        "image.label_auroc": "macro ROC AUC over CheXpert labels with both classes among the test reports; "
        "positive = label 1 (0, -1 and blank negative); classifier trained on real train "
        "scans, selected on validation",
        "image.laterality_accuracy": "pairs (scan, finding drawn on one side, the side its report states, box's "
        f"shorter side >= {RESOLVABLE_MIN_SIDE:g} of the image; a side the phantom "
        "drew at random for a sideless mention is left out); correct when the "
        "classifier's "
        "half-image logit of that finding is higher on the stated side "
        "(patient left = image right); _all_sizes: the same without the size limit",
        "image.fid": "Frechet distance (MONAI FIDMetric) between real test scans and scans synthesized from "
        "their reports, on image.fid_features",
        "image.fid_real_floor": "the same distance between the real validation scans and the real test scans: "
        "what two samples of real scans already differ by",
        "baselines.autoencoder_reconstruction.image.fid": "the same distance between the real test scans and the "
        "autoencoder's reconstructions of them: the blur the latent space alone adds",
        "intervals": BOOTSTRAP_CONVENTION,
        "image.ms_ssim_diversity": f"mean MS-SSIM (MONAI, {scales} scales, 11-px Gaussian kernel) between two "
        "seeds of the same report; lower = more diverse",
        "sampling": f"{sampler}, {steps} steps, guidance {guidance:g}, seeds {seed}+i",
        **xrv_notes,
        **grounding_note,
    }
    hinted = bool(synth.denoiser.unet_cfg.side_maps)
    extra = {
        "run": str(run),
        "data": str(data),
        # A hinted head draws where medvl's labeler reads the report to put findings: on IU-Phantom the same
        # reading drew the scans, so its laterality is not the words' alone (the demo trains a text-only head).
        "layout_hint": f"labeler-derived ({synth.encoder.cfg.layout})" if hinted else "none (text only)",
        "classifier": {
            "val_macro_auroc": creport.val_macro_auroc,
            "val_laterality_accuracy": creport.val_laterality_accuracy,
            "side_findings": creport.side_findings,
            "side_convention_agreement": creport.side_convention_agreement,
        },
        # per-label ROC curves (medvl report) and study-by-study comparisons of runs (benchmarks/paired_runs.py)
        "scan_scores": scan_scores(classifier, images, fake, labels, studies, pairs),
    }
    missing = {}
    if not pairs:
        missing["image.laterality_accuracy"] = "no one-sided findings with regions in this split"
    if floor_missing:
        missing["image.fid_real_floor"] = floor_missing
    record = metrics_record(
        metrics,
        split=split,
        num_samples=len(reports),
        conventions=conventions,
        seed=seed,
        config_hash=run_config_hash(run),
        missing=missing,
        extra=extra,
    )
    if out is not None:
        write_metrics(out, record)
        rows = _grid_rows(labels, reports, grid_studies)
        write_grid(
            Path(out).with_suffix(".grid.png"),
            images,
            fake,
            reports,
            rows,
            title=f"real (left) vs synthesized from its report (right) - {run.name}, {sampler} {steps} "
            f"steps, guidance {guidance:g}",
        )
    return record


def _grounding_metrics(synth, data: Path, split_in: ScoringSplit, seed: int) -> dict[str, float]:
    """``grounding.localization.*`` of :mod:`medvl.eval.grounding` on the scored scans, with intervals."""
    from medvl.eval.alignment import localization_metrics
    from medvl.eval.grounding import grounding_records

    regions = read_regions(data)
    if regions is None or not len(regions):
        raise DataError(
            f"{data} has no region boxes (regions.csv): --grounding needs them (IU-Phantom has them)"
        )
    items = [
        {"image": torch.from_numpy(split_in.images[i]), "report": split_in.reports[i], "dicom_id": d}
        for i, d in enumerate(split_in.dicom_ids or [])
    ]
    records, _ = grounding_records(synth, items, regions, seed=seed)
    studies = dict(zip(split_in.dicom_ids or [], split_in.studies or split_in.dicom_ids or [], strict=True))
    return {
        f"grounding.localization.{k}": v for k, v in localization_metrics(records, studies=studies).items()
    }


def tune_guidance(
    *,
    run: Path,
    data: Path,
    values: Sequence[float] = (2.0, 3.0, 4.0, 6.0),
    max_reports: int = 0,
    seed: int = 0,
    write: bool = True,
    device: str | None = None,
    classifier: ClassifierLike,
) -> dict[float, dict[str, float]]:
    """Pick the run's default guidance on the *validation* split (never test): the value with the best mean of
    ``image.label_auroc`` and ``image.laterality_accuracy``; with ``write`` it becomes the run's default in
    ``diffusion/scheduler_config.json``. Returns the validation scores per value."""
    run, data = Path(run), Path(data)
    synth, classifier, _, val = _scoring_inputs(run, data, "validate", max_reports, device, classifier)
    scores: dict[float, dict[str, float]] = {}
    for g in values:
        fake = synthesize_reports(synth, val.reports, guidance=g, seed=seed, desc=f"guidance {g:g}")
        scores[float(g)] = score_scans(classifier, fake, val.labels, val.pairs, "image.")
        logger.info("guidance %g: %s", g, scores[float(g)])

    def objective(m: dict[str, float]) -> float:
        lat = m["image.laterality_accuracy"]
        return (m["image.label_auroc"] + (lat if np.isfinite(lat) else 0.5)) / 2

    best = max(scores, key=lambda g: objective(scores[g]))
    if write:
        noise, sampler = load_scheduler_config(run / DiffusionBundle.DIRNAME)
        sampler.guidance = best
        save_scheduler_config(run / DiffusionBundle.DIRNAME, noise, sampler)
    return scores

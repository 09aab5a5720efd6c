"""AdaMatch evaluation: retrieval both ways and, where ground-truth regions exist (IU-Phantom), the
pointing game and box IoU of each finding word (docs/design.md section 4).

Conventions (also written into every metrics file):

* **Retrieval**: image-to-report ranks the split's reports by the image-to-report score ``s_i2t``;
  report-to-image ranks the split's images by the report-to-image score ``s_t2i``. A retrieved item
  counts as correct when its report text equals the query's (case and whitespace normalised): many
  reports are identical ("No acute cardiopulmonary abnormality."), and ranking one copy above
  another is not an error.
* **Pointing game**: for each (image, region) pair of the split, the region's ``word`` (the labeler's
  head noun at the positive mention: "effusion", "cardiomegaly") is looked up among the words of that
  image's report (plural forms match; an affirmed occurrence is preferred, a negated one is used only
  when no affirmed one exists; pairs whose word is absent are skipped and counted). The patch with the
  highest cosine to that word is the model's pointer; a hit when its centre lies in the region's box
  widened by 5% of the image size on each side. ``box_iou`` is the IoU of that patch's box with the
  region's (unwidened) box. ``pointing_game_chance`` is the expected hit rate of a patch drawn
  uniformly from the model's own patches of that image (exact expectation, no sampling).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medvl.config import config_hash
from medvl.data.prepared import PreparedDataset
from medvl.devices import resolve_device
from medvl.errors import DataError
from medvl.eval.bootstrap import CONVENTION as BOOTSTRAP_CONVENTION
from medvl.eval.bootstrap import StudyResampler
from medvl.eval.common import metrics_record, write_metrics
from medvl.eval.priors import CONVENTIONS as PRIOR_CONVENTIONS
from medvl.eval.priors import WIDEN, LayoutPrior, PriorRecord, score_priors
from medvl.models.adamatch import AdaMatch, AdaMatchRun, contrastive_loss, token_scores
from medvl.text.tokenizer import ReportTokenizer

CONVENTIONS = {
    "retrieval": "i2t ranks the split's reports by s_i2t (mean over patches of best word), t2i ranks images by "
    "s_t2i (mean, idf-weighted when the model says so, over affirmed content words of best patch); "
    "a hit is any retrieved item whose report text equals the query's (case/whitespace normalised)",
    "pointing_game": "one record per (image, finding word): best patch (max cosine) for the word in the image's own "
    "report; hit if the patch centre lies in any of that word's region boxes in the image, each "
    "widened by 5% of the image size on each side",
    "pointing_game_chance": "expected hit rate of a patch drawn uniformly from the model's own patches of the image",
    "box_iou": "IoU of the best patch's box with the closest (highest-IoU) of the word's unwidened region boxes",
    "words": "region word matched to report words case-insensitively, plurals included (a multi-word region "
    "word by its last word); affirmed occurrence preferred; regions without a word are skipped",
    **PRIOR_CONVENTIONS,
    "intervals": BOOTSTRAP_CONVENTION,
}


def normalise_report(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().lower())


def word_variants(word: str) -> set[str]:
    w = word.strip().lower()
    out = {w, w + "s", w + "es"}
    if w.endswith("es"):
        out.add(w[:-2])
    if w.endswith("s"):
        out.add(w[:-1])
    return out


def region_groups(rows: Sequence, skipped: dict[str, int] | None = None) -> dict[str, list]:
    """One image's region rows (``word, x0, y0, x1, y1``) grouped by their finding word (a multi-word region word by
    its last word, lower case): a word drawn in several places (a bilateral effusion, three granulomas) is one
    pair. Rows without a word are left out (counted under ``skipped["region_without_word"]``)."""
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        word = str(r.word).strip().split()[-1] if str(r.word).strip() else ""
        if not word or word.lower() == "nan":
            if skipped is not None:
                skipped["region_without_word"] += 1
            continue
        groups[word.lower()].append(r)
    return groups


def word_positions(enc, b: int, word: str) -> tuple[list[int], bool] | None:
    """Token positions of ``word`` (plurals included) in report ``b`` of a tokenizer encoding, its affirmed
    occurrences when it has any (else every occurrence), and whether those are affirmed; None when the report does
    not say the word. An empty list: every occurrence fell past the tokenizer's cut."""
    variants = word_variants(word)
    occ = [(j, w.negated) for j, w in enumerate(enc.words[b]) if w.text.lower() in variants]
    if not occ:
        return None
    affirmed = [j for j, neg in occ if not neg]
    chosen = affirmed or [j for j, _ in occ]
    ids = enc.word_ids[b]
    return [int(torch.nonzero(ids == j)[0]) for j in chosen if bool((ids == j).any())], bool(affirmed)


@dataclass
class PointingRecord:
    dicom_id: str
    word: str
    hit: float
    chance: float
    iou: float
    negated_fallback: bool = False
    regions: int = 1  # boxes drawn for this word in this image


@dataclass
class SplitEncoding:
    """Normalised patch features (N, P, D), boxes (N, P, 4), compacted word features (N, W, D) with
    masks (N, W), the reports, and the pointing records of the split's regions."""

    patches: torch.Tensor
    boxes: torch.Tensor
    words: torch.Tensor
    word_mask: torch.Tensor
    match_mask: torch.Tensor
    reports: list[str]
    pointing: list[PointingRecord] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    word_weight: torch.Tensor | None = None  # (N, W) t2i word weights (None: plain mean)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    x0, y0 = max(float(a[0]), float(b[0])), max(float(a[1]), float(b[1]))
    x1, y1 = min(float(a[2]), float(b[2])), min(float(a[3]), float(b[3]))
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = (
        (float(a[2]) - float(a[0])) * (float(a[3]) - float(a[1]))
        + (float(b[2]) - float(b[0])) * (float(b[3]) - float(b[1]))
        - inter
    )
    return inter / area if area > 0 else 0.0


def _pad_to(t: torch.Tensor, w: int, value=0) -> torch.Tensor:
    if t.shape[1] == w:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, w - t.shape[1]]
    return F.pad(t, pad, value=value)


@torch.no_grad()
def encode_split(
    model: AdaMatch,
    tokenizer: ReportTokenizer,
    dataset,
    *,
    batch_size: int = 32,
    regions: pd.DataFrame | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SplitEncoding:
    """Encode every image and report of ``dataset`` (``PreparedDataset``-like) and play the pointing game on
    ``regions`` (``dicom_id, word, x0, y0, x1, y1``) as each batch passes."""
    was_training = model.training
    model.eval()
    by_image: dict[str, list] = defaultdict(list)
    if regions is not None and len(regions):
        for r in regions.itertuples(index=False):
            by_image[str(r.dicom_id)].append(r)
    feats, boxes, words, wmask, mmask, wweight, reports = [], [], [], [], [], [], []
    records: list[PointingRecord] = []
    skipped: dict[str, int] = defaultdict(int)
    for start in tqdm(range(0, len(dataset), batch_size), desc="encode", disable=not progress, leave=False):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([x["image"] for x in items]).to(device)
        texts = [x["report"] for x in items]
        enc = tokenizer.encode(texts)
        patches = model.encode_image(images)
        tok = model.encode_text(**{k: v.to(device) for k, v in enc.tensors().items()})
        pn = F.normalize(patches.features.float(), dim=-1)
        tn = F.normalize(tok.features.float(), dim=-1)
        sel, wm, mm, ww = model.select(tok)
        if ww is not None:
            wweight.append(ww.float().cpu())
        feats.append(pn.cpu())
        boxes.append(patches.boxes.float().cpu())
        words.append(sel.cpu())
        wmask.append(wm.cpu())
        mmask.append(mm.cpu())
        reports.extend(texts)
        for b, item in enumerate(items):
            # One record per (image, finding word): a word drawn in several places (a bilateral effusion,
            # three granulomas) is one pair, hit when the best patch lands in any of its boxes.
            for region_word, rows in region_groups(by_image.get(str(item["dicom_id"]), []), skipped).items():
                found = word_positions(enc, b, region_word)
                if found is None:
                    skipped["word_not_in_report"] += 1
                    continue
                pos, affirmed = found
                if not pos:
                    skipped["word_truncated"] += 1
                    continue
                sim = pn[b] @ tn[b, pos].t()  # (P, occurrences)
                p = int(sim.amax(1).argmax())
                c = patches.centres[b].float().cpu()
                best_box = patches.boxes[b, p].cpu()
                region_boxes = torch.tensor(
                    [[r.x0, r.y0, r.x1, r.y1] for r in rows], dtype=torch.float32
                )  # (R, 4)
                wide = region_boxes + torch.tensor([-WIDEN, -WIDEN, WIDEN, WIDEN])
                inside = (
                    (c[:, None, 0] >= wide[:, 0])
                    & (c[:, None, 0] <= wide[:, 2])
                    & (c[:, None, 1] >= wide[:, 1])
                    & (c[:, None, 1] <= wide[:, 3])
                ).any(1)  # (P,)
                iou = max(_iou(best_box, region) for region in region_boxes)
                records.append(
                    PointingRecord(
                        str(item["dicom_id"]),
                        region_word,
                        float(inside[p]),
                        float(inside.float().mean()),
                        iou,
                        negated_fallback=not affirmed,
                        regions=len(rows),
                    )
                )
    model.train(was_training)
    w = max(t.shape[1] for t in words)
    weight = torch.cat([_pad_to(t, w) for t in wweight]) if wweight else None
    return SplitEncoding(
        torch.cat(feats),
        torch.cat(boxes),
        torch.cat([_pad_to(t.float(), w) for t in words]),
        torch.cat([_pad_to(t, w, False) for t in wmask]),
        torch.cat([_pad_to(t, w, False) for t in mmask]),
        reports,
        records,
        dict(skipped),
        weight,
    )


def retrieval_metrics(
    enc: SplitEncoding, chunk: int = 16, logit_scale: float | None = None, hits: dict | None = None
) -> dict[str, float]:
    """R@1 / R@5 both ways (identical reports count as correct), plus the split's InfoNCE loss when
    ``logit_scale`` is given. ``hits``, when given, receives each query's hit (N,) per key."""
    s_i2t, s_t2i = token_scores(enc.patches, enc.words, enc.word_mask, enc.match_mask, chunk, enc.word_weight)
    keys = [normalise_report(t) for t in enc.reports]
    _, groups = np.unique(np.array(keys), return_inverse=True)
    g = torch.as_tensor(groups)
    same = g[:, None] == g[None, :]  # (N, N)
    out: dict[str, float] = {}
    n = len(keys)
    for k in (1, 5):
        kk = min(k, n)
        top_r = s_i2t.topk(kk, dim=1).indices  # reports for each image
        i2t = same.gather(1, top_r).any(1).float()
        out[f"i2t_r{k}"] = float(i2t.mean())
        top_i = s_t2i.t().topk(kk, dim=1).indices  # images for each report
        t2i = same.gather(1, top_i).any(1).float()
        out[f"t2i_r{k}"] = float(t2i.mean())
        if hits is not None:
            hits[f"i2t_r{k}"], hits[f"t2i_r{k}"] = i2t.numpy(), t2i.numpy()
    out["r1_mean"] = 0.5 * (out["i2t_r1"] + out["t2i_r1"])
    if logit_scale is not None:
        loss = 0.5 * (contrastive_loss(logit_scale * s_i2t, g) + contrastive_loss(logit_scale * s_t2i.t(), g))
        out["loss"] = float(loss)
    return out


def localization_metrics(
    records: list[PointingRecord],
    priors: list[PriorRecord] | None = None,
    studies: dict[str, str] | None = None,
) -> dict[str, float]:
    """Overall and per-finding ``pointing_game``, ``pointing_game_chance``, ``box_iou``, ``count``; with
    ``priors`` (one per record, same order) the no-pixel pointers' keys beside them (``..._prior``,
    ``..._centre``, the ``_unstated`` subset, the paired ``gap_prior``), and with ``studies`` (dicom_id ->
    study) bootstrap intervals ``<key>_ci`` of the headline keys."""
    if not records:
        return {}
    df = pd.DataFrame([r.__dict__ for r in records])
    if priors is not None:
        pf = pd.DataFrame([p.__dict__ for p in priors])
        if len(pf) != len(df) or not (pf.dicom_id.values == df.dicom_id.values).all():
            raise ValueError("prior records must pair with the model's records one to one")
        df = pd.concat([df, pf[["prior_hit", "prior_iou", "centre_hit", "unstated"]]], axis=1)
    out = {
        "pointing_game": float(df.hit.mean()),
        "pointing_game_chance": float(df.chance.mean()),
        "box_iou": float(df.iou.mean()),
        "count": int(len(df)),
    }
    columns = {"pointing_game": "hit", "box_iou": "iou"}
    if priors is not None:
        columns.update(
            pointing_game_prior="prior_hit", box_iou_prior="prior_iou", pointing_game_centre="centre_hit"
        )
        df["gap_hit"] = df.hit - df.prior_hit
        df["gap_iou"] = df.iou - df.prior_iou
        columns.update(pointing_game_gap_prior="gap_hit", box_iou_gap_prior="gap_iou")
        for key, col in columns.items():
            out[key] = float(df[col].mean())
        sub = df[df.unstated]
        out["count_unstated"] = int(len(sub))
        for key, col in columns.items():
            out[f"{key}_unstated"] = float(sub[col].mean()) if len(sub) else math.nan
    if studies is not None:
        study = df.dicom_id.map(lambda d: studies.get(str(d), str(d))).to_numpy()
        boot = StudyResampler(study)
        for key, col in columns.items():
            out[f"{key}_ci"] = boot.mean_interval(df[col].to_numpy())
        if priors is not None and df.unstated.any():
            sub = df[df.unstated]
            boot_u = StudyResampler(study[df.unstated.to_numpy()])
            for key, col in columns.items():
                out[f"{key}_unstated_ci"] = boot_u.mean_interval(sub[col].to_numpy())
    for word, grp in df.groupby("word"):
        out[f"per_finding.{word}.pointing_game"] = float(grp.hit.mean())
        out[f"per_finding.{word}.pointing_game_chance"] = float(grp.chance.mean())
        out[f"per_finding.{word}.box_iou"] = float(grp.iou.mean())
        out[f"per_finding.{word}.count"] = int(len(grp))
        if priors is not None:
            out[f"per_finding.{word}.pointing_game_prior"] = float(grp.prior_hit.mean())
            out[f"per_finding.{word}.box_iou_prior"] = float(grp.prior_iou.mean())
            out[f"per_finding.{word}.pointing_game_centre"] = float(grp.centre_hit.mean())
    return out


def evaluate_adamatch(
    *,
    run: Path,
    data: Path,
    split: str = "test",
    out: Path | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> dict:
    """Score an AdaMatch run on ``split`` of a prepared dataset; write the metrics file to ``out``. The model runs
    on ``device`` (None: CUDA when available, else the CPU)."""
    device = resolve_device(device)
    am = AdaMatchRun.from_pretrained(run, device=device)
    ds = PreparedDataset(data, split)
    if len(ds) == 0:
        raise DataError(f"split '{split}' of {data} has no images with reports")
    regions = ds.regions()
    enc = encode_split(
        am.model, am.tokenizer, ds, batch_size=batch_size, regions=regions, device=device, progress=True
    )
    metrics: dict[str, float] = {}
    missing: dict[str, str] = {}
    studies = dict(zip(ds.index["dicom_id"].astype(str), ds.index["study_id"].astype(str), strict=True))
    hits: dict[str, np.ndarray] = {}
    ret = retrieval_metrics(enc, am.model.cfg.chunk_size, hits=hits)
    boot = StudyResampler([studies[str(d)] for d in ds.index["dicom_id"]])
    for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        metrics[f"retrieval.{k}"] = ret[k]
        metrics[f"retrieval.{k}_ci"] = boot.mean_interval(hits[k])
    priors = None
    if regions is not None and enc.pointing:
        train = PreparedDataset(data, "train", require_report=False)
        train_regions = train.regions()
        if train_regions is not None and len(train_regions):
            prior = LayoutPrior.fit(
                train_regions,
                dict(zip(train.index["dicom_id"].astype(str), train.index["report"], strict=True)),
            )
            reports = dict(zip(ds.index["dicom_id"].astype(str), ds.index["report"], strict=True))
            priors = score_priors(prior, [(r.dicom_id, r.word) for r in enc.pointing], regions, reports)
        else:
            missing["localization.pointing_game_prior"] = "the training split has no region boxes"
    loc = localization_metrics(enc.pointing, priors, studies)
    if loc:
        for k, v in loc.items():
            metrics[f"localization.{k}"] = v
    else:
        reason = (
            "the dataset has no regions.csv (ground-truth boxes exist only for IU-Phantom)"
            if regions is None
            else "no region word of this split was found in its report"
        )
        for k in ("pointing_game", "pointing_game_chance", "box_iou"):
            metrics[f"localization.{k}"] = math.nan
            missing[f"localization.{k}"] = reason
    record = metrics_record(
        metrics,
        split=split,
        num_samples=len(ds),
        conventions=CONVENTIONS,
        seed=None,
        config_hash=config_hash(am.model.cfg),
        missing=missing,
        extra={
            "run": str(run),
            "data": str(data),
            "skipped_regions": enc.skipped,
            "negated_fallback_regions": int(sum(r.negated_fallback for r in enc.pointing)),
            "patch_mode": str(
                am.model.cfg.patches.mode.value
                if hasattr(am.model.cfg.patches.mode, "value")
                else am.model.cfg.patches.mode
            ),
        },
    )
    write_metrics(out, record)
    return record

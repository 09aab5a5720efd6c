"""Training the evaluation classifier (:mod:`medvl.eval.classifier`) on a prepared dataset's real scans.

The classifier keeps its own short recipe rather than the shared loop (:mod:`medvl.train.loop`),
because every ``image.*`` label and laterality score and the cyclic label AUROC are measured with
its weights, and the shared loop would train different ones: this recipe uses a one-cycle schedule
(which also cycles AdamW's beta1), draws each batch with replacement from one generator that the
shift augmentation shares, and lets dropout continue from the random stream that initialised the
weights; the loop uses warmup and cosine, epoch permutations, and reseeds each rank once the model
is built. It runs in one process; selection is on validation macro AUROC.

:func:`load_or_train_classifier` trains it once per dataset and config and caches it next to the data
(:func:`medvl.eval.classifier.classifier_cache_dir`); :func:`evaluation_classifier` gives the cached
directory, which ``medvl evaluate diffusion`` / ``cyclic`` hand to the evaluation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medvl.eval.classifier import (
    ClassifierConfig,
    ClassifierReport,
    XrayClassifier,
    classifier_cache_dir,
    is_trained_classifier,
    label_aurocs,
    laterality_accuracy,
    laterality_pairs,
    load_split,
    load_trained_classifier,
    one_sided_findings,
    positive_labels,
    predict,
    read_regions,
    side_convention_agreement,
    side_targets,
)

logger = logging.getLogger(__name__)


def _shift(x: torch.Tensor, max_shift: float, g: torch.Generator) -> torch.Tensor:
    """Random integer translation (replicate padding), no flips: left and right must stay put."""
    if max_shift <= 0:
        return x
    s = x.shape[-1]
    m = max(1, int(round(max_shift * s)))
    dx, dy = (torch.randint(-m, m + 1, (2,), generator=g)).tolist()
    x = F.pad(x, (m, m, m, m), mode="replicate")
    return x[..., m + dy : m + dy + s, m + dx : m + dx + s]


def train_classifier(
    data: str | Path, cfg: ClassifierConfig | None = None, device: str | torch.device | None = None
) -> tuple[XrayClassifier, ClassifierReport]:
    """Train on the training split's real scans; keep the weights with the best validation macro AUROC."""
    cfg = cfg or ClassifierConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = Path(data)
    regions = read_regions(data)
    train = load_split(data, "train", cfg.image_size, cfg.views)
    val = load_split(data, "validate", cfg.image_size, cfg.views)
    train_regions = regions[regions["dicom_id"].isin(set(train.dicom_ids))] if regions is not None else None
    findings = one_sided_findings(train_regions, cfg.min_side_regions)
    y = torch.from_numpy(positive_labels(train.labels))
    s = torch.from_numpy(side_targets(regions, train.dicom_ids, findings))
    val_pairs = laterality_pairs(regions, val.dicom_ids, findings)
    agreement = side_convention_agreement(train_regions)
    if math.isfinite(agreement) and agreement < 0.9:
        logger.warning(
            "only %.0f%% of one-sided regions lie in the image half the PA convention predicts; "
            "laterality numbers assume patient left = image right",
            100 * agreement,
        )

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = XrayClassifier(cfg, findings).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    images = torch.from_numpy(train.images)
    best: tuple[float, int, dict, dict[str, float], float] | None = None
    n = len(images)
    pbar = tqdm(range(1, cfg.steps + 1), desc="train classifier", unit="step", leave=False)
    for step in pbar:
        model.train()
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        x = _shift(images[idx], cfg.max_shift, g).to(device)
        logits, side = model(x)
        loss = F.binary_cross_entropy_with_logits(logits, y[idx].to(device))
        if findings:
            loss = loss + F.binary_cross_entropy_with_logits(side, s[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            probs, sides, _ = predict(model, val.images, device=device)
            aucs = label_aurocs(probs, val.labels)
            macro = float(np.mean(list(aucs.values()))) if aucs else float("nan")
            lat = laterality_accuracy(sides, val_pairs)
            pbar.set_postfix(val_auroc=f"{macro:.3f}", loss=f"{loss.item():.3f}")
            if best is None or (math.isfinite(macro) and macro > best[0]):
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best = (macro, step, state, aucs, lat)
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    report = ClassifierReport(
        val_macro_auroc=best[0],
        val_per_label_auroc=best[3],
        val_laterality_accuracy=best[4],
        best_step=best[1],
        side_findings=findings,
        train_images=n,
        side_convention_agreement=agreement,
    )
    return model, report


def load_or_train_classifier(
    data: str | Path, cfg: ClassifierConfig | None = None, device: str | torch.device | None = None
) -> tuple[XrayClassifier, ClassifierReport]:
    """The dataset's evaluation classifier: from the cache, or trained now and cached."""
    cfg = cfg or ClassifierConfig()
    directory = classifier_cache_dir(data, cfg)
    if is_trained_classifier(directory):
        return load_trained_classifier(directory, device=device or "cpu")
    logger.info("training the evaluation classifier on %s (cached in %s)", data, directory)
    model, report = train_classifier(data, cfg, device)
    model.save_pretrained(directory, meta={"report": asdict(report)})
    return model, report


def evaluation_classifier(
    data: str | Path, cfg: ClassifierConfig | None = None, device: str | torch.device | None = None
) -> Path:
    """The directory of the dataset's evaluation classifier for ``cfg`` (default config), trained on ``device``
    (the CUDA device when there is one) and cached first when it is not there yet."""
    cfg = cfg or ClassifierConfig()
    directory = classifier_cache_dir(data, cfg)
    if not is_trained_classifier(directory):
        load_or_train_classifier(data, cfg, device)
    return directory

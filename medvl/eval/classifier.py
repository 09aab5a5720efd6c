"""The chest X-ray classifier that scores synthesized scans (docs/design.md sections 4 and 8).

:class:`XrayClassifier` is a small CNN trained on the *real training scans* of a prepared dataset
(:mod:`medvl.train.classifier`):

* 14 CheXpert label logits (positive = 1; negative, uncertain and blank = 0: the phantom draws only positive
  findings), for ``image.label_auroc`` / ``image.real_label_auroc``;
* a *laterality head*: for each one-sided finding kind of ``regions.csv`` (effusion, opacity, nodule...), one
  logit per image half, from features pooled over that half only - "is this finding drawn in the image's left /
  right half". It backs ``image.laterality_accuracy`` and is validated on real test scans
  (``image.real_laterality_accuracy``);
* ``features(x)``: the penultimate (globally pooled) features, the FID extractor when torchxrayvision's DenseNet
  weights are not on local disk (:func:`fid_extractor`).

Selection is on validation macro AUROC; the trained model is cached next to the data
(``DATA/classifiers/<hash>/``, :func:`classifier_cache_dir`) so every evaluation of that dataset uses the same
one. Evaluations receive it from their caller (a saved directory or a loaded model, :data:`ClassifierLike`);
this module scores with it and never trains it.

:class:`XrvDenseNetFeatures` wraps torchxrayvision's DenseNet-121 with weights read from a local state-dict
file (``MEDVL_XRV_DENSENET_WEIGHTS``); nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medvl.data.prepared import INDEX_FILE, META_FILE, REGIONS_FILE, PreparedDataset
from medvl.errors import DataError, RunError
from medvl.models.pretrained import is_component, load_weights, read_config, save_weights, write_config
from medvl.text.chexpert import CHEXPERT_LABELS

XRV_WEIGHTS_ENV = "MEDVL_XRV_DENSENET_WEIGHTS"
HALVES = ("image_left", "image_right")  # image halves; a PA film shows the patient's left on the image right
PATIENT_SIDE_TO_HALF = {"left": 1, "right": 0}


@dataclass
class ClassifierConfig:
    image_size: int = 64
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    dropout: float = 0.1
    steps: int = 600
    batch_size: int = 48
    lr: float = 2e-3
    weight_decay: float = 1e-4
    eval_every: int = 100
    max_shift: float = 0.04  # random translation (fraction of the side) as augmentation; never flips
    min_side_regions: int = (
        10  # a finding kind joins the laterality head with this many one-sided train regions
    )
    views: list[str] = field(default_factory=lambda: ["PA", "AP"])
    seed: int = 0


class XrayClassifier(nn.Module):
    """x (B, 1, S, S) in [-1024, 1024] -> label logits (B, 14), side logits (B, F, 2); ``features`` (B, D)."""

    FORMAT: ClassVar[str] = "medvl.classifier"

    def __init__(self, cfg: ClassifierConfig, side_findings: Sequence[str] = ()):
        super().__init__()
        self.cfg = cfg
        self.side_findings = tuple(side_findings)
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.label_head = nn.Linear(c_in, len(CHEXPERT_LABELS))
        self.side_head = nn.Linear(c_in, max(1, len(self.side_findings)))

    @property
    def feature_dim(self) -> int:
        return self.label_head.in_features

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 1024.0
        s = self.cfg.image_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="area" if x.shape[-1] > s else "bilinear")
        return x

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [-1024, 1024] -> (B, D) globally average-pooled penultimate features."""
        return self.feature_map(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.feature_map(x)
        w = fmap.shape[-1]
        pooled = self.dropout(fmap.mean((2, 3)))
        halves = torch.stack([fmap[..., : w // 2].mean((2, 3)), fmap[..., w - w // 2 :].mean((2, 3))], 1)
        side = self.side_head(self.dropout(halves)).transpose(1, 2)  # (B, F, 2)
        return self.label_head(pooled), side

    @property
    def name(self) -> str:
        return "medvl-classifier"

    def save_pretrained(self, directory: str | Path, meta: dict | None = None) -> Path:
        """``config.json`` (format medvl.classifier: config, side findings, ``meta``) and ``model.safetensors``."""
        directory = Path(directory)
        save_weights(directory, self.state_dict())
        write_config(
            directory, self.FORMAT, asdict(self.cfg), side_findings=list(self.side_findings), **(meta or {})
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> XrayClassifier:
        from medvl.config import from_dict

        spec = read_config(directory, cls.FORMAT, what="trained classifier")
        model = cls(from_dict(ClassifierConfig, spec["config"]), spec["side_findings"])
        model.load_state_dict(load_weights(directory))
        return model.to(device).eval()


# ------------------------------------------------------------------------------------ targets


def positive_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, 14) CheXpert values (1 / 0 / -1 / NaN) -> (N, 14) float {0, 1}: only 1 is positive."""
    arr = np.asarray(labels, dtype=np.float32)
    return (arr == 1.0).astype(np.float32)


def side_targets(
    regions: pd.DataFrame | None, dicom_ids: Sequence[str], findings: Sequence[str]
) -> np.ndarray:
    """(N, F, 2) {0, 1}: finding kind f drawn in image half h (box centre left / right of the middle).

    Regions without a side (left / right / bilateral) are ignored; a bilateral finding counts on both halves.
    """
    out = np.zeros((len(dicom_ids), len(findings), 2), np.float32)
    if regions is None or not len(findings):
        return out
    row = {d: i for i, d in enumerate(dicom_ids)}
    col = {f: j for j, f in enumerate(findings)}
    for r in regions.itertuples(index=False):
        i, j = row.get(str(r.dicom_id)), col.get(str(r.finding))
        side = str(getattr(r, "side", "")).lower()
        if i is None or j is None or side not in ("left", "right", "bilateral"):
            continue
        cx = (float(r.x0) + float(r.x1)) / 2
        out[i, j, int(cx > 0.5)] = 1.0
    return out


def one_sided_findings(regions: pd.DataFrame | None, min_count: int) -> list[str]:
    """Finding kinds drawn on one named side at least ``min_count`` times (sorted)."""
    if regions is None or regions.empty or "side" not in regions:
        return []
    sided = regions[regions["side"].astype(str).str.lower().isin(["left", "right"])]
    counts = sided["finding"].astype(str).value_counts()
    return sorted(counts[counts >= min_count].index.tolist())


def side_convention_agreement(regions: pd.DataFrame | None) -> float:
    """Share of left / right regions whose box lies in the image half :data:`PATIENT_SIDE_TO_HALF` says
    (1.0 when the data follow the PA display convention; NaN without such regions)."""
    if regions is None or regions.empty:
        return float("nan")
    sided = regions[regions["side"].astype(str).str.lower().isin(list(PATIENT_SIDE_TO_HALF))]
    if sided.empty:
        return float("nan")
    half = ((sided["x0"].astype(float) + sided["x1"].astype(float)) / 2 > 0.5).astype(int)
    stated = sided["side"].astype(str).str.lower().map(PATIENT_SIDE_TO_HALF)
    return float((half.to_numpy() == stated.to_numpy()).mean())


#: Shorter box side (fraction of the image) from which a finding counts as resolvable for laterality: 6 px at
#: 64 px, one and a half of the demo autoencoder's 4-px latent cells. Granulomas, nodules, rib fractures and
#: plate-like atelectasis bands are smaller; their side is reported separately (``..._all_sizes``).
RESOLVABLE_MIN_SIDE = 0.1


def laterality_pairs(
    regions: pd.DataFrame | None,
    dicom_ids: Sequence[str],
    findings: Sequence[str],
    min_side: float = 0.0,
    stated: Sequence[set[tuple[str, str]]] | None = None,
) -> list[tuple[int, int, int]]:
    """(image index, finding index, drawn image half) for each finding drawn on exactly one side of an image
    whose largest box of that finding has a shorter side of at least ``min_side`` (fraction of the image).

    The drawn side is ``regions.csv``'s ``side`` (patient side), mapped to the image half a PA film shows it on
    (patient left -> image right). ``stated`` (one set per image, :func:`medvl.text.layout.stated_sides` of its
    report) keeps only the findings whose side the report states: the phantom draws a finding whose report gives
    no side on a random side, which no report-conditioned model can know. Without ``stated`` every drawn side
    counts (what the classifier's own validation uses: it reads images, not reports).
    """
    if regions is None or not len(findings):
        return []
    row = {d: i for i, d in enumerate(dicom_ids)}
    col = {f: j for j, f in enumerate(findings)}
    sides: dict[tuple[int, int], set[str]] = {}
    size: dict[tuple[int, int], float] = {}
    for r in regions.itertuples(index=False):
        i, j = row.get(str(r.dicom_id)), col.get(str(r.finding))
        if i is not None and j is not None:
            sides.setdefault((i, j), set()).add(str(r.side).lower())
            short = min(float(r.x1) - float(r.x0), float(r.y1) - float(r.y0))
            size[(i, j)] = max(size.get((i, j), 0.0), short)
    return sorted(
        (i, j, PATIENT_SIDE_TO_HALF[next(iter(s))])
        for (i, j), s in sides.items()
        if len(s) == 1
        and next(iter(s)) in PATIENT_SIDE_TO_HALF
        and size[(i, j)] >= min_side
        and (stated is None or (findings[j], next(iter(s))) in stated[i])
    )


# ------------------------------------------------------------------------------------- metrics


def label_aurocs(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-label ROC AUC (MONAI's ``compute_roc_auc``) for labels with both classes present."""
    from monai.metrics import compute_roc_auc

    y = positive_labels(labels)
    out: dict[str, float] = {}
    for k, name in enumerate(CHEXPERT_LABELS):
        col = y[:, k]
        if 0 < col.sum() < len(col):
            out[name] = float(compute_roc_auc(torch.from_numpy(scores[:, k]).float(), torch.from_numpy(col)))
    return out


def laterality_hits(side_logits: np.ndarray, pairs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Per pair ``(scan i, finding j, stated side h)``: is the finding's logit higher in the stated half? (bool)"""
    return np.array([side_logits[i, j, h] > side_logits[i, j, 1 - h] for i, j, h in pairs], dtype=bool)


def laterality_accuracy(side_logits: np.ndarray, pairs: Sequence[tuple[int, int, int]]) -> float:
    """Share of pairs whose finding logit is higher in the stated half than in the other; NaN without pairs."""
    if not pairs:
        return float("nan")
    return float(laterality_hits(side_logits, pairs).mean())


@torch.no_grad()
def predict(
    model: XrayClassifier,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 128,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images (N, 1, S, S) in [-1024, 1024] -> (label probabilities (N, 14), side logits (N, F, 2),
    features (N, D))."""
    model.eval()
    device = torch.device(device) if device else next(model.parameters()).device
    probs, sides, feats = [], [], []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[i : i + batch_size], dtype=np.float32)).to(device)
        fmap = model.feature_map(x)
        logits, side = model(x)
        probs.append(torch.sigmoid(logits).cpu())
        sides.append(side.cpu())
        feats.append(fmap.mean((2, 3)).cpu())
    return torch.cat(probs).numpy(), torch.cat(sides).numpy(), torch.cat(feats).numpy()


# ------------------------------------------------------------------- the dataset's scans, the saved classifier


@dataclass
class SplitArrays:
    images: np.ndarray  # (N, 1, s, s) float32 in [-1024, 1024], resized to the classifier's size
    labels: np.ndarray  # (N, 14) CheXpert values
    dicom_ids: list[str]
    reports: list[str]
    study_ids: list[str] = field(default_factory=list)


def load_split(
    data: str | Path, split: str, size: int, views: Sequence[str] = ("PA", "AP"), limit: int = 0
) -> SplitArrays:
    """Frontal scans of one split, resized to ``size`` (area), with labels, ids and reports."""
    ds = PreparedDataset(data, split).select(views=views, keep_blank_view=True, limit=limit)
    if not len(ds):
        raise DataError(f"{data} has no frontal {split} scans")
    out = np.empty((len(ds), 1, size, size), np.float32)
    for n in range(len(ds)):
        x = torch.from_numpy(ds.image(n))[None, None]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
        out[n] = x[0].numpy()
    return SplitArrays(
        images=out,
        labels=ds.labels.numpy(),
        dicom_ids=ds.index["dicom_id"].tolist(),
        reports=ds.index["report"].tolist(),
        study_ids=ds.index["study_id"].astype(str).tolist(),
    )


def read_regions(data: str | Path) -> pd.DataFrame | None:
    """All ground-truth finding boxes of a prepared dataset (``regions.csv``, every split), or None."""
    path = Path(data) / REGIONS_FILE
    return pd.read_csv(path, dtype={"dicom_id": str}, keep_default_na=False) if path.exists() else None


@dataclass
class ClassifierReport:
    """Validation numbers of the selected classifier."""

    val_macro_auroc: float
    val_per_label_auroc: dict[str, float]
    val_laterality_accuracy: float
    best_step: int
    side_findings: list[str]
    train_images: int
    side_convention_agreement: float  # stated side vs drawn half on training regions (1.0 expected)


def _cache_key(data: Path, cfg: ClassifierConfig) -> str:
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    for name in (META_FILE, INDEX_FILE, REGIONS_FILE):
        p = data / name
        if p.exists():
            h.update(name.encode())
            h.update(str(p.stat().st_size).encode())
            h.update(hashlib.sha256(p.read_bytes()[:1_000_000]).digest())
    return h.hexdigest()[:12]


def classifier_cache_dir(data: str | Path, cfg: ClassifierConfig) -> Path:
    """``DATA/classifiers/<hash of config and dataset>``; ``~/.cache/medvl/...`` when DATA is read-only."""
    data = Path(data)
    key = _cache_key(data, cfg)
    primary = data / "classifiers" / key
    if primary.exists() or os.access(data, os.W_OK):
        return primary
    digest = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "medvl" / "classifiers" / f"{digest}-{key}"


def is_trained_classifier(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved evaluation classifier."""
    return is_component(directory, XrayClassifier.FORMAT)


def load_trained_classifier(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[XrayClassifier, ClassifierReport]:
    """A saved evaluation classifier (in eval mode on ``device``) and its validation report."""
    model = XrayClassifier.from_pretrained(directory, device=device)
    spec = read_config(directory, XrayClassifier.FORMAT)
    return model, ClassifierReport(**spec["report"])


#: What an evaluation takes as its classifier: a saved classifier's directory, or one already loaded.
ClassifierLike = str | Path | tuple[XrayClassifier, ClassifierReport]


def resolve_classifier(
    classifier: ClassifierLike, device: str | torch.device = "cpu"
) -> tuple[XrayClassifier, ClassifierReport]:
    """``classifier`` loaded onto ``device`` when it is a directory; a loaded one as it is."""
    if isinstance(classifier, (str, Path)):
        return load_trained_classifier(classifier, device=device)
    model, report = classifier
    return model, report


# ---------------------------------------------------------------------------------- FID features


class XrvDenseNetFeatures(nn.Module):
    """torchxrayvision DenseNet-121 features (B, 1024) from a *local* state-dict file; never downloads.

    torchxrayvision's own cache holds pickled whole models; convert one once with
    ``torch.save(torch.load(PT, weights_only=False).state_dict(), OUT)`` (only for files you trust) and point
    ``MEDVL_XRV_DENSENET_WEIGHTS`` at OUT (``.pt`` state dict or ``.safetensors``).
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        import torchxrayvision as xrv

        weights = Path(weights)
        if not weights.is_file():
            raise RunError(f"torchxrayvision DenseNet weights {weights} do not exist")
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise RunError(
                    f"{weights} is not a plain state dict ({type(exc).__name__}); torchxrayvision's "
                    "cache holds pickled models: convert it to a state dict first (see "
                    "XrvDenseNetFeatures)"
                ) from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 18
        self.net = xrv.models.DenseNet(weights=None, num_classes=num_classes)
        state = {k: v for k, v in state.items() if k != "op_threshs"}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "op_threshs"]
        if missing or unexpected:
            raise RunError(
                f"{weights} does not fit torchxrayvision's DenseNet-121 (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        self.weights_name = weights.name
        self.eval()

    @property
    def name(self) -> str:
        return f"torchxrayvision-densenet121 ({self.weights_name})"

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [-1024, 1024] -> (B, 1024); resized to 224 px as the weights expect."""
        x = x.float()
        if x.shape[-1] != 224:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        return self.net.features2(x)


def fid_extractor(classifier: XrayClassifier, weights: str | Path | None = None) -> nn.Module:
    """torchxrayvision's DenseNet when its weights are on local disk (argument or ``MEDVL_XRV_DENSENET_WEIGHTS``),
    otherwise the dataset's own classifier. Its ``name`` goes into ``image.fid_features``."""
    weights = weights or os.environ.get(XRV_WEIGHTS_ENV)
    if weights:
        return XrvDenseNetFeatures(weights).to(next(classifier.parameters()).device)
    return classifier

"""The AdaMatch pretraining stage for the shared training loop (``medvl train adamatch``).

At build time the WordPiece tokenizer is trained on the training split's reports (or taken from
``model.text.pretrained``). Each batch is a dict of tensors that goes whole through
``AdaMatch.forward`` (DDP-safe). Validation scores retrieval R@1 and, on IU-Phantom, the pointing
game on the *validation* split; ``val_score`` (their mean) is the default selection metric. The
saved run holds the ``adamatch/`` component (:class:`~medvl.models.adamatch.AdaMatchRun`): weights
(safetensors), the resolved model config, the tokenizer, the keyword vocabulary and the keypatch bank mined
from the training split.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medvl.config import load_config
from medvl.data.prepared import PreparedDataset
from medvl.errors import ConfigError, DataError
from medvl.eval.alignment import encode_split, localization_metrics, normalise_report, retrieval_metrics
from medvl.models.adamatch import (
    AdaMatch,
    AdaMatchConfig,
    AdaMatchRun,
    MiningConfig,
    build_adamatch,
    build_keywords_and_bank,
)
from medvl.text.chexpert import NO_FINDING
from medvl.text.tokenizer import ReportTokenizer, load_hf_tokenizer, train_wordpiece
from medvl.train.batches import oversample_abnormal
from medvl.train.distributed import unwrap
from medvl.train.loop import TrainConfig
from medvl.train.stages.scans import check_image_size


@dataclass
class AugmentConfig:
    """Geometric and intensity jitter of training images. Never a horizontal flip: left/right matter."""

    enabled: bool = True
    shift: float = 0.04  # translation, fraction of the image side
    scale: float = 0.08  # zoom in [1 - scale, 1 + scale]
    rotate: float = 5.0  # degrees
    intensity: float = 0.1  # contrast and brightness jitter


@dataclass
class AdaMatchStageConfig:
    model: AdaMatchConfig = field(default_factory=AdaMatchConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(select_metric="val_score", select_mode="max")
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    keywords: MiningConfig = field(default_factory=MiningConfig)
    temperature_lr_scale: float = 10.0  # the temperature barely moves at the base lr (prototype)
    # Reports the labeler reads as normal ("No Finding") are not negatives of each other: on IU-Phantom
    # (about 70% normal) their images differ only in anatomy and noise, and even on real data a normal
    # scan fits any normal report. Identical report texts are always merged.
    merge_normal: bool = True
    # Each study with a finding appears this many times per epoch (1: plain epochs). Findings carry the
    # localisation signal; most IU reports are normal.
    oversample_abnormal: int = 1
    val_batch_size: int = 64
    max_val_images: int = 0  # 0: the whole validation split

    def validate(self) -> None:
        if self.temperature_lr_scale <= 0:
            raise ConfigError("temperature_lr_scale must be positive")
        if self.oversample_abnormal < 1:
            raise ConfigError("oversample_abnormal must be at least 1")


def report_groups(reports: list[str], labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) ids equal for identical (normalised) reports, and (with ``labels`` (B, 14)) for all reports
    labelled "No Finding": rows of one group are not negatives of each other."""
    ids = torch.tensor([zlib.crc32(normalise_report(r).encode()) for r in reports], dtype=torch.long)
    if labels is not None:
        ids = torch.where(labels[:, NO_FINDING] == 1.0, torch.full_like(ids, -1), ids)
    return ids


def augment_images(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Random affine (shift, zoom, small rotation) and intensity jitter, per image: (B, 1, S, S) -> same."""
    b = images.shape[0]
    angle = (torch.rand(b) * 2 - 1) * math.radians(cfg.rotate)
    zoom = 1 + (torch.rand(b) * 2 - 1) * cfg.scale
    shift = (torch.rand(b, 2) * 2 - 1) * cfg.shift * 2  # affine_grid units span 2 per image side
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Outside the image is air-dark background: pad with the minimum intensity.
    out = (
        F.grid_sample(images + 1024.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        - 1024.0
    )
    contrast = 1 + (torch.rand(b, 1, 1, 1) * 2 - 1) * cfg.intensity
    bright = (torch.rand(b, 1, 1, 1) * 2 - 1) * cfg.intensity * 1024.0
    return (out * contrast + bright).clamp(-1024.0, 1024.0)


class AdaMatchStage:
    """The :class:`medvl.train.loop.Stage` of AdaMatch pretraining."""

    name = "adamatch"

    def __init__(self, cfg: AdaMatchStageConfig, data: Path, tokenizer: ReportTokenizer):
        self.config = cfg
        self.train = cfg.train
        self.data = Path(data)
        self.tokenizer = tokenizer
        self.train_ds = PreparedDataset(self.data, "train")
        check_image_size(self.train_ds, cfg.model.image_size)
        self.val_ds = PreparedDataset(self.data, "validate").select(limit=cfg.max_val_images)
        if len(self.train_ds) == 0:
            raise DataError(f"{data} has no training images with reports")
        if len(self.val_ds) == 0:
            raise DataError(f"{data} has no validation images with reports (model selection needs them)")
        self.val_regions = self.val_ds.regions()

    # ---- the Stage protocol
    def build_model(self) -> nn.Module:
        return build_adamatch(self.config.model, self.tokenizer)

    def train_dataset(self) -> Dataset:
        return oversample_abnormal(self.train_ds, self.train_ds.labels, self.config.oversample_abnormal)

    def collate(self, items: list[dict]) -> dict[str, Any]:
        images = torch.stack([x["image"] for x in items]).float()
        s = self.config.model.image_size
        if images.shape[-1] != s or images.shape[-2] != s:
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        if self.config.augment.enabled:
            images = augment_images(images, self.config.augment)
        reports = [x["report"] for x in items]
        labels = torch.stack([x["labels"] for x in items]) if self.config.merge_normal else None
        enc = self.tokenizer.encode(reports)
        return {
            "images": images,
            **enc.tensors(),
            "word_key": enc.word_key,
            "groups": report_groups(reports, labels),
        }

    def training_step(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**batch)
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Decay on matrices; none on biases and norms; the temperature at ``temperature_lr_scale`` x lr."""
        decay, no_decay, temp = [], [], []
        for name, p in unwrap(model).named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("logit_scale"):
                temp.append(p)
            elif p.ndim >= 2:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [
            {"params": decay, "weight_decay": self.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if temp:
            groups.append(
                {"params": temp, "weight_decay": 0.0, "lr": self.train.lr * self.config.temperature_lr_scale}
            )
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        model = unwrap(model)
        device = next(model.parameters()).device
        enc = encode_split(
            model,
            self.tokenizer,
            self.val_ds,
            batch_size=self.config.val_batch_size,
            regions=self.val_regions,
            device=device,
        )
        scale = float(model.logit_scale.clamp(max=math.log(100.0)).exp())
        ret = retrieval_metrics(enc, model.cfg.chunk_size, logit_scale=scale)
        out = {f"val_{k}": v for k, v in ret.items()}
        loc = localization_metrics(enc.pointing)
        for k in ("pointing_game", "pointing_game_chance", "box_iou"):
            if k in loc:
                out[f"val_{k}"] = loc[k]
        out["val_score"] = 0.5 * (ret["r1_mean"] + loc["pointing_game"]) if loc else ret["r1_mean"]
        out["temperature"] = 1.0 / scale
        return out

    def log_images(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        """An explanation overlay of the first validation image, (3, H, W) in [0, 1]."""
        from medvl.inference.explain import render_explanation

        am = AdaMatchRun(unwrap(model), self.tokenizer, device=next(unwrap(model).parameters()).device)
        item = self.val_ds[0]
        patches = am.encode_images(item["image"][None])
        rgb = render_explanation(item["image"][0].numpy(), patches, 0, keywords=None, title=f"step {step}")
        unwrap(model).eval()
        return {"adaptive_patches": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0}

    def save_run(self, model: nn.Module, run_dir: Path) -> None:
        model = unwrap(model)
        assert isinstance(model, AdaMatch)
        device = next(model.parameters()).device
        keywords, bank = build_keywords_and_bank(
            model, self.tokenizer, self.train_ds, self.config.keywords, device=device
        )
        AdaMatchRun(model, self.tokenizer, keywords, bank, device=device).save_pretrained(
            Path(run_dir) / AdaMatchRun.DIRNAME
        )


def build_tokenizer(cfg: AdaMatchStageConfig, train_reports: list[str]) -> ReportTokenizer:
    text = cfg.model.text
    if text.pretrained:
        hf = load_hf_tokenizer(text.pretrained)
    else:
        hf = train_wordpiece(train_reports, vocab_size=text.vocab_size, min_frequency=text.min_frequency)
    tok = ReportTokenizer(hf, max_tokens=text.max_tokens, max_words=text.max_words)
    tok.fit_idf(train_reports)
    return tok


def build_stage(
    *,
    config_path: str | Path | None,
    overrides: list[str] | None,
    data: str | Path,
    from_runs: list[Path] | None = None,
) -> AdaMatchStage:
    """The AdaMatch stage from a YAML config (+ ``--set`` overrides) over a prepared dataset."""
    cfg = load_config(AdaMatchStageConfig, config_path, overrides)
    if from_runs:
        raise ConfigError("the adamatch stage builds on no earlier run; drop --from")
    train_reports = list(PreparedDataset(data, "train").index["report"])
    if not train_reports:
        raise DataError(f"{data} has no training reports to train the tokenizer on")
    return AdaMatchStage(cfg, Path(data), build_tokenizer(cfg, train_reports))

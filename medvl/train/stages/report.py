"""``medvl train report``: the report-generation head on a finished AdaMatch run.

``--from`` takes the AdaMatch run. The stage trains a word-level tokenizer on the training reports,
builds :class:`~medvl.models.report_head.ReportHead` (GPT-2 decoder, shared memory, keyword hints)
and teaches it with next-token cross-entropy. With AdaMatch frozen (``model.finetune_adamatch:
false``) and ``data.precompute_features: true``, AdaMatch's patch features and top-K keywords are
computed once per image before training (a few seconds on the phantom) instead of at every step.

Model selection is on a fixed validation subset (``data.val_samples`` studies) decoded greedily:
``val_loss`` (teacher-forced), ``val_bleu4`` and, when the labeler is available,
``val_ce_micro_f1`` / ``val_ce_micro5_f1`` (see :mod:`medvl.eval.clinical`).

Run directory (besides what the loop writes): ``report_head/`` (decoder, tokenizer, head weights and decoding
settings), ``memory/`` (the shared memory the diffusion stage reads) and ``adamatch/`` (a copy of the AdaMatch
component, so the report run works alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medvl.config import load_config
from medvl.data.prepared import PreparedDataset
from medvl.errors import ConfigError, DataError, RunError
from medvl.eval.crossfit import crossfit
from medvl.models import report_head as rh
from medvl.models.adamatch import AdaMatchRun
from medvl.models.memory import SharedMemory
from medvl.models.pretrained import copy_component
from medvl.models.report_bundle import ReportHeadBundle
from medvl.models.report_head import (
    GenerationSettings,
    KeywordHints,
    ReportHead,
    ReportHeadConfig,
)
from medvl.models.report_labels import fit_pooled_labels
from medvl.runs import find_from_run
from medvl.train.batches import oversample_abnormal
from medvl.train.distributed import stage_device, unwrap
from medvl.train.loop import TrainConfig, default_param_groups


@dataclass
class ReportDataConfig:
    """``data:`` section."""

    views: list[str] = field(default_factory=lambda: ["PA", "AP"])  # frontal views only
    one_image_per_study: bool = True  # the first frontal image of each study
    precompute_features: bool = True  # frozen AdaMatch only: encode every image once before training
    feature_batch_size: int = 32
    val_samples: int = 64  # validation studies decoded (greedy) for model selection
    # Each training study whose report states a finding (CheXpert "No Finding" not positive) is drawn this many
    # times per epoch: a short schedule otherwise learns the normal report first and writes it for every scan.
    oversample_abnormal: int = 1

    def validate(self) -> None:
        if not self.views:
            raise ConfigError("config key 'data.views' must list at least one view, e.g. [PA, AP]")
        if self.oversample_abnormal < 1:
            raise ConfigError(
                f"config key 'data.oversample_abnormal' must be at least 1, got {self.oversample_abnormal}"
            )
        if self.val_samples < 1:
            raise ConfigError(f"config key 'data.val_samples' must be at least 1, got {self.val_samples}")


@dataclass
class ReportStageConfig:
    model: ReportHeadConfig = field(default_factory=ReportHeadConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    data: ReportDataConfig = field(default_factory=ReportDataConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(select_metric="val_loss", select_mode="min")
    )


# ------------------------------------------------------------------------------------------------- data


def report_split(data: str | Path, split: str, cfg: ReportDataConfig) -> PreparedDataset:
    """A split of the prepared dataset restricted to ``cfg.views`` (and one image per study). A blank (unknown)
    view is left out: the report head trains on images known to be frontal."""
    ds = PreparedDataset(data, split).select(
        views=cfg.views, keep_blank_view=False, one_per_study=cfg.one_image_per_study
    )
    if len(ds) == 0:
        views = sorted({v.upper() for v in cfg.views})
        raise DataError(f"{data}: the '{split}' split has no reports with views {views}")
    return ds


@dataclass
class ImageConditions:
    """AdaMatch's view of a batch of images: ``patch_features`` (N, P, D), ``patch_boxes`` (N, P, 4),
    ``keywords`` (top-K hints, see :class:`KeywordHints`)."""

    patch_features: torch.Tensor
    patch_boxes: torch.Tensor
    keywords: KeywordHints


@torch.no_grad()
def image_conditions(
    adamatch_run: Any, images: torch.Tensor, *, num_keywords: int, keyword_vocabulary: list[str]
) -> ImageConditions:
    """images (B, 1, S, S) in [-1024, 1024] -> patch features, boxes and keyword hints (AdaMatch, no grad)."""
    patches = adamatch_run.encode_images(images)
    if keyword_vocabulary:
        keywords = adamatch_run.image_keywords(None, top_k=num_keywords, patches=patches)
    else:
        keywords = [[] for _ in range(images.shape[0])]
    hints = rh.keyword_hints(keywords, keyword_vocabulary, num_keywords)
    return ImageConditions(patches.features.float(), patches.boxes.float(), hints)


def precompute_conditions(
    adamatch_run: Any,
    dataset: Dataset,
    *,
    num_keywords: int,
    keyword_vocabulary: list[str],
    batch_size: int,
    device: torch.device,
    desc: str,
) -> ImageConditions:
    """Encode every image of ``dataset`` once: features stored as float16 on the CPU."""
    feats, boxes, ids, scores, kboxes, words = [], [], [], [], [], []
    n = len(dataset)
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(n, start + batch_size))]).to(
            device
        )
        c = image_conditions(
            adamatch_run, images, num_keywords=num_keywords, keyword_vocabulary=keyword_vocabulary
        )
        feats.append(c.patch_features.half().cpu())
        boxes.append(c.patch_boxes.cpu())
        ids.append(c.keywords.ids)
        scores.append(c.keywords.scores)
        kboxes.append(c.keywords.boxes)
        words.extend(c.keywords.words)
    return ImageConditions(
        torch.cat(feats),
        torch.cat(boxes),
        KeywordHints(torch.cat(ids), torch.cat(scores), torch.cat(kboxes), words),
    )


class ReportTrainingSet(Dataset):
    """Items ``{"report", "index", and either "image" or precomputed "patch_features", "patch_boxes",
    "keyword_ids", "keyword_scores", "keyword_boxes"}``."""

    def __init__(self, base: PreparedDataset, conditions: ImageConditions | None):
        self.base = base
        self.conditions = conditions

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.conditions is None:
            item = self.base[i]
            return {
                "image": item["image"],
                "report": item["report"],
                "index": i,
                "report_labels": item["labels"],
            }
        c = self.conditions
        return {
            "report": str(self.base.index.at[i, "report"]),
            "index": i,
            "report_labels": self.base.labels[i],
            "patch_features": c.patch_features[i],
            "patch_boxes": c.patch_boxes[i],
            "keyword_ids": c.keywords.ids[i],
            "keyword_scores": c.keywords.scores[i],
            "keyword_boxes": c.keywords.boxes[i],
        }


# ------------------------------------------------------------------------------------------------ stage


class ReportStage:
    """The report head as a :class:`~medvl.train.loop.Stage`."""

    name = "report"

    def __init__(self, config: ReportStageConfig, data: Path, adamatch_dir: Path):
        self.config = config
        self.train: TrainConfig = config.train
        self.data = Path(data)
        self.adamatch_dir = Path(adamatch_dir)
        self.device = stage_device()
        self.adamatch_run = AdaMatchRun.from_pretrained(self.adamatch_dir, device=self.device)
        vocab = getattr(self.adamatch_run, "keywords", None)
        self.keyword_vocabulary = list(vocab.words) if vocab is not None else []
        if config.model.use_keywords and not self.keyword_vocabulary:
            raise RunError(
                f"AdaMatch run {self.adamatch_dir} has no keyword vocabulary; "
                "train with model.use_keywords=false or retrain AdaMatch"
            )
        self.train_base = report_split(self.data, "train", config.data)
        self.val_base = report_split(self.data, "validate", config.data)
        self.image_size = self.train_base.size
        m = config.model
        self.tokenizer = rh.build_report_tokenizer(
            list(self.train_base.index["report"]),
            min_freq=m.tokenizer_min_freq,
            max_vocab=m.tokenizer_max_vocab,
        )
        self._precompute = config.data.precompute_features and not m.finetune_adamatch
        self._train_set: ReportTrainingSet | None = None
        self._val_conditions: ImageConditions | None = None
        n_val = min(config.data.val_samples, len(self.val_base))
        self._val_indices = list(range(n_val))

    # --- the loop's interface ---------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        m = self.config.model
        tok = self.tokenizer
        torch.manual_seed(self.train.seed)
        adamatch = self.adamatch_run.model
        if not m.finetune_adamatch:
            adamatch.requires_grad_(False).eval()
        # Only a fine-tuned AdaMatch is part of the trained module; a frozen one stays with the run.
        head = ReportHead(
            m,
            vocab_size=len(tok),
            visual_dim=int(self.adamatch_run.embed_dim),
            keyword_vocabulary=self.keyword_vocabulary,
            pad_id=tok.pad_token_id,
            bos_id=tok.bos_token_id,
            eos_id=tok.eos_token_id,
            unk_id=tok.unk_token_id,
            adamatch=adamatch if m.finetune_adamatch else None,
        )
        if m.label_fit_steps:
            if not self._precompute:
                raise ConfigError(
                    "model.label_fit_steps needs cached features: data.precompute_features=true and "
                    "model.finetune_adamatch=false"
                )
            self.train_dataset()  # encodes the training images once (kept for the loop)
            assert self._train_set is not None and self._train_set.conditions is not None
            features = self._train_set.conditions.patch_features
            fit_pooled_labels(head.label_head, features, self.train_base.labels, steps=m.label_fit_steps)
        return head

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: a fine-tuned AdaMatch learns at ``lr * model.adamatch_lr_scale``."""
        head = unwrap(model)
        wd = self.train.weight_decay
        if head.adamatch is None:
            return default_param_groups(head, wd)
        groups = []
        ada_ids = {id(p) for p in head.adamatch.parameters()}
        for g in default_param_groups(head, wd):
            own = [p for p in g["params"] if id(p) not in ada_ids]
            ada = [p for p in g["params"] if id(p) in ada_ids]
            if own:
                groups.append({**g, "params": own})
            if ada:
                groups.append({**g, "params": ada, "lr": self.train.lr * self.config.model.adamatch_lr_scale})
        return groups

    def train_dataset(self) -> Dataset:
        if self._train_set is None:
            conditions = None
            if self._precompute:
                conditions = self._conditions(
                    self.train_base, range(len(self.train_base)), "AdaMatch features (train)"
                )
            self._train_set = ReportTrainingSet(self.train_base, conditions)
        return oversample_abnormal(
            self._train_set, self.train_base.labels, self.config.data.oversample_abnormal
        )

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = rh.encode_reports(
            self.tokenizer, [it["report"] for it in items], self.config.model.max_length
        )
        keys = ("patch_features", "patch_boxes", "keyword_ids", "keyword_scores", "keyword_boxes")
        if "image" in items[0]:
            keys = ("image",)
        if self.config.model.label_loss_weight > 0:
            keys = (*keys, "report_labels")
        for k in keys:
            batch["images" if k == "image" else k] = torch.stack([it[k] for it in items])
        return batch

    def training_step(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = dict(batch)
        if "images" in inputs:  # features not precomputed: AdaMatch runs here
            m = self.config.model
            images = inputs["images"]
            with torch.no_grad():
                encoder = unwrap(model).adamatch if m.finetune_adamatch else self.adamatch_run.model
                patches = encoder.encode_image(images)
            if m.finetune_adamatch:
                pass  # the model encodes the images again, with gradients, inside forward
            else:
                del inputs["images"]
                inputs.update(patch_features=patches.features, patch_boxes=patches.boxes)
            if m.use_keywords:
                # the head's keyword vocabulary is the run's own (see __init__): hints built on the device
                top = self.adamatch_run.top_keywords(patches, m.num_keywords)
                hints = rh.device_keyword_hints(top, m.num_keywords).to(images.device)
                inputs.update(keyword_ids=hints.ids, keyword_scores=hints.scores, keyword_boxes=hints.boxes)
        out = model(**inputs)
        logs = {k: out[k].detach() for k in ("loss", "lm_loss", "label_loss") if k in out}
        logs["tokens"] = (batch["labels"][:, 1:] != -100).sum()
        return out["loss"], logs

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        head: ReportHead = unwrap(model)
        device = next(head.parameters()).device
        cond = self._validation_conditions()
        refs = [str(self.val_base.index.at[i, "report"]) for i in self._val_indices]
        bs = self.config.generation.batch_size
        n = len(refs)
        groups: list[tuple[np.ndarray, torch.Tensor | None]] = [(np.arange(n), None)]
        if head.cfg.label_states:
            # The label head's thresholds: F1-best on this (validation) split, saved with the head; the reports
            # scored here are written with thresholds cross-fitted on the other studies (medvl.eval.crossfit), so
            # that the score choosing the checkpoint has not seen its own labels.
            probs = torch.cat(
                [
                    head.predict_labels(
                        cond.patch_features[s : s + bs].float().to(device),
                        cond.patch_boxes[s : s + bs].to(device),
                    ).cpu()
                    for s in range(0, n, bs)
                ]
            )
            targets = (self.val_base.labels[self._val_indices] == 1).float()
            groups = crossfit(lambda rows: rh.f1_thresholds(probs[rows], targets[rows]), n)
        rules = rh.decoding_rules(self.tokenizer, self.config.generation)
        losses, weights, texts = [], [], [""] * n
        for rows, thresholds in groups:
            if thresholds is not None:
                head.label_thresholds.copy_(thresholds)
            for start in range(0, len(rows), bs):
                idx = torch.as_tensor(rows[start : start + bs])
                kw = KeywordHints(
                    cond.keywords.ids[idx],
                    cond.keywords.scores[idx],
                    cond.keywords.boxes[idx],
                    [cond.keywords.words[i] for i in idx.tolist()],
                ).to(device)
                feats, boxes = cond.patch_features[idx].float().to(device), cond.patch_boxes[idx].to(device)
                enc = {
                    k: v.to(device)
                    for k, v in rh.encode_reports(
                        self.tokenizer, [refs[i] for i in idx.tolist()], self.config.model.max_length
                    ).items()
                }
                out = head(
                    **enc,
                    patch_features=feats,
                    patch_boxes=boxes,
                    keyword_ids=kw.ids,
                    keyword_scores=kw.scores,
                    keyword_boxes=kw.boxes,
                )
                tokens = float((enc["labels"][:, 1:] != -100).sum())
                losses.append(float(out["lm_loss"]) * tokens)
                weights.append(tokens)
                dec = head.generate(
                    patch_features=feats,
                    patch_boxes=boxes,
                    keywords=kw,
                    num_beams=1,
                    no_repeat_ngram_size=self.config.generation.no_repeat_ngram_size,
                    logits_processor=rules,
                )
                decoded = rh.decode_sequences(self.tokenizer, dec.sequences, head.eos_id)[0]
                for i, text in zip(idx.tolist(), decoded, strict=True):
                    texts[i] = text
        if head.cfg.label_states:
            head.label_thresholds.copy_(rh.f1_thresholds(probs, targets))
        from medvl.eval.nlg import bleu4

        metrics = {
            "val_loss": sum(losses) / max(sum(weights), 1.0),
            "val_bleu4": bleu4(refs, texts),
            "val_empty_reports": float(np.mean([not t.strip() for t in texts])),
        }
        from medvl.eval.clinical import ce_metrics, label_reports

        ce = ce_metrics(label_reports(refs), label_reports(texts))
        metrics["val_ce_micro_f1"] = _finite(ce["ce.micro.f1"])
        metrics["val_ce_micro5_f1"] = _finite(ce["ce.micro5.f1"])
        return metrics

    def save_run(self, model: nn.Module, run_dir: Path) -> None:
        head: ReportHead = unwrap(model)
        run_dir = Path(run_dir)
        ReportHeadBundle(head, self.tokenizer, self.image_size, self.config.generation).save_pretrained(
            run_dir / ReportHeadBundle.DIRNAME
        )
        if head.cfg.use_memory:
            head.memory.save_pretrained(run_dir / SharedMemory.DIRNAME)
        if head.adamatch is not None:
            head.adamatch.eval()
        copy_component(self.adamatch_dir, run_dir / AdaMatchRun.DIRNAME)

    # --- helpers ---------------------------------------------------------------------------------------

    def _conditions(self, base: PreparedDataset, indices: Any, desc: str) -> ImageConditions:
        subset = torch.utils.data.Subset(base, list(indices))
        return precompute_conditions(
            self.adamatch_run,
            subset,
            num_keywords=self.config.model.num_keywords,
            keyword_vocabulary=self.keyword_vocabulary,
            batch_size=self.config.data.feature_batch_size,
            device=self.device,
            desc=desc,
        )

    def _validation_conditions(self) -> ImageConditions:
        # With a fine-tuned AdaMatch the features change during training: recompute at every validation.
        if self._val_conditions is None or not self._precompute:
            self._val_conditions = self._conditions(
                self.val_base, self._val_indices, "AdaMatch features (val)"
            )
        return self._val_conditions


def _finite(x: float) -> float:
    return 0.0 if not np.isfinite(x) else float(x)


def build_stage(
    *,
    config_path: str | Path | None,
    overrides: list[str] | None,
    data: str | Path,
    from_runs: list[Path] | None,
) -> ReportStage:
    """``medvl train report --config C --data D --from ADAMATCH_RUN [--set k=v]``."""
    config = load_config(ReportStageConfig, config_path, overrides)
    adamatch_dir = find_from_run(from_runs, "adamatch")
    return ReportStage(config, Path(data), adamatch_dir)

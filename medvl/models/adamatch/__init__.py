"""AdaMatch: adaptive patch-word matching between chest X-rays and reports.

Model
    ``AdaMatch.encode_image``: images (B, 1, S, S) in [-1024, 1024] -> :class:`ImagePatches`
    (adaptive patches: features (B, P, D) projected, not normalised; boxes (B, P, 4)).
    ``AdaMatch.encode_text``: pieces (B, T) -> :class:`TextTokens` (word-pooled features (B, T, D);
    ``word_mask`` marks each content word once, ``match_mask`` the affirmed ones).

Loss (official AdaMatch, vectorised)
    Token-wise symmetric InfoNCE with in-batch negatives. For image ``i`` and report ``j`` with
    L2-normalised patch features ``v_ip`` and word features ``t_jw``::

        s_i2t(i, j) = mean_p  max_{w in content words of j}  <v_ip, t_jw>
        s_t2i(i, j) = mean_{w in affirmed content words of j}  max_p  <v_ip, t_jw>

    Negated words ("effusion" in "no effusion") and stop words stay out of ``s_t2i``: the prototype
    showed them pulling toward lesions. ``loss = (CE(s_i2t / tau) + CE(s_t2i^T / tau)) / 2`` with a
    learnable temperature ``tau`` (from 0.07); reports with identical text share the target mass
    (they are not negatives of each other). The B x B x P x W similarity is computed in chunks of
    images; only arg-max indices are kept for backward. Optional global (CLIP) term.

Run API (what the report and diffusion heads use)
    ``AdaMatchRun.load(run_dir)`` -> ``.model``, ``.tokenizer``, ``.keywords``, ``.keypatch_bank``,
    ``.tokenize(texts)``, ``.image_keywords(images, top_k)``, ``.report_keypatches(texts, top_k)``,
    ``.embed_dim``. A run keeps these under ``RUN/adamatch/`` so later stages copy that folder.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import from_dict, to_dict
from medvl.errors import ConfigError, InvalidImageError, InvalidReportError, RunError
from medvl.models.adamatch.patches import AdaPatchConfig, AdaptivePatchLayer, PatchLayout, PatchMode, patch_stats
from medvl.models.adamatch.encoders import BackboneConfig, TextEncoder, TextEncoderConfig, build_backbone
from medvl.text.tokenizer import ReportTokenizer

RUN_FORMAT = "medvl-adamatch/1"
ARTIFACT_DIR = "adamatch"


@dataclass
class AdaMatchConfig:
    """The ``model:`` section of the AdaMatch stage config."""

    image_size: int = 128  # images are resized to this side before the backbone
    embed_dim: int = 256
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    patches: AdaPatchConfig = field(default_factory=AdaPatchConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    temperature: float = 0.07
    learn_temperature: bool = True
    global_weight: float = 0.0  # weight of the optional global image-report term
    chunk_size: int = 16  # images per chunk of the B x B x P x W similarity
    gather_negatives: bool = True  # under DDP, every rank's pairs are negatives (all_gather with gradients)
    # Report-to-image score: plain mean over affirmed words ("uniform", the paper) or weighted by each
    # word's inverse document frequency in the training reports ("idf", as BERTScore weights greedy matching).
    word_weighting: Literal["uniform", "idf"] = "idf"
    # Weight of the word-level term (:func:`word_loss`): each affirmed word against the batch's images, positives
    # the images whose reports affirm the same word (its forms pooled by stem when the batch carries ``word_key``,
    # as the AdaMatch stage's does). 0 = the paper's pair-level loss only (the default; the demo preset uses 1).
    # Computed on each process's own batch (no gathering across ranks).
    word_loss_weight: float = 0.0

    def validate(self) -> None:
        if self.word_loss_weight < 0:
            raise ConfigError("model.word_loss_weight must be >= 0")
        if self.embed_dim < 1 or self.image_size < 8:
            raise ConfigError("model.embed_dim must be positive and model.image_size at least 8")
        if not 0 < self.temperature < 10:
            raise ConfigError(f"model.temperature must be in (0, 10), got {self.temperature}")


# ------------------------------------------------------------------------------------------ results


@dataclass
class ImagePatches:
    """Adaptive patches of a batch.

    ``features`` (B, P, D) projected, not normalised; ``boxes`` (B, P, 4) ``x0, y0, x1, y1`` normalised
    (x to the image's right); ``centres`` (B, P, 2); ``points`` (B, P, k*k, 2) the sample points (the
    free-form shape); ``shift`` (B, P, 2) and ``size`` (B, P, 2) in grid cells; ``penalty`` scalar.
    """

    features: torch.Tensor
    boxes: torch.Tensor
    centres: torch.Tensor
    points: torch.Tensor
    shift: torch.Tensor
    size: torch.Tensor
    penalty: torch.Tensor
    global_features: torch.Tensor | None = None  # (B, D) mean of patch features

    @classmethod
    def from_layout(cls, layout: PatchLayout) -> ImagePatches:
        return cls(layout.features, layout.boxes, layout.centres, layout.points, layout.shift, layout.size,
                   layout.penalty, layout.features.mean(1))


@dataclass
class TextTokens:
    """``features`` (B, T, D) word-pooled, not normalised; ``word_mask`` (B, T) bool: each content word
    once (first piece); ``match_mask`` (B, T) bool: the affirmed (non-negated) ones; ``global_features``
    (B, D) from the first token."""

    features: torch.Tensor
    word_mask: torch.Tensor
    match_mask: torch.Tensor
    global_features: torch.Tensor | None = None
    word_weight: torch.Tensor | None = None  # (B, T) float, idf at each word's first piece


@dataclass
class Keyword:
    """A keyword ranked for an image: ``score`` is the calibrated (z-scored against training images)
    best-patch similarity, ``similarity`` the raw cosine, ``box`` that best patch's box."""

    word: str
    score: float
    similarity: float
    box: tuple[float, float, float, float]
    patch: int


@dataclass
class Keypatches:
    """Top keypatches per report: ``features`` (B, K, D) (patch space, not normalised), ``boxes``
    (B, K, 4), ``scores`` (B, K) cosine to the report's best word, ``words`` the bank entries' keywords,
    ``crops`` (B, K, c, c) uint8 crops of the training scans, ``sources`` their dicom ids."""

    features: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    words: list[list[str]]
    crops: torch.Tensor
    sources: list[list[str]]


# ---------------------------------------------------------------------------------------- the loss


def effective_masks(word_mask: torch.Tensor, match_mask: torch.Tensor, real: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallbacks per report: no content word -> all real pieces; no affirmed word -> all content words.
    All (B, T) bool."""
    word = torch.where(word_mask.any(1, keepdim=True), word_mask, real)
    match = torch.where(match_mask.any(1, keepdim=True), match_mask, word)
    return word, match


def word_order(word_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, W) positions of the masked entries first (stable), W = max count (at least 1)."""
    w = max(int(word_mask.sum(1).max()), 1)
    return torch.argsort((~word_mask).to(torch.int8), dim=1, stable=True)[:, :w]


def select_words(features: torch.Tensor, word_mask: torch.Tensor, match_mask: torch.Tensor,
                 weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Gather the masked positions to the front: (B, T, D) -> (B, W, D), masks (B, W) [, weights (B, W)];
    W = max count. Cuts the similarity tensor from pieces (stop words, punctuation, padding) to content words.
    """
    order = word_order(word_mask)
    feats = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    out = (feats, word_mask.gather(1, order), match_mask.gather(1, order))
    if weight is None:
        return out
    return (*out, weight.gather(1, order))


def token_scores(img: torch.Tensor, txt: torch.Tensor, i2t_mask: torch.Tensor, t2i_mask: torch.Tensor,
                 chunk: int = 16, t2i_weight: torch.Tensor | None = None, word_best: bool = False
                 ) -> tuple[torch.Tensor, ...]:
    """Fine-grained scores of every image against every report.

    img (Bi, P, D) and txt (Bt, W, D) L2-normalised; i2t_mask, t2i_mask (Bt, W) bool; t2i_weight (Bt, W)
    optional word weights. Returns ``s_i2t`` (Bi, Bt) = mean over patches of the best i2t word, and
    ``s_t2i`` (Bi, Bt) = (weighted) mean over t2i words of the best patch; with ``word_best`` also the best
    patch similarity of every word in every image (Bi, Bt, W), for :func:`word_loss`. ``chunk`` images at a time.
    """
    neg = torch.finfo(img.dtype).min
    t2i = t2i_mask.to(img.dtype)
    if t2i_weight is not None:
        t2i = t2i * t2i_weight.to(img.dtype)
    n_t2i = t2i.sum(1).clamp_min(1e-6)  # (Bt,)
    off = ~i2t_mask[None, :, None, :]  # (1, Bt, 1, W)
    out_i2t, out_t2i, out_best = [], [], []
    for a in range(0, img.shape[0], max(1, chunk)):
        s = torch.einsum("ipd,jwd->ijpw", img[a:a + chunk], txt)  # (c, Bt, P, W)
        out_i2t.append(s.masked_fill(off, neg).amax(-1).mean(-1))
        best = s.amax(2)  # (c, Bt, W)
        out_t2i.append((best * t2i).sum(-1) / n_t2i)
        if word_best:
            out_best.append(best)
    if word_best:
        return torch.cat(out_i2t), torch.cat(out_t2i), torch.cat(out_best)
    return torch.cat(out_i2t), torch.cat(out_t2i)


def word_identities(input_ids: torch.Tensor, order: torch.Tensor, word_key: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(B, W) ids for :func:`word_loss` of the words at ``order`` (from :func:`word_order`): their stem ids from
    ``word_key`` (B, T), so a word's forms are one word; without ``word_key``, or at fallback pieces without a stem,
    the first piece (as ``-1 - id`` where stems exist, so the two kinds of id never meet)."""
    pieces = input_ids.gather(1, order)
    if word_key is None:
        return pieces
    stems = word_key.gather(1, order)
    return torch.where(stems > 0, stems, -1 - pieces)


def word_loss(best: torch.Tensor, word_mask: torch.Tensor, word_ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Word-level InfoNCE over images: for every affirmed word w of report j, the images of the batch compete on
    their best patch for w (``best`` (Bi, Bt, W) from :func:`token_scores`, Bi = Bt = B, image i paired with
    report i). Positives: image j and every image whose report also affirms w (``word_ids`` (B, W): one id per
    word, equal for the same word: the model passes stem ids, so "granulomas" is "granuloma"; ``word_mask`` (B, W)
    bool: affirmed words), pooled as in MIL-NCE; negatives: the others.

    The report-level scores let a word ride on whatever co-occurs with it (clips with a large heart after heart
    surgery); here a large heart in an image whose report has no clips is a negative for "clips", so the word
    has to find what only its positive images share.
    """
    b = best.shape[0]
    same = (word_ids[:, :, None, None] == word_ids[None, None]) & word_mask[:, :, None, None]  # (Bi, Wi, Bt, W)
    pos = same.any(1) | torch.eye(b, dtype=torch.bool, device=best.device)[:, :, None]  # (Bi, Bt, W)
    logits = scale * best.float()
    per_word = torch.logsumexp(logits, 0) - torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 0)  # (Bt, W)
    valid = word_mask.to(per_word.dtype)
    return (per_word * valid).sum() / valid.sum().clamp_min(1.0)


def contrastive_loss(logits: torch.Tensor, groups: torch.Tensor | None = None,
                     col_groups: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over rows of ``logits`` (B, N). Positives: the diagonal when ``groups`` is None; otherwise
    every column whose ``col_groups`` (N,) (default: ``groups``) equals the row's ``groups`` (B,) value
    (identical or all-normal reports). Several positives are pooled as in MIL-NCE,
    ``-log(sum_pos exp / sum_all exp)``: the row must put its mass on its positives, not spread it
    evenly over them (a soft uniform target would push the temperature up to flatten the logits)."""
    b = logits.shape[0]
    if groups is None:
        return F.cross_entropy(logits, torch.arange(b, device=logits.device))
    cols = groups if col_groups is None else col_groups
    pos = groups[:, None] == cols[None, :]
    logits = logits.float()
    pos_lse = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - pos_lse).mean()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_pairs(img: torch.Tensor, txt: torch.Tensor, i2t_mask: torch.Tensor, t2i_mask: torch.Tensor,
                 groups: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's img (B, P, D), txt (B, W, D) (words padded to the ranks' max), masks, word weights and
    groups, concatenated in rank order; then this rank's padded txt, masks and weights. Features keep
    gradients (``torch.distributed.nn.all_gather``): each rank's slice gets every rank's loss gradient."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    w = torch.tensor([txt.shape[1]], device=txt.device)
    dist.all_reduce(w, op=dist.ReduceOp.MAX)
    pad = int(w) - txt.shape[1]
    if pad:
        txt = F.pad(txt, (0, 0, 0, pad))
        i2t_mask = F.pad(i2t_mask, (0, pad), value=False)
        t2i_mask = F.pad(t2i_mask, (0, pad), value=False)
        weight = F.pad(weight, (0, pad))

    def plain(t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    return (torch.cat(all_gather(img.contiguous())), torch.cat(all_gather(txt.contiguous())),
            plain(i2t_mask), plain(t2i_mask), plain(weight), plain(groups), txt, i2t_mask, t2i_mask, weight)


def pair_loss(img: torch.Tensor, txt: torch.Tensor, i2t_mask: torch.Tensor, t2i_mask: torch.Tensor,
              scale: torch.Tensor, groups: torch.Tensor | None = None, chunk: int = 16,
              gather: bool = False, t2i_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_i2t, loss_t2i) of this process's pairs: img (B, P, D), txt (B, W, D) normalised.

    With ``gather`` under torch.distributed, the negatives are every rank's pairs: this rank's images
    against all reports and all images against this rank's reports (open_clip's local loss).
    """
    rank, world = _world()
    if not gather or world == 1:
        s_i2t, s_t2i = token_scores(img, txt, i2t_mask, t2i_mask, chunk, t2i_weight)
        return contrastive_loss(scale * s_i2t, groups), contrastive_loss(scale * s_t2i.t(), groups)
    b = img.shape[0]
    if groups is None:  # unique ids across ranks: the positives are the pairs themselves
        groups = torch.arange(b, device=img.device) + rank * b
    weight = t2i_weight if t2i_weight is not None else torch.ones_like(t2i_mask, dtype=img.dtype)
    img_all, txt_all, i2t_all, t2i_all, w_all, g_all, txt, i2t_mask, t2i_mask, weight = gather_pairs(
        img, txt, i2t_mask, t2i_mask, groups, weight)
    s_i2t, _ = token_scores(img, txt_all, i2t_all, t2i_all, chunk, w_all)  # (B, world*B)
    _, s_t2i = token_scores(img_all, txt, i2t_mask, t2i_mask, chunk, weight)  # (world*B, B)
    return (contrastive_loss(scale * s_i2t, groups, g_all), contrastive_loss(scale * s_t2i.t(), groups, g_all))


# ---------------------------------------------------------------------------------------- the model


class AdaMatch(nn.Module):
    """Adaptive-patch image encoder + word-level text encoder + learnable temperature."""

    def __init__(self, cfg: AdaMatchConfig, text_encoder: TextEncoder):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.patches = AdaptivePatchLayer(self.backbone.out_channels, cfg.embed_dim, cfg.patches)
        self.text_encoder = text_encoder
        init = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def num_patches(self) -> int:
        return self.patches.num_patches

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, 1, S, S) at the model's size (bilinear with antialias)."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise InvalidImageError(f"images must be (B, 1, H, W), got {tuple(images.shape)}")
        s = self.cfg.image_size
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return images

    def encode_image(self, images: torch.Tensor) -> ImagePatches:
        """images (B, 1, S, S) in [-1024, 1024] -> :class:`ImagePatches` (features (B, P, D))."""
        fmap = self.backbone(self.prepare_images(images))
        return ImagePatches.from_layout(self.patches(fmap))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    word_ids: torch.Tensor | None = None, word_mask: torch.Tensor | None = None,
                    match_mask: torch.Tensor | None = None, word_weight: torch.Tensor | None = None) -> TextTokens:
        """input_ids, attention_mask (B, T) [+ word_ids, word_mask, match_mask, word_weight from ``tokenize``]
        -> :class:`TextTokens` (features (B, T, D)). Without word information each piece is a word and
        every real piece but the first and last (the special tokens) is a content word."""
        feats, glob = self.text_encoder(input_ids, attention_mask, word_ids)
        if word_ids is not None:
            real = word_ids >= 0
        else:
            real = attention_mask.bool().clone()
            real[:, 0] = False
            real[torch.arange(real.shape[0]), attention_mask.sum(1) - 1] = False
        word_mask = real if word_mask is None else word_mask.bool()
        match_mask = word_mask if match_mask is None else match_mask.bool()
        word_mask, match_mask = effective_masks(word_mask, match_mask, real)
        if word_weight is not None:  # fallback masks may select pieces without a weight: give them 1
            word_weight = torch.where(word_mask & (word_weight <= 0), torch.ones_like(word_weight), word_weight)
        return TextTokens(feats, word_mask, match_mask, glob, word_weight)

    def t2i_weights(self, tokens: TextTokens) -> torch.Tensor | None:
        """The word weights the report-to-image score uses (None: plain mean)."""
        return tokens.word_weight if self.cfg.word_weighting == "idf" else None

    def select(self, tokens: TextTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Normalised content-word features (B, W, D), masks (B, W) and t2i weights (B, W) or None."""
        feats = F.normalize(tokens.features, dim=-1)
        weight = self.t2i_weights(tokens)
        if weight is None:
            return (*select_words(feats, tokens.word_mask, tokens.match_mask), None)
        return select_words(feats, tokens.word_mask, tokens.match_mask, weight)

    def scores(self, patches: ImagePatches, tokens: TextTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_i2t, s_t2i), each (B_images, B_reports), from encoded images and reports."""
        img = F.normalize(patches.features, dim=-1)
        txt, wm, mm, weight = self.select(tokens)
        return token_scores(img, txt, wm, mm, self.cfg.chunk_size, weight)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                word_ids: torch.Tensor | None = None, word_mask: torch.Tensor | None = None,
                match_mask: torch.Tensor | None = None, groups: torch.Tensor | None = None,
                word_weight: torch.Tensor | None = None, word_key: torch.Tensor | None = None) -> dict:
        """The whole training computation (so DDP sees it): returns ``loss`` and detached logs.

        ``word_key`` (B, T) (from the tokenizer: each content word's stem id at its first piece) decides which words
        are the same word in the word-level term, so "granulomas" and "granulomatous" count as "granuloma";
        without it, words are matched by their first piece."""
        patches = self.encode_image(images)
        tokens = self.encode_text(input_ids, attention_mask, word_ids, word_mask, match_mask, word_weight)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        img = F.normalize(patches.features, dim=-1)
        txt, wm, mm, weight = self.select(tokens)
        if self.cfg.word_loss_weight > 0 and (not self.cfg.gather_negatives or _world()[1] == 1):
            s_i2t, s_t2i, best = token_scores(img, txt, wm, mm, self.cfg.chunk_size, weight, word_best=True)
            loss_i2t, loss_t2i = contrastive_loss(scale * s_i2t, groups), contrastive_loss(scale * s_t2i.t(), groups)
        else:
            loss_i2t, loss_t2i = pair_loss(img, txt, wm, mm, scale, groups, self.cfg.chunk_size,
                                           gather=self.cfg.gather_negatives, t2i_weight=weight)
            if self.cfg.word_loss_weight > 0:  # under DDP with gathered negatives: the word term on local pairs
                _, _, best = token_scores(img, txt, wm, mm, self.cfg.chunk_size, weight, word_best=True)
        loss = 0.5 * (loss_i2t + loss_t2i) + patches.penalty
        out = {"loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(), "size_penalty": patches.penalty.detach()}
        if self.cfg.word_loss_weight > 0:
            ids = word_identities(input_ids, word_order(tokens.word_mask), word_key)  # the words select() gathered
            loss_word = word_loss(best, mm, ids, scale)
            loss = loss + self.cfg.word_loss_weight * loss_word
            out["loss_word"] = loss_word.detach()
        if self.cfg.global_weight > 0:
            gi = F.normalize(patches.global_features, dim=-1)
            gt = F.normalize(tokens.global_features, dim=-1)
            logits = scale * gi @ gt.t()
            loss_global = 0.5 * (contrastive_loss(logits, groups) + contrastive_loss(logits.t(), groups))
            loss = loss + self.cfg.global_weight * loss_global
            out["loss_global"] = loss_global.detach()
        out["loss"] = loss
        out["temperature"] = (1.0 / scale).detach()
        stats = patch_stats(PatchLayout(patches.features, patches.boxes, patches.centres, patches.points,
                                        patches.shift, patches.size, patches.penalty))
        out.update({k: torch.tensor(v) for k, v in stats.items()})
        return out


def build_adamatch(cfg: AdaMatchConfig, tokenizer: ReportTokenizer) -> AdaMatch:
    """A fresh model: text encoder built from ``cfg.text`` or loaded from ``cfg.text.pretrained``."""
    if cfg.text.pretrained:
        text = TextEncoder.from_pretrained(cfg.text.pretrained, cfg.embed_dim, lexical=cfg.text.lexical)
        if text.encoder.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"text encoder in {cfg.text.pretrained} has a smaller vocabulary than its tokenizer")
    else:
        text = TextEncoder.from_config(cfg.text, tokenizer.vocab_size, tokenizer.pad_token_id, cfg.embed_dim)
    return AdaMatch(cfg, text)


# ---------------------------------------------------------------------------- keywords, keypatches


@dataclass
class KeywordVocabulary:
    """Keywords mined from training reports with their embeddings (K, D) L2-normalised, and the mean
    and std (K,) of each keyword's best-patch cosine over training images (for calibration)."""

    words: list[str]
    counts: list[int]
    embeddings: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.words)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        (directory / "keywords.json").write_text(json.dumps({"words": self.words, "counts": self.counts}, indent=1))
        save_file({"embeddings": self.embeddings.contiguous(), "mean": self.mean.contiguous(),
                   "std": self.std.contiguous()}, str(directory / "keywords.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> KeywordVocabulary:
        from safetensors.torch import load_file

        meta = json.loads((directory / "keywords.json").read_text())
        t = load_file(str(directory / "keywords.safetensors"))
        return cls(meta["words"], meta["counts"], t["embeddings"], t["mean"], t["std"])


@dataclass
class KeypatchBank:
    """Best-matched training patches per keyword: ``features`` (N, D) (patch space, not normalised),
    ``boxes`` (N, 4), ``scores`` (N,) word-patch cosine, ``word_index`` (N,) into the keyword list,
    ``crops`` (N, c, c) uint8, ``sources`` dicom ids."""

    features: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    word_index: torch.Tensor
    crops: torch.Tensor
    sources: list[str]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({"features": self.features.contiguous(), "boxes": self.boxes.contiguous(),
                   "scores": self.scores.contiguous(), "word_index": self.word_index.contiguous(),
                   "crops": self.crops.contiguous()}, str(directory / "keypatches.safetensors"))
        (directory / "keypatches.json").write_text(json.dumps({"sources": self.sources}))

    @classmethod
    def load(cls, directory: Path) -> KeypatchBank:
        from safetensors.torch import load_file

        t = load_file(str(directory / "keypatches.safetensors"))
        sources = json.loads((directory / "keypatches.json").read_text())["sources"]
        return cls(t["features"], t["boxes"], t["scores"], t["word_index"], t["crops"], sources)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of ``images`` (N, 1, S, S) at ``boxes`` (N, 4) resized to (N, size, size) uint8 (cache scale)."""
    n = images.shape[0]
    u = (torch.arange(size, dtype=images.dtype, device=images.device) + 0.5) / size
    x = boxes[:, None, 0:1] + u[None, :, None] * (boxes[:, None, 2:3] - boxes[:, None, 0:1])  # (N, size, 1)
    y = boxes[:, None, 1:2] + u[None, :, None] * (boxes[:, None, 3:4] - boxes[:, None, 1:2])
    gx = x.transpose(1, 2).expand(n, size, size)
    gy = y.expand(n, size, size)
    grid = torch.stack([gx, gy], -1) * 2 - 1
    crops = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    return ((crops + 1024.0) * (255.0 / 2048.0)).round().clamp(0, 255).to(torch.uint8)


@dataclass
class MiningConfig:
    """How keywords and keypatches are mined (the ``keywords:`` section of the stage config)."""

    vocab_size: int = 200  # at most this many keywords
    min_count: int = 3  # a word must be affirmed in at least this many training reports
    min_length: int = 3
    bank_per_word: int = 16  # keypatches kept per keyword (best word-patch scores)
    crop_size: int = 32
    batch_size: int = 32


def mine_vocabulary(tokenizer: ReportTokenizer, reports: Sequence[str], cfg: MiningConfig) -> list[tuple[str, int]]:
    """Keywords: affirmed content words of training reports by document frequency, plus the head words of
    the labeler's positive mentions (kept even when rarer than ``min_count``)."""
    counts: Counter[str] = Counter()
    heads: set[str] = set()
    for start in range(0, len(reports), 256):
        batch = list(reports[start:start + 256])
        enc = tokenizer.encode(batch)
        for words in enc.words:
            counts.update({w.text.lower() for w in words if w.content and not w.negated and w.text.isalpha()
                           and len(w.text) >= cfg.min_length})
    try:
        from medvl.text.labeler import extract_mentions
    except ImportError:
        extract_mentions = None
    if extract_mentions is not None:
        for text in reports:
            for m in extract_mentions(text):
                if m.head and float(m.value) == 1.0 and str(m.head).isalpha():
                    heads.add(str(m.head).lower())
    ranked = [(w, c) for w, c in counts.most_common() if c >= cfg.min_count or (w in heads and c > 0)]
    ranked = sorted(ranked, key=lambda wc: (wc[0] not in heads, -wc[1], wc[0]))[: cfg.vocab_size]
    return sorted(ranked, key=lambda wc: (-wc[1], wc[0]))


@torch.no_grad()
def build_keywords_and_bank(model: AdaMatch, tokenizer: ReportTokenizer, dataset, cfg: MiningConfig,
                            device: str | torch.device = "cpu", progress: bool = True
                            ) -> tuple[KeywordVocabulary, KeypatchBank]:
    """Mine the keyword vocabulary and the keypatch bank from a training split (``PreparedDataset``-like).

    Keyword embeddings are the mean of the keyword's affirmed, in-context word features over the
    training reports; the bank holds, for each affirmed keyword occurrence, the best-matching patch of
    the paired image, keeping the ``bank_per_word`` best per keyword.
    """
    from tqdm.auto import tqdm

    model.eval()
    reports = [dataset[i]["report"] for i in range(len(dataset))] if not hasattr(dataset, "index") else list(
        dataset.index["report"])
    vocab = mine_vocabulary(tokenizer, reports, cfg)
    if not vocab:
        raise InvalidReportError("no keyword occurs often enough in the training reports (keywords.min_count)")
    word_to_id = {w: i for i, (w, _) in enumerate(vocab)}
    k, d = len(vocab), model.embed_dim
    emb_sum = torch.zeros(k, d)
    emb_n = torch.zeros(k)
    cand: dict[str, list] = {"feat": [], "box": [], "score": [], "word": [], "crop": [], "src": []}
    img_best = []
    # First pass: word embeddings (needed before images can be scored against keywords).
    patch_cache = []
    it = range(0, len(dataset), cfg.batch_size)
    for start in tqdm(it, desc="keywords", disable=not progress, leave=False):
        items = [dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))]
        images = torch.stack([x["image"] for x in items]).to(device)
        enc = tokenizer.encode([x["report"] for x in items])
        tok = model.encode_text(**{k_: v.to(device) for k_, v in enc.tensors().items()})
        patches = model.encode_image(images)
        pn = F.normalize(patches.features, dim=-1)
        tn = F.normalize(tok.features, dim=-1)
        for b, words in enumerate(enc.words):
            pos = torch.nonzero(tok.match_mask[b]).flatten().tolist()
            for t in pos:
                wid = int(enc.word_ids[b, t])
                kw = word_to_id.get(words[wid].text.lower()) if 0 <= wid < len(words) else None
                if kw is None or words[wid].negated:
                    continue
                emb_sum[kw] += tn[b, t].cpu()
                emb_n[kw] += 1
                sim = pn[b] @ tn[b, t]  # (P,)
                p = int(sim.argmax())
                cand["feat"].append(patches.features[b, p].cpu())
                cand["box"].append(patches.boxes[b, p].cpu())
                cand["score"].append(float(sim[p]))
                cand["word"].append(kw)
                cand["src"].append((start + b, str(items[b]["dicom_id"])))
        patch_cache.append(pn.cpu())
    embeddings = F.normalize(emb_sum / emb_n.clamp_min(1).unsqueeze(-1), dim=-1)
    for pn in patch_cache:
        img_best.append((pn @ embeddings.t()).amax(1))  # (b, K)
    best = torch.cat(img_best)
    vocab_out = KeywordVocabulary([w for w, _ in vocab], [c for _, c in vocab], embeddings, best.mean(0),
                                  best.std(0).clamp_min(1e-4) if best.shape[0] > 1 else torch.ones(k))
    if not cand["score"]:
        raise InvalidReportError("no keyword occurrence found to build the keypatch bank")
    scores = torch.tensor(cand["score"])
    words = torch.tensor(cand["word"])
    keep = []
    for kw in range(k):
        idx = torch.nonzero(words == kw).flatten()
        if idx.numel():
            keep.append(idx[scores[idx].argsort(descending=True)[: cfg.bank_per_word]])
    keep_idx = torch.cat(keep)
    boxes = torch.stack(cand["box"])[keep_idx]
    src_rows = [cand["src"][i][0] for i in keep_idx.tolist()]
    images = torch.stack([dataset[r]["image"] for r in src_rows])
    crops = crop_boxes(images.float(), boxes, cfg.crop_size)
    bank = KeypatchBank(torch.stack(cand["feat"])[keep_idx], boxes, scores[keep_idx], words[keep_idx], crops,
                        [cand["src"][i][1] for i in keep_idx.tolist()])
    return vocab_out, bank


# --------------------------------------------------------------------------------------- the run API


def find_artifacts(run_dir: str | Path) -> Path:
    """``RUN/adamatch/`` (or ``RUN`` itself when it is that folder); RunError when neither holds a model."""
    run_dir = Path(run_dir)
    for cand in (run_dir / ARTIFACT_DIR, run_dir):
        if (cand / "adamatch.json").exists():
            return cand
    if not run_dir.exists():
        raise RunError(f"run directory {run_dir} does not exist")
    raise RunError(f"{run_dir} holds no AdaMatch model (no {ARTIFACT_DIR}/adamatch.json); "
                   "train one with `medvl train adamatch`")


class AdaMatchRun:
    """A trained AdaMatch model with its tokenizer, keyword vocabulary and keypatch bank (inference only)."""

    def __init__(self, model: AdaMatch, tokenizer: ReportTokenizer, keywords: KeywordVocabulary | None = None,
                 keypatch_bank: KeypatchBank | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.keywords = keywords
        self.keypatch_bank = keypatch_bank
        if keywords is not None:
            self._kw_emb = keywords.embeddings.to(self.device)
        if keypatch_bank is not None:
            self._bank_norm = F.normalize(keypatch_bank.features.to(self.device).float(), dim=-1)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @property
    def config(self) -> AdaMatchConfig:
        return self.model.cfg

    # ---- persistence
    def save(self, run_dir: str | Path) -> Path:
        """Write everything under ``run_dir/adamatch/``; returns that folder."""
        from safetensors.torch import save_file

        out = Path(run_dir) / ARTIFACT_DIR
        out.mkdir(parents=True, exist_ok=True)
        cfg = to_dict(self.model.cfg)
        cfg["backbone"]["weights"] = None  # the weights below replace the initial file
        cfg["text"]["pretrained"] = None
        (out / "adamatch.json").write_text(json.dumps({"format": RUN_FORMAT, "model": cfg}, indent=1))
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        self.model.text_encoder.save_config(out / "text_encoder")
        self.tokenizer.save(out / "tokenizer")
        if self.keywords is not None:
            self.keywords.save(out)
        if self.keypatch_bank is not None:
            self.keypatch_bank.save(out)
        return out

    def copy_to(self, run_dir: str | Path) -> Path:
        """Put this AdaMatch model into another run (``run_dir/adamatch/``) so that run stands alone."""
        return self.save(run_dir)

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> AdaMatchRun:
        from safetensors.torch import load_file

        art = find_artifacts(run_dir)
        meta = json.loads((art / "adamatch.json").read_text())
        if meta.get("format") != RUN_FORMAT:
            raise RunError(f"{art}: format {meta.get('format')!r}, expected {RUN_FORMAT!r}")
        model_cfg = meta["model"]
        model_cfg.setdefault("text", {}).setdefault("lexical", False)  # runs saved before the lexical path
        cfg = from_dict(AdaMatchConfig, model_cfg)
        tokenizer = ReportTokenizer.load(art / "tokenizer")
        model = AdaMatch(cfg, TextEncoder.from_saved_config(art / "text_encoder", cfg.embed_dim, cfg.text.lexical))
        state = load_file(str(art / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RunError(f"{art}/model.safetensors does not match its config: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
        keywords = KeywordVocabulary.load(art) if (art / "keywords.json").exists() else None
        bank = KeypatchBank.load(art) if (art / "keypatches.json").exists() else None
        return cls(model, tokenizer, keywords, bank, device)

    # ---- encoding
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``dict(input_ids, attention_mask, word_ids, word_mask, match_mask)``, each (B, T), on the device."""
        return {k: v.to(self.device) for k, v in self.tokenizer(texts).items()}

    def _images(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise InvalidImageError(f"images must be a tensor (B, 1, S, S), got {type(images).__name__}")
        if images.dim() == 2:
            images = images[None, None]
        elif images.dim() == 3:
            images = images.unsqueeze(1)
        images = images.to(self.device, torch.float32)
        if images.numel() and (images.min() < -1100 or images.max() > 1100):
            raise InvalidImageError("images must be in medvl's [-1024, 1024] range (see medvl.data.prepared)")
        if images.numel() and images.min() >= 0:
            warnings.warn("images look like [0, 1] or [0, 255] pixels (no negative value); medvl expects "
                          "[-1024, 1024] with dark lungs (medvl.data.read_xray gives that)", stacklevel=3)
        return images

    @torch.no_grad()
    def encode_images(self, images) -> ImagePatches:
        """images (B, 1, H, W) in [-1024, 1024] (resized to the run's size) -> :class:`ImagePatches`."""
        assert not self.model.training
        return self.model.encode_image(self._images(images))

    @torch.no_grad()
    def encode_reports(self, texts: Sequence[str]) -> TextTokens:
        return self.model.encode_text(**self.tokenize(texts))

    @torch.no_grad()
    def scores(self, images, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_i2t, s_t2i), each (B_images, B_reports)."""
        return self.model.scores(self.encode_images(images), self.encode_reports(texts))

    @torch.no_grad()
    def word_similarity(self, images, word: str) -> torch.Tensor:
        """Cosine of each patch with ``word`` (pooled over its pieces, encoded alone): (B, P)."""
        if not word or not word.strip():
            raise InvalidReportError("word is empty")
        patches = self.encode_images(images)
        tok = self.encode_reports([word.strip()])
        mask = tok.word_mask[0]
        w = F.normalize(tok.features[0][mask].mean(0), dim=-1)
        return F.normalize(patches.features, dim=-1) @ w

    @torch.no_grad()
    def image_keywords(self, images, top_k: int = 5, patches: ImagePatches | None = None) -> list[list[Keyword]]:
        """Ranked keywords per image with the box of each keyword's best patch.

        For each keyword the best patch (max cosine) is found; keywords are ranked by that cosine
        z-scored against training images (so words present in every report do not always win).
        """
        if self.keywords is None or not len(self.keywords):
            raise RunError("this run has no keyword vocabulary")
        if patches is None:
            patches = self.encode_images(images)
        sim = F.normalize(patches.features, dim=-1) @ self._kw_emb.t()  # (B, P, K)
        best, where = sim.max(1)  # (B, K)
        z = (best - self.keywords.mean.to(best)) / self.keywords.std.to(best)
        top = z.topk(min(top_k, z.shape[1]), dim=1)
        out = []
        for b in range(z.shape[0]):
            row = []
            for score, kw in zip(top.values[b].tolist(), top.indices[b].tolist(), strict=True):
                p = int(where[b, kw])
                row.append(Keyword(self.keywords.words[kw], float(score), float(best[b, kw]),
                                   tuple(float(v) for v in patches.boxes[b, p].tolist()), p))
            out.append(row)
        return out

    @torch.no_grad()
    def report_keypatches(self, texts: Sequence[str], top_k: int = 8) -> Keypatches:
        """Top ``top_k`` bank patches per report by their best cosine with the report's affirmed words."""
        bank = self.keypatch_bank
        if bank is None or not len(bank):
            raise RunError("this run has no keypatch bank")
        tok = self.encode_reports(texts)
        txt = F.normalize(tok.features, dim=-1)
        sim = torch.einsum("btd,nd->btn", txt, self._bank_norm)  # (B, T, N)
        sim = sim.masked_fill(~tok.match_mask.unsqueeze(-1), -2.0).amax(1)  # (B, N)
        k = min(top_k, sim.shape[1])
        scores, idx = sim.topk(k, dim=1)
        idx_cpu = idx.cpu()
        dev = self.device
        return Keypatches(
            features=bank.features.to(dev)[idx], boxes=bank.boxes.to(dev)[idx], scores=scores,
            words=[[self.keywords.words[int(bank.word_index[i])] if self.keywords else "" for i in row]
                   for row in idx_cpu.tolist()],
            crops=bank.crops[idx_cpu], sources=[[bank.sources[i] for i in row] for row in idx_cpu.tolist()])


def copy_adamatch(src_run: str | Path, dst_run: str | Path) -> Path:
    """Copy ``src_run``'s AdaMatch artifacts into ``dst_run/adamatch/`` without loading them."""
    src = find_artifacts(src_run)
    dst = Path(dst_run) / ARTIFACT_DIR
    if dst.resolve() != src.resolve():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


__all__ = [
    "AdaMatch", "AdaMatchConfig", "AdaMatchRun", "ImagePatches", "TextTokens", "Keyword", "Keypatches",
    "KeywordVocabulary", "KeypatchBank", "MiningConfig", "PatchMode", "build_adamatch", "build_keywords_and_bank",
    "token_scores", "contrastive_loss", "pair_loss", "copy_adamatch", "find_artifacts",
]

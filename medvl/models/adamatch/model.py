"""The AdaMatch model: adaptive-patch image encoder + word-level text encoder + learnable temperature.

``AdaMatch.encode_image``: images (B, 1, S, S) in [-1024, 1024] -> :class:`ImagePatches` (adaptive patches:
features (B, P, D) projected, not normalised; boxes (B, P, 4)). ``AdaMatch.encode_text``: pieces (B, T) ->
:class:`TextTokens` (word-pooled features (B, T, D); ``word_mask`` marks each content word once, ``match_mask``
the affirmed ones). ``AdaMatch.forward`` is the whole training computation (:mod:`medvl.models.adamatch.losses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medvl.errors import ConfigError, InvalidImageError
from medvl.models.adamatch.encoders import BackboneConfig, TextEncoder, TextEncoderConfig, build_backbone
from medvl.models.adamatch.losses import (
    contrastive_loss,
    distributed_world,
    effective_masks,
    pair_loss,
    select_words,
    token_scores,
    word_identities,
    word_loss,
    word_order,
)
from medvl.models.adamatch.patches import AdaPatchConfig, AdaptivePatchLayer, ImagePatches, patch_stats
from medvl.text.tokenizer import ReportTokenizer

__all__ = ["AdaMatchConfig", "TextTokens", "AdaMatch", "build_adamatch"]


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
        return self.patches(self.backbone(self.prepare_images(images)))

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        word_ids: torch.Tensor | None = None,
        word_mask: torch.Tensor | None = None,
        match_mask: torch.Tensor | None = None,
        word_weight: torch.Tensor | None = None,
    ) -> TextTokens:
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
            word_weight = torch.where(
                word_mask & (word_weight <= 0), torch.ones_like(word_weight), word_weight
            )
        return TextTokens(feats, word_mask, match_mask, glob, word_weight)

    def t2i_weights(self, tokens: TextTokens) -> torch.Tensor | None:
        """The word weights the report-to-image score uses (None: plain mean)."""
        return tokens.word_weight if self.cfg.word_weighting == "idf" else None

    def select(
        self, tokens: TextTokens, order: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Normalised content-word features (B, W, D), masks (B, W) and t2i weights (B, W) or None
        (``order``: ``word_order(tokens.word_mask)`` when the caller has it)."""
        feats = F.normalize(tokens.features, dim=-1)
        weight = self.t2i_weights(tokens)
        if weight is None:
            return (*select_words(feats, tokens.word_mask, tokens.match_mask, order=order), None)
        return select_words(feats, tokens.word_mask, tokens.match_mask, weight, order=order)

    def scores(self, patches: ImagePatches, tokens: TextTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_i2t, s_t2i), each (B_images, B_reports), from encoded images and reports."""
        img = F.normalize(patches.features, dim=-1)
        txt, wm, mm, weight = self.select(tokens)
        return token_scores(img, txt, wm, mm, self.cfg.chunk_size, weight)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        word_ids: torch.Tensor | None = None,
        word_mask: torch.Tensor | None = None,
        match_mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        word_weight: torch.Tensor | None = None,
        word_key: torch.Tensor | None = None,
    ) -> dict:
        """The whole training computation (so DDP sees it): returns ``loss`` and detached logs.

        ``word_key`` (B, T) (from the tokenizer: each content word's stem id at its first piece) decides which words
        are the same word in the word-level term, so "granulomas" and "granulomatous" count as "granuloma";
        without it, words are matched by their first piece."""
        patches = self.encode_image(images)
        tokens = self.encode_text(input_ids, attention_mask, word_ids, word_mask, match_mask, word_weight)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        img = F.normalize(patches.features, dim=-1)
        order = word_order(tokens.word_mask)  # W (the longest report's words): a read of the device, once
        txt, wm, mm, weight = self.select(tokens, order)
        if self.cfg.word_loss_weight > 0 and (not self.cfg.gather_negatives or distributed_world()[1] == 1):
            s_i2t, s_t2i, best = token_scores(img, txt, wm, mm, self.cfg.chunk_size, weight, word_best=True)
            loss_i2t, loss_t2i = (
                contrastive_loss(scale * s_i2t, groups),
                contrastive_loss(scale * s_t2i.t(), groups),
            )
        else:
            loss_i2t, loss_t2i = pair_loss(
                img,
                txt,
                wm,
                mm,
                scale,
                groups,
                self.cfg.chunk_size,
                gather=self.cfg.gather_negatives,
                t2i_weight=weight,
            )
            if (
                self.cfg.word_loss_weight > 0
            ):  # under DDP with gathered negatives: the word term on local pairs
                _, _, best = token_scores(img, txt, wm, mm, self.cfg.chunk_size, weight, word_best=True)
        loss = 0.5 * (loss_i2t + loss_t2i) + patches.penalty
        out = {
            "loss_i2t": loss_i2t.detach(),
            "loss_t2i": loss_t2i.detach(),
            "size_penalty": patches.penalty.detach(),
        }
        if self.cfg.word_loss_weight > 0:
            ids = word_identities(input_ids, order, word_key)  # the words select() gathered
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
        out.update(patch_stats(patches))
        return out


def build_adamatch(cfg: AdaMatchConfig, tokenizer: ReportTokenizer) -> AdaMatch:
    """A fresh model: text encoder built from ``cfg.text`` or loaded from ``cfg.text.pretrained``."""
    if cfg.text.pretrained:
        text = TextEncoder.from_pretrained(
            cfg.text.pretrained,
            cfg.embed_dim,
            lexical=cfg.text.lexical,
            trust_remote_code=cfg.text.trust_remote_code,
        )
        if text.encoder.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"text encoder in {cfg.text.pretrained} has a smaller vocabulary than its tokenizer"
            )
    else:
        text = TextEncoder.from_config(cfg.text, tokenizer.vocab_size, tokenizer.pad_token_id, cfg.embed_dim)
    return AdaMatch(cfg, text)

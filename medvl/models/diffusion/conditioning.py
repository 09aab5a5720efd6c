"""What the diffusion UNet is conditioned on: a report's frozen AdaMatch features, turned into a cross-attention context.

* :class:`ReportEncoder` - the frozen AdaMatch text side (:class:`~medvl.models.adamatch.AdaMatchRun`): report ->
  :class:`ReportFeatures` (word features (B, T, D), their mask and kind, the report's top keypatches (B, K, D) with
  boxes, the side / layout hint of :mod:`medvl.models.diffusion.layout`).
* :class:`ReportConditioner` - features -> the cross-attention context (B, L, C): projected word features, the
  shared memory's responses to them, keypatch features plus box embeddings; a learned null context replaces it
  for condition dropout and for the unconditional half of classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import nn

from medvl.errors import ConfigError
from medvl.models.adamatch import AdaMatchRun
from medvl.models.diffusion.layout import report_layout, report_sides
from medvl.models.memory import SharedMemory

__all__ = ["ConditionConfig", "ReportFeatures", "ReportEncoder", "ReportConditioner"]


@dataclass
class ConditionConfig:
    """What the UNet cross-attends to (docs/design.md section 6)."""

    max_tokens: int = 64  # report tokens (AdaMatch tokenizer pieces) kept; longer reports are cut
    keypatches: int = 8  # top keypatches of the report (0: none)
    use_memory: bool = True  # add the shared memory's response to every word as its own token
    memory_trainable: bool = False  # the memory comes from the report run and stays frozen by default
    token_mask: Literal["attention", "word"] = "attention"  # which AdaMatch mask marks a real token
    dropout: float = 0.1  # probability that a training sample sees the learned null context
    # The layout hint behind ``unet.side_maps``: "halves" lights the image half of each side the report states a
    # positive finding on (:func:`report_sides`); "zones" draws a soft box per stated (finding, side, zone) where
    # such findings sit (:func:`report_layout`), from ``layout_prior``: "finding/side/zone" -> [cx, cy, w, h]
    # (normalised image coordinates; zone "any" where the report gives none). An empty prior is estimated from
    # the training split's region boxes when the dataset has them (IU-Phantom), else DEFAULT_LAYOUT_PRIOR.
    # "none": no hint, the text alone (needs ``unet.side_maps: false``).
    layout: Literal["none", "halves", "zones"] = "halves"
    layout_prior: dict[str, list[float]] = field(default_factory=dict)
    layout_grid: int = 16  # the maps are drawn at this size and resized to the latent grid
    # Trainable transformer layers over the context (summary, words, memory responses, keypatches) before the UNet
    # reads it: the frozen AdaMatch word features are contextual but were trained to match patches, not to bind
    # "left" to the finding it qualifies; these layers let the head learn that binding from the words (0: none).
    context_layers: int = 0
    context_heads: int = 4

    def validate(self) -> None:
        if self.layout_grid < 2:
            raise ConfigError("condition.layout_grid must be at least 2")
        if self.max_tokens < 1:
            raise ConfigError("condition.max_tokens must be at least 1")
        if self.keypatches < 0:
            raise ConfigError("condition.keypatches must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("condition.dropout must be in [0, 1)")
        if self.context_layers < 0:
            raise ConfigError("condition.context_layers must be >= 0")
        if self.context_heads < 1:
            raise ConfigError("condition.context_heads must be at least 1")


@dataclass
class ReportFeatures:
    """The frozen text side of one batch of reports.

    words (B, T, Dw) float; word_mask (B, T) bool (True: a real token); word_kind (B, T) int8: 0 other token
    (special, stop word, punctuation, padding), 1 negated content word, 2 affirmed content word (the AdaMatch
    tokenizer's ``word_mask`` / ``match_mask``, from its negation scopes); keypatches (B, K, Dk) float;
    keypatch_boxes (B, K, 4) x0, y0, x1, y1 normalised; keypatch_mask (B, K) bool. K may be 0.
    sides (B, 2) float: a positive finding stated on the patient's right / left (:func:`report_sides`), or with
    ``condition.layout: zones`` (B, 2, g, g) maps of where (:func:`report_layout`).
    """

    words: torch.Tensor
    word_mask: torch.Tensor
    word_kind: torch.Tensor
    keypatches: torch.Tensor
    keypatch_boxes: torch.Tensor
    keypatch_mask: torch.Tensor
    sides: torch.Tensor

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ReportFeatures:
        def move(t: torch.Tensor) -> torch.Tensor:
            return (
                t.to(device, dtype=dtype) if (dtype is not None and t.is_floating_point()) else t.to(device)
            )

        return ReportFeatures(*(move(getattr(self, f.name)) for f in fields(self)))

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> ReportFeatures:
        return ReportFeatures(*(getattr(self, f.name)[index] for f in fields(self)))

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def cat(parts: Sequence[ReportFeatures]) -> ReportFeatures:
        return ReportFeatures(
            *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ReportFeatures))
        )

    def __len__(self) -> int:
        return self.words.shape[0]


class ReportEncoder:
    """Reports -> :class:`ReportFeatures` with a frozen AdaMatch run: ``run.tokenize``, ``run.model.encode_text``
    and ``run.report_keypatches``."""

    def __init__(self, run: AdaMatchRun, cfg: ConditionConfig, device: str | torch.device = "cpu"):
        self.run, self.cfg, self.device = run, cfg, torch.device(device)

    @property
    def word_dim(self) -> int:
        return int(self.run.embed_dim)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, on_device: bool = False) -> ReportFeatures:
        """Texts (B,) -> features, float32, padded / cut to ``max_tokens`` tokens: on the CPU (to be cached), or
        with ``on_device`` left on the encoder's device, where the host never waits for the device (a training
        step that encodes its batch's reports)."""
        parts = [
            self._encode_batch(list(texts[i : i + batch_size]), on_device)
            for i in range(0, len(texts), batch_size)
        ]
        return ReportFeatures.cat(parts)

    def _encode_batch(self, texts: list[str], on_device: bool) -> ReportFeatures:
        model = self.run.model
        tokens = {k: v.to(self.device) for k, v in self.run.tokenize(texts).items()}
        attention = tokens["attention_mask"]
        out = model.encode_text(**tokens)  # input_ids, attention_mask (+ word_ids, masks: word pooling)
        words = out.features.float()
        mask = (attention.bool() if self.cfg.token_mask == "attention" else out.word_mask.bool()).to(
            words.device
        )
        # The tokenizer's own masks (before AdaMatch's fallbacks, which call every word affirmed in a report
        # without any affirmed word).
        content = tokens["word_mask"].bool()
        affirmed = tokens["match_mask"].bool() & content
        kind = (content.to(torch.int8) + affirmed.to(torch.int8)) * mask
        b, t, d = words.shape
        T = self.cfg.max_tokens
        if t >= T:
            words, mask, kind = words[:, :T], mask[:, :T], kind[:, :T]
        else:
            words = torch.cat([words, words.new_zeros(b, T - t, d)], 1)
            mask = torch.cat([mask, mask.new_zeros(b, T - t)], 1)
            kind = torch.cat([kind, kind.new_zeros(b, T - t)], 1)
        words = words * mask.unsqueeze(-1)
        K = self.cfg.keypatches
        if K > 0:
            kp = self.run.report_keypatches(texts, K, encoded=out, words=False)  # the text is encoded once
            feats, boxes = kp.features.float(), kp.boxes.float()
            kmask = torch.isfinite(kp.scores)
            k = feats.shape[1]
            if k < K:  # a small bank can return fewer
                feats = torch.cat([feats, feats.new_zeros(b, K - k, feats.shape[-1])], 1)
                boxes = torch.cat([boxes, boxes.new_zeros(b, K - k, 4)], 1)
                kmask = torch.cat([kmask, kmask.new_zeros(b, K - k)], 1)
            feats, boxes, kmask = feats[:, :K], boxes[:, :K], kmask[:, :K].bool()
        else:
            feats, boxes = words.new_zeros(b, 0, d), words.new_zeros(b, 0, 4)
            kmask = torch.zeros(b, 0, dtype=torch.bool, device=words.device)
        hint = (
            report_layout(texts, self.cfg.layout_prior, self.cfg.layout_grid)
            if self.cfg.layout == "zones"
            else report_sides(texts)
        )  # from the text, on the CPU
        features = ReportFeatures(words, mask, kind, feats, boxes, kmask, hint)
        return features.to(words.device if on_device else "cpu")


class ReportConditioner(nn.Module):
    """:class:`ReportFeatures` -> cross-attention context (B, L, C), L = 1 + max_tokens * (1 + use_memory) + keypatches.

    Token blocks: [summary | words | memory responses to the words | keypatches]. Words carry an embedding of
    their kind (other / negated / affirmed content word), so "no effusion" and "left effusion" differ even
    when the frozen text encoder barely separates them. The summary token is the mean of the projected
    *affirmed* words (a learned "nothing affirmed" vector for a normal report): the report's positive findings
    in one vector, which the denoiser also adds to its timestep embedding. Each source is layer-normed and
    projected to C; words and their memory responses share a learned position embedding; keypatches add an
    embedding of their box (where in a training scan that patch came from); a learned type embedding marks the
    block. MONAI's cross-attention has no key mask, so padded slots hold a learned ``pad`` vector. ``drop``
    (B,) bool swaps a sample's whole context for the learned null context (condition dropout / the
    unconditional half of guidance).
    """

    def __init__(
        self,
        cfg: ConditionConfig,
        word_dim: int,
        keypatch_dim: int,
        context_dim: int,
        memory: SharedMemory | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.word_dim, self.keypatch_dim = word_dim, keypatch_dim  # saved with the head to rebuild it
        C, T = context_dim, cfg.max_tokens
        self.word_norm = nn.LayerNorm(word_dim)
        self.word_proj = nn.Linear(word_dim, C)
        self.memory = memory if cfg.use_memory else None
        if cfg.use_memory:
            if memory is None:
                raise ConfigError(
                    "condition.use_memory is true but no shared memory was given (a report run)"
                )
            mem_dim = int(memory.cfg.dim)
            # The memory space is the report head's (it queries through its own learned maps), not AdaMatch's:
            # the diffusion head learns its own query map into it; the memory matrix itself stays frozen.
            self.memory_query = nn.Linear(word_dim, mem_dim)
            self.memory_norm = nn.LayerNorm(mem_dim)
            self.memory_proj = nn.Linear(mem_dim, C)
            if not cfg.memory_trainable:
                memory.requires_grad_(False)
        if cfg.keypatches > 0:
            self.keypatch_norm = nn.LayerNorm(keypatch_dim)
            self.keypatch_proj = nn.Linear(keypatch_dim, C)
            self.box_proj = nn.Linear(4, C)
        self.position = nn.Parameter(torch.randn(T, C) * 0.02)
        self.kind = nn.Parameter(torch.randn(4, C) * 0.02)  # words, memory, keypatches, summary
        self.word_kind = nn.Parameter(torch.randn(3, C) * 0.02)  # other token, negated word, affirmed word
        self.nothing_affirmed = nn.Parameter(torch.randn(C) * 0.02)
        self.pad = nn.Parameter(torch.randn(C) * 0.02)
        self.null = nn.Parameter(torch.randn(self.context_length, C) * 0.02)
        self.out_norm = nn.LayerNorm(C)
        if cfg.context_layers > 0:
            if C % cfg.context_heads:
                raise ConfigError(
                    f"condition.context_heads ({cfg.context_heads}) must divide the context width ({C})"
                )
            layer = nn.TransformerEncoderLayer(
                C, cfg.context_heads, dim_feedforward=2 * C, dropout=0.0, batch_first=True, norm_first=True
            )
            self.context_encoder = nn.TransformerEncoder(
                layer, cfg.context_layers, enable_nested_tensor=False
            )

    @property
    def context_length(self) -> int:
        return 1 + self.cfg.max_tokens * (2 if self.cfg.use_memory else 1) + self.cfg.keypatches

    @property
    def context_dim(self) -> int:
        return self.pad.shape[0]

    def train(self, mode: bool = True) -> ReportConditioner:
        super().train(mode)
        if self.memory is not None and not self.cfg.memory_trainable:
            self.memory.eval()  # frozen: no dropout either
        return self

    def null_context(self, batch: int) -> torch.Tensor:
        """(B, L, C) learned unconditional context."""
        return self.null.unsqueeze(0).expand(batch, -1, -1)

    def forward(
        self,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        word_kind: torch.Tensor,
        keypatches: torch.Tensor,
        keypatch_boxes: torch.Tensor,
        keypatch_mask: torch.Tensor,
        sides: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The context (B, L, C); ``sides`` is not part of it (the denoiser takes it as image maps)."""
        b = words.shape[0]
        mask = word_mask.bool().unsqueeze(-1)
        valid = [torch.ones(b, 1, dtype=torch.bool, device=words.device), word_mask.bool()]
        kinds = self.word_kind[word_kind.long().clamp(0, 2)]  # (B, T, C)
        projected = self.word_proj(self.word_norm(words))
        affirmed = (word_kind == 2).unsqueeze(-1) & mask
        count = affirmed.sum(1)  # (B, 1)
        summary = (projected * affirmed).sum(1) / count.clamp(min=1)
        summary = torch.where(count > 0, summary, self.nothing_affirmed.to(summary.dtype)).unsqueeze(1)
        blocks = [
            summary + self.kind[3],
            torch.where(mask, projected + kinds + self.position + self.kind[0], self.pad),
        ]
        if self.memory is not None:
            grad = torch.enable_grad() if self.cfg.memory_trainable else torch.no_grad()
            with grad:
                response = self.memory.respond(self.memory_query(words))
            mem = self.memory_proj(self.memory_norm(response)) + kinds + self.position + self.kind[1]
            blocks.append(torch.where(mask, mem, self.pad))
            valid.append(word_mask.bool())
        if self.cfg.keypatches > 0:
            kp = (
                self.keypatch_proj(self.keypatch_norm(keypatches))
                + self.box_proj(keypatch_boxes * 2 - 1)
                + self.kind[2]
            )
            blocks.append(torch.where(keypatch_mask.bool().unsqueeze(-1), kp, self.pad))
            valid.append(keypatch_mask.bool())
        context = torch.cat(blocks, 1)
        if self.cfg.context_layers > 0:
            # padded slots neither attend nor are attended to (they keep the learned pad vector)
            keep = torch.cat(valid, 1)
            encoded = self.context_encoder(context, src_key_padding_mask=~keep)
            context = torch.where(keep.unsqueeze(-1), encoded, context)
        context = self.out_norm(context)
        if drop is not None:
            context = torch.where(drop.view(b, 1, 1), self.null_context(b).to(context.dtype), context)
        return context

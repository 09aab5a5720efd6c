"""The report-generation head: a GPT-2 decoder over AdaMatch patches, memory responses and keyword hints.

Conditioning sequence the decoder cross-attends to (all projected to the decoder width ``E``)::

    [ patch tokens   (P)  LN(AdaMatch patch feature) -> Linear -> (+ box embedding)
      memory tokens  (P)  SharedMemory.respond(patch token in memory space)     (model.use_memory)
      keyword tokens (K)  embedding of the image's top-K AdaMatch keywords
                          + Linear([box, score])                               (model.use_keywords) ]

each with a learned source-type embedding. Word embeddings query the same memory: a forward hook on
GPT-2's token embedding adds ``word_out(memory.respond(word_in(embedding)))`` to every token
embedding, so ``generate()`` keeps its KV cache (each decoding step embeds only its new token, and the
hook answers for that token alone).

The decoder is a Hugging Face ``GPT2LMHeadModel`` with ``add_cross_attention=True``. Greedy and beam search
(length penalty, n-gram blocking) run in :mod:`medvl.models.decoding`, stepped on the decoder's weights with the
same sequences and scores as transformers' ``generate()``. Text is tokenised by
a word-level tokenizer trained on the training reports (lowercase, words and punctuation marks as
tokens) and saved with the run.

Saved and loaded as a run's ``report_head/`` component by :class:`medvl.models.report_bundle.ReportHeadBundle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from medvl.errors import ConfigError
from medvl.models.decoding import TokenMemo, decode
from medvl.models.memory import MemoryConfig, SharedMemory
from medvl.models.report_labels import NUM_LABELS, LabelQueries, PooledLabels, f1_thresholds
from medvl.models.report_tokenizer import (
    SPECIAL_TOKENS,
    NearRepeatBan,
    build_report_tokenizer,
    decode_sequences,
    detokenize,
    encode_reports,
)

if TYPE_CHECKING:
    from medvl.models.adamatch.run import TopKeywords

__all__ = [
    "ReportHeadConfig",
    "GenerationSettings",
    "decoding_rules",
    "ReportHead",
    "LabelQueries",
    "PooledLabels",
    "f1_thresholds",
    "KeywordHints",
    "keyword_hints",
    "keyword_word",
    "DecodeOutput",
    "SPECIAL_TOKENS",
    "NearRepeatBan",
    "build_report_tokenizer",
    "detokenize",
    "encode_reports",
    "decode_sequences",
    "DECODER_DIR",
    "TOKENIZER_DIR",
]

DECODER_DIR = "decoder"
TOKENIZER_DIR = "tokenizer"

# Source-type ids of the conditioning tokens.
_PATCH, _MEMORY, _KEYWORD, _LABEL = 0, 1, 2, 3


@dataclass
class ReportHeadConfig:
    """``model:`` section of the report stage config."""

    n_embd: int = 256  # decoder width E
    n_layer: int = 3
    n_head: int = 8
    max_length: int = 100  # tokens per report, BOS and EOS included (longer reports are truncated)
    dropout: float = 0.1
    use_memory: bool = True  # ablation switch: no memory tokens, no word-memory queries
    use_keywords: bool = True  # ablation switch: no keyword-hint tokens
    num_keywords: int = 8  # top-K AdaMatch keywords per image given as hints
    finetune_adamatch: bool = False  # False: AdaMatch frozen (features computed once per image)
    adamatch_lr_scale: float = 0.1  # fine-tuned AdaMatch learns at train.lr times this
    label_loss_weight: float = 0.0  # auxiliary: predict the report's 14 CheXpert positives from the patches
    use_label_hints: bool = (
        False  # 14 label tokens (per-label patch summary + predicted probability) as hints
    )
    # 14 finding-state tokens (the label's embedding + "stated positive" or not) as hints: the reference report's
    # states while training (teacher forcing, with probability label_teacher_forcing per label, else the label
    # head's call), the label head's calls at inference (probability >= the label's threshold, the F1-best one
    # on the validation split, chosen at every validation and saved with the head). Needs label_loss_weight > 0.
    label_states: bool = False
    label_teacher_forcing: float = 1.0
    # the positive states also as one vector added to every word embedding (False: cross-attention tokens only)
    label_state_vector: bool = True
    label_pooling: Literal["queries", "mean_max"] = (
        "queries"  # the label head: per-label attention or mean+max
    )
    # mean_max only: before the decoder trains, fit the read-out as a logistic regression on the cached training
    # features for this many full-batch steps (0: learn it only with the decoder, at the decoder's pace)
    label_fit_steps: int = 0
    tokenizer_min_freq: int = 2
    tokenizer_max_vocab: int = 4000
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.max_length < 3:
            raise ConfigError(
                f"model.max_length must be at least 3 (BOS, a word, EOS), got {self.max_length}"
            )
        if self.label_states and self.label_loss_weight <= 0:
            raise ConfigError(
                "model.label_states needs model.label_loss_weight > 0 (the label head must learn)"
            )
        if self.label_states and self.use_label_hints:
            raise ConfigError(
                "model.label_states and model.use_label_hints are two kinds of label hint: pick one"
            )
        if not 0.0 <= self.label_teacher_forcing <= 1.0:
            raise ConfigError("model.label_teacher_forcing must be in [0, 1]")
        if self.label_pooling not in ("queries", "mean_max"):
            raise ConfigError(
                f"model.label_pooling must be 'queries' or 'mean_max', got {self.label_pooling!r}"
            )
        if self.label_fit_steps < 0:
            raise ConfigError(f"model.label_fit_steps must be at least 0, got {self.label_fit_steps}")
        if self.label_fit_steps and (self.label_pooling != "mean_max" or self.label_loss_weight <= 0):
            raise ConfigError(
                "model.label_fit_steps fits the mean_max label read-out: it needs model.label_pooling=mean_max "
                "and model.label_loss_weight > 0"
            )
        if self.num_keywords < 1 and self.use_keywords:
            raise ConfigError("model.num_keywords must be positive when model.use_keywords is true")


@dataclass
class GenerationSettings:
    """``generation:`` section of the report stage config: how reports are decoded at inference and evaluation
    (saved with the head)."""

    beams: int = 3
    max_new_tokens: int = 0  # 0: model.max_length - 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    no_repeat_word_window: int = 0  # a word may not come back within this many tokens (0: off; NearRepeatBan)
    batch_size: int = 16

    def validate(self) -> None:
        if self.no_repeat_word_window < 0:
            raise ConfigError(
                f"config key 'generation.no_repeat_word_window' must be at least 0, got {self.no_repeat_word_window}"
            )
        if self.beams < 1:
            raise ConfigError(f"config key 'generation.beams' must be at least 1, got {self.beams}")
        if self.batch_size < 1:
            raise ConfigError(f"config key 'generation.batch_size' must be at least 1, got {self.batch_size}")


def decoding_rules(tokenizer: Any, generation: GenerationSettings) -> list[Any]:
    """The logits processors that ``generation`` asks for beyond ``generate()``'s own options."""
    window = generation.no_repeat_word_window
    return [NearRepeatBan(tokenizer, window)] if window else []


# ------------------------------------------------------------------------------------------- keywords


@dataclass
class KeywordHints:
    """The top-K keywords of each image as tensors: ``ids`` (B, K) long (0 = none), ``scores`` (B, K),
    ``boxes`` (B, K, 4) normalised x0, y0, x1, y1; ``words`` the same as strings (for explanations)."""

    ids: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    words: list[list[str]]

    def to(self, device: torch.device | str) -> KeywordHints:
        return KeywordHints(self.ids.to(device), self.scores.to(device), self.boxes.to(device), self.words)


def keyword_word(k: Any) -> str:
    """A keyword vocabulary entry or a ``Keyword`` result -> its word."""
    return k if isinstance(k, str) else str(k.word)


def keyword_hints(keywords: Sequence[Sequence[Any]], vocabulary: Sequence[str], top_k: int) -> KeywordHints:
    """AdaMatch's per-image keyword lists (objects with ``word``, ``score``, ``box``) -> :class:`KeywordHints`.

    Words outside ``vocabulary`` (the keyword vocabulary the head was trained with) are dropped.
    """
    index = {w: i + 1 for i, w in enumerate(vocabulary)}
    b = len(keywords)
    ids = torch.zeros(b, top_k, dtype=torch.long)
    scores = torch.zeros(b, top_k)
    boxes = torch.zeros(b, top_k, 4)
    words: list[list[str]] = []
    for i, kws in enumerate(keywords):
        kept = [k for k in kws if keyword_word(k) in index][:top_k]
        words.append([keyword_word(k) for k in kept])
        for j, k in enumerate(kept):
            ids[i, j] = index[keyword_word(k)]
            scores[i, j] = float(k.score)
            boxes[i, j] = torch.as_tensor(k.box, dtype=torch.float32).reshape(4)
    return KeywordHints(ids, scores, boxes, words)


def device_keyword_hints(top: TopKeywords, top_k: int) -> KeywordHints:
    """AdaMatch's :class:`TopKeywords` -> :class:`KeywordHints` on their device, with
    nothing read by the host (``words`` left empty): what :func:`keyword_hints` gives for the same keywords when
    the head's keyword vocabulary is the AdaMatch run's own, as in training (tested bit for bit)."""
    b, k = top.index.shape
    ids = top.index.new_zeros(b, top_k)
    scores = top.score.new_zeros(b, top_k, dtype=torch.float32)
    boxes = top.boxes.new_zeros(b, top_k, 4, dtype=torch.float32)
    ids[:, :k] = top.index + 1  # 0 = none
    scores[:, :k] = top.score.float()
    boxes[:, :k] = top.boxes.float()
    return KeywordHints(ids, scores, boxes, [[] for _ in range(b)])


# ----------------------------------------------------------------------------------------------- model


@dataclass
class DecodeOutput:
    """``sequences`` (B, L) generated token ids without BOS, padded with PAD after EOS; ``scores`` (B,)
    length-normalised log-probability (beam search's ``sequences_scores``; greedy: mean token log-prob)."""

    sequences: torch.Tensor
    scores: torch.Tensor


class ReportHead(nn.Module):
    """GPT-2 decoder cross-attending to [patches, memory responses, keyword hints]; see the module docstring.

    Args:
        cfg: head config.
        vocab_size, pad_id, bos_id, eos_id: from the report tokenizer.
        visual_dim: width D of AdaMatch's projected patch features.
        keyword_vocabulary: AdaMatch keyword words the hint embedding knows (index 0 is "none").
        adamatch: the AdaMatch model, or None when the caller passes precomputed patch features. Trained
            with the head when ``cfg.finetune_adamatch``, else frozen and kept in eval mode.
    """

    def __init__(
        self,
        cfg: ReportHeadConfig,
        *,
        vocab_size: int,
        visual_dim: int,
        keyword_vocabulary: Sequence[str],
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        unk_id: int = 3,
        adamatch: nn.Module | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual_dim = visual_dim
        self.keyword_vocabulary = list(keyword_vocabulary)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id
        e, dm = cfg.n_embd, cfg.memory.dim
        gpt_cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.max_length + 1,
            n_embd=e,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            add_cross_attention=True,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            # pad_token_id stays unset in the GPT-2 config (generate() gets it explicitly): finished beams are
            # padded after EOS, which would trip transformers' "input_ids may be padded" warning at every call.
        )
        self.decoder = GPT2LMHeadModel(gpt_cfg)
        self.patch_norm = nn.LayerNorm(visual_dim)
        self.patch_in = nn.Linear(visual_dim, dm)
        self.cond_out = nn.Linear(dm, e)
        self.box_embed = nn.Linear(4, e)
        self.type_embed = nn.Embedding(4 if (cfg.use_label_hints or cfg.label_states) else 3, e)
        self.cond_norm = nn.LayerNorm(e)
        if cfg.use_memory:
            self.memory = SharedMemory(cfg.memory)
            self.word_in = nn.Linear(e, dm) if e != dm else nn.Identity()
            self.word_out = nn.Linear(dm, e) if e != dm else nn.Identity()
            self.decoder.transformer.wte.register_forward_hook(self._word_memory_hook)
        if cfg.use_keywords:
            self.keyword_embed = nn.Embedding(len(self.keyword_vocabulary) + 1, e, padding_idx=0)
            self.keyword_geom = nn.Linear(5, e)
        if cfg.label_loss_weight > 0 or cfg.use_label_hints:
            if cfg.label_pooling == "mean_max":
                self.label_head = PooledLabels(visual_dim, NUM_LABELS)
            else:
                self.label_head = LabelQueries(e, NUM_LABELS)
        if cfg.label_states:
            self.label_embed = nn.Embedding(NUM_LABELS, e)
            self.state_embed = nn.Embedding(2, e)
            self.register_buffer("label_thresholds", torch.full((NUM_LABELS,), 0.5))
            self._state_bias: torch.Tensor | None = None
            if cfg.label_state_vector:
                # the positive states also as one vector added to every word embedding (self-attention sees them)
                self.state_vector = nn.Linear(NUM_LABELS, e)
                self.decoder.transformer.wte.register_forward_hook(self._state_hook)
        if cfg.use_label_hints:
            self.label_embed = nn.Embedding(NUM_LABELS, e)
            self.label_prob = nn.Linear(1, e)
        self.adamatch = adamatch
        if adamatch is not None and not cfg.finetune_adamatch:
            adamatch.requires_grad_(False)
            adamatch.eval()

    def train(self, mode: bool = True) -> ReportHead:
        super().train(mode)
        if self.adamatch is not None and not self.cfg.finetune_adamatch:
            self.adamatch.eval()  # frozen: no dropout / batch-norm updates
        return self

    # Word embeddings query the shared memory (also inside generate(), one new token per step).
    def _state_hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        bias = self._state_bias
        if bias is None:
            return output
        # beam search runs beams * B rows (each report's beams next to each other)
        return output + bias.repeat_interleave(output.shape[0] // bias.shape[0], dim=0).unsqueeze(1)

    def _word_memory_hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output + self.word_out(self.memory.respond(self.word_in(output)))

    def _word_embedder(self, rows: int):
        """The word embedding with its hooks, for ``rows`` rows decoded by :mod:`medvl.models.decoding`: the memory's
        answer to a word embedding depends on the word alone, so it is computed once per word and decode."""
        wte = self.decoder.transformer.wte

        def words(ids: torch.Tensor) -> torch.Tensor:
            x = F.embedding(ids, wte.weight)
            return self._word_memory_hook(wte, ids, x) if self.cfg.use_memory else x

        memo = TokenMemo(words, rows, wte.num_embeddings) if self.cfg.use_memory else words
        if not (self.cfg.label_states and self.cfg.label_state_vector):
            return memo
        return lambda ids: self._state_hook(wte, ids, memo(ids))

    def encode_conditions(
        self,
        patch_features: torch.Tensor,
        patch_boxes: torch.Tensor,
        keyword_ids: torch.Tensor | None = None,
        keyword_scores: torch.Tensor | None = None,
        keyword_boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """patch_features (B, P, D), patch_boxes (B, P, 4), keyword_* (B, K), (B, K), (B, K, 4)
        -> conditioning states (B, N, E) and their attention mask (B, N) long, N = P [+ P] [+ K] [+ 14]."""
        cond, mask, _ = self._conditions(
            patch_features, patch_boxes, keyword_ids, keyword_scores, keyword_boxes
        )
        # the state vector is meant only for the decoder call that follows _conditions in forward / generate
        self._state_bias = None
        return cond, mask

    def predict_labels(self, patch_features: torch.Tensor, patch_boxes: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, 14) of the CheXpert positives from the auxiliary label head."""
        if not hasattr(self, "label_head"):
            raise ValueError("this report head has no label head (model.label_loss_weight = 0)")
        return torch.sigmoid(
            self._label_logits(patch_features, self._patch_tokens(patch_features, patch_boxes)[0])
        )

    def _label_logits(self, patch_features: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.label_head, PooledLabels):
            return self.label_head(patch_features)
        return self.label_head(patch_tokens)[1]

    def label_calls(self, probs: torch.Tensor) -> torch.Tensor:
        """Label probabilities (B, 14) -> the head's calls (B, 14) long: 1 where probability >= the label's
        threshold (``label_thresholds``, set on the validation split)."""
        return (probs >= self.label_thresholds.to(probs.device)).long()

    def _patch_tokens(
        self, patch_features: torch.Tensor, patch_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.patch_in(self.patch_norm(patch_features.float()))  # (B, P, Dm)
        return self.cond_out(v) + self.box_embed(patch_boxes.float()) + self.type_embed.weight[_PATCH], v

    def _conditions(
        self, patch_features, patch_boxes, keyword_ids, keyword_scores, keyword_boxes, report_labels=None
    ):
        b, p, _ = patch_features.shape
        device = patch_features.device
        patch_tokens, v = self._patch_tokens(patch_features, patch_boxes)
        parts = [patch_tokens]
        masks = [torch.ones(b, p, dtype=torch.long, device=device)]
        label_logits = None
        if self.cfg.label_states:
            label_logits = self._label_logits(patch_features, patch_tokens)
            states = self.label_calls(torch.sigmoid(label_logits.detach()))
            if report_labels is not None and self.training:
                reference = (report_labels == 1).long()
                forced = torch.rand(states.shape, device=device) < self.cfg.label_teacher_forcing
                states = torch.where(forced, reference, states)
            parts.append(self.label_embed.weight + self.state_embed(states) + self.type_embed.weight[_LABEL])
            if self.cfg.label_state_vector:
                self._state_bias = self.state_vector(states.float())
            masks.append(torch.ones(b, NUM_LABELS, dtype=torch.long, device=device))
        elif hasattr(self, "label_head"):
            if isinstance(self.label_head, PooledLabels):
                label_logits = self.label_head(patch_features)
                pooled = patch_tokens.new_zeros(b, NUM_LABELS, patch_tokens.shape[-1])  # no per-label summary
            else:
                pooled, label_logits = self.label_head(patch_tokens)
            if self.cfg.use_label_hints:
                prob = torch.sigmoid(label_logits).unsqueeze(-1)  # (B, 14, 1)
                parts.append(
                    pooled + self.label_embed.weight + self.label_prob(prob) + self.type_embed.weight[_LABEL]
                )
                masks.append(torch.ones(b, NUM_LABELS, dtype=torch.long, device=device))
        if self.cfg.use_memory:
            parts.append(self.cond_out(self.memory.respond(v)) + self.type_embed.weight[_MEMORY])
            masks.append(masks[0])
        if self.cfg.use_keywords:
            if keyword_ids is None:
                raise ValueError(
                    "this report head was trained with keyword hints: pass keyword_ids/scores/boxes"
                )
            geom = torch.cat([keyword_boxes.float(), keyword_scores.float().unsqueeze(-1)], dim=-1)
            parts.append(
                self.keyword_embed(keyword_ids) + self.keyword_geom(geom) + self.type_embed.weight[_KEYWORD]
            )
            # An image with no known keyword still gets one (empty) hint slot so no row is fully masked.
            kmask = (keyword_ids > 0).long()
            kmask[:, 0] = 1
            masks.append(kmask)
        return self.cond_norm(torch.cat(parts, dim=1)), torch.cat(masks, dim=1), label_logits

    def image_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 1, S, S) in [-1024, 1024] -> AdaMatch patch features (B, P, D) and boxes (B, P, 4)."""
        if self.adamatch is None:
            raise ValueError("this report head holds no AdaMatch model; pass patch_features and patch_boxes")
        with torch.set_grad_enabled(self.cfg.finetune_adamatch and torch.is_grad_enabled()):
            patches = self.adamatch.encode_image(images)
        return patches.features, patches.boxes

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
        patch_boxes: torch.Tensor | None = None,
        keyword_ids: torch.Tensor | None = None,
        keyword_scores: torch.Tensor | None = None,
        keyword_boxes: torch.Tensor | None = None,
        report_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced pass. input_ids / attention_mask / labels (B, T) from :func:`encode_reports`;
        either ``images`` (B, 1, S, S) (fine-tuning AdaMatch) or precomputed ``patch_features`` (B, P, D)
        and ``patch_boxes`` (B, P, 4). ``report_labels`` (B, 14) CheXpert values of the reference report
        (1 positive; anything else negative) feed the auxiliary label loss when ``label_loss_weight > 0``.
        Returns ``{"loss": scalar (if labels), "lm_loss", ["label_loss"], "logits": (B, T, V)}``."""
        if patch_features is None:
            if images is None:
                raise ValueError("pass images or patch_features")
            patch_features, patch_boxes = self.image_patches(images)
        cond, cond_mask, label_logits = self._conditions(
            patch_features, patch_boxes, keyword_ids, keyword_scores, keyword_boxes, report_labels
        )
        try:
            out = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=cond,
                encoder_attention_mask=cond_mask,
                use_cache=False,
            )
        finally:
            self._state_bias = None
        result = {"logits": out.logits}
        if labels is not None:
            # Next-token cross-entropy: position t predicts token t + 1; padding labels are -100.
            logits, target = out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
            world = _training_world_size(self)
            if world > 1:
                # Data parallel: gradients are averaged over the processes, so each one divides its token sum by
                # the token count of the whole global batch (times the world size): the mean over every token, as
                # one process with the global batch computes it. A mean of per-process means would weigh the tokens
                # of a process with shorter reports more.
                total = (target != -100).sum().float()
                dist.all_reduce(total)
                lm = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") * world / total
            else:
                lm = F.cross_entropy(logits, target, ignore_index=-100)
            result["lm_loss"] = lm
            result["loss"] = lm
            if self.cfg.label_loss_weight > 0 and report_labels is not None:
                target = (report_labels == 1).float()  # uncertain / negative / blank = negative
                result["label_loss"] = F.binary_cross_entropy_with_logits(label_logits.float(), target)
                result["loss"] = lm + self.cfg.label_loss_weight * result["label_loss"]
        return result

    @torch.no_grad()
    def generate(
        self,
        *,
        patch_features: torch.Tensor,
        patch_boxes: torch.Tensor,
        keywords: KeywordHints | None = None,
        num_beams: int = 3,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 3,
        logits_processor: Sequence[Any] = (),
        use_cache: bool = True,
        static_cache: bool = False,
        engine: Literal["medvl", "transformers"] = "medvl",
    ) -> DecodeOutput:
        """Greedy (``num_beams=1``) or beam search from BOS: :mod:`medvl.models.decoding`, or transformers'
        ``generate()`` (see ``engine``), with the same sequences and scores.

        patch_features (B, P, D), patch_boxes (B, P, 4); ``keywords`` required when the head uses hints.
        ``max_new_tokens`` defaults to ``max_length - 1`` (so BOS + report fit the trained positions).
        ``static_cache`` (for a GPU): a preallocated self-attention cache, with which transformers compiles the
        decoding step on CUDA; attention runs over the preallocated length (masked), so scores may differ from the
        default in the last bits (on the CPU it only preallocates). ``logits_processor``: extra rules for
        ``generate()``, e.g. :class:`~medvl.models.report_tokenizer.NearRepeatBan`. ``engine``: decoding with the
        cache runs in :mod:`medvl.models.decoding` (same sequences and scores, a fraction of the overhead) unless
        ``"transformers"`` asks for ``generate()``; cache-free and static-cache decoding always use ``generate()``.
        """
        was_training = self.training
        self.eval()
        try:
            kw = keywords.to(patch_features.device) if keywords is not None else None
            cond, cond_mask, _ = self._conditions(
                patch_features,
                patch_boxes,
                kw.ids if kw else None,
                kw.scores if kw else None,
                kw.boxes if kw else None,
            )
            limit = self.cfg.max_length - 1
            max_new = min(max_new_tokens or limit, limit)
            seqs, scores = decode(
                self.decoder,
                cond,
                cond_mask,
                num_beams=num_beams,
                bos=self.bos_id,
                eos=self.eos_id,
                pad=self.pad_id,
                suppress_tokens=[self.pad_id, self.bos_id, self.unk_id],
                max_new_tokens=max_new,
                min_new_tokens=min(min_new_tokens, max_new),
                length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                logits_processor=logits_processor,
                use_cache=use_cache,
                static_cache=static_cache,
                engine=engine,
                embedder=self._word_embedder,
            )
            return DecodeOutput(sequences=seqs, scores=scores)
        finally:
            self._state_bias = None
            self.train(was_training)


def _training_world_size(module: nn.Module) -> int:
    """The number of data-parallel processes when ``module`` trains with gradients inside a process group, else 1
    (validation runs on one process: it must not wait for the others)."""
    if module.training and torch.is_grad_enabled() and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1

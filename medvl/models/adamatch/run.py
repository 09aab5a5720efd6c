"""The AdaMatch inference API that the report and diffusion heads, evaluation and explanations use.

``AdaMatchRun.from_pretrained(directory)`` -> ``.model``, ``.tokenizer``, ``.keywords``, ``.keypatch_bank``,
``.tokenize(texts)``, ``.image_keywords(images, top_k)``, ``.report_keypatches(texts, top_k)``, ``.embed_dim``.
Saved as one component (:mod:`medvl.models.pretrained`), ``RUN/adamatch/``::

    config.json           format medvl.adamatch, the resolved model config
    model.safetensors     the model's weights
    text_encoder/         the text encoder as a Hugging Face folder of its own (config, weights, tokenizer files;
                          ``transformers.AutoModel.from_pretrained`` reads it); medvl reads its config only
    tokenizer/            the WordPiece tokenizer (Hugging Face files + medvl_tokenizer.json)
    keywords/             the keyword vocabulary (config.json + model.safetensors)
    keypatches/           the keypatch bank (config.json + model.safetensors)

Later stages copy that folder into their own runs (:func:`medvl.models.pretrained.copy_component`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from medvl.config import from_dict, to_dict
from medvl.errors import InvalidImageError, InvalidReportError, RunError
from medvl.models.adamatch.encoders import TextEncoder
from medvl.models.adamatch.mining import KeypatchBank, KeywordVocabulary
from medvl.models.adamatch.model import AdaMatch, AdaMatchConfig, TextTokens
from medvl.models.adamatch.patches import ImagePatches
from medvl.models.pretrained import component_dir, load_weights, read_config, save_weights, write_config
from medvl.text.tokenizer import ReportTokenizer

__all__ = ["Keyword", "Keypatches", "TopKeywords", "AdaMatchRun"]

TEXT_ENCODER_DIR = "text_encoder"
TOKENIZER_DIR = "tokenizer"


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
    ``entries`` (B, K) int64 their positions in the bank (crops for display: ``KeypatchBank.crops(entries, data)``
    with the prepared dataset the bank was mined from)."""

    features: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    words: list[list[str]]
    entries: torch.Tensor


@dataclass
class TopKeywords:
    """Each image's top keywords as device tensors (:meth:`AdaMatchRun.top_keywords`): ``index`` (B, k) into the
    run's keyword vocabulary, ``score`` (B, k) the z-scored best-patch cosine they are ranked by, ``similarity``
    (B, k) that cosine, ``patch`` (B, k) the best patch, ``boxes`` (B, k, 4) its box."""

    index: torch.Tensor
    score: torch.Tensor
    similarity: torch.Tensor
    patch: torch.Tensor
    boxes: torch.Tensor


class AdaMatchRun:
    """A trained AdaMatch model with its tokenizer, keyword vocabulary and keypatch bank (inference only)."""

    FORMAT: ClassVar[str] = "medvl.adamatch"
    DIRNAME: ClassVar[str] = "adamatch"

    def __init__(
        self,
        model: AdaMatch,
        tokenizer: ReportTokenizer,
        keywords: KeywordVocabulary | None = None,
        keypatch_bank: KeypatchBank | None = None,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.keywords = keywords
        self.keypatch_bank = keypatch_bank
        if keywords is not None:
            self._kw_emb = keywords.embeddings.to(self.device)
        if keypatch_bank is not None:
            # on the run's device once (a report's keypatches index them; copying the bank per call cost a step)
            self._bank_features = keypatch_bank.features.to(self.device)
            self._bank_boxes = keypatch_bank.boxes.to(self.device)
            self._bank_norm = F.normalize(self._bank_features.float(), dim=-1)

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
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the component to ``directory`` (a run's ``adamatch/``, see the module docstring); returns it."""
        out = Path(directory)
        cfg = to_dict(self.model.cfg)
        cfg["backbone"]["weights"] = None  # the weights below replace the initial file
        cfg["text"]["pretrained"] = None
        write_config(out, self.FORMAT, cfg)
        save_weights(out, self.model.state_dict())
        self.model.text_encoder.save_pretrained(out / TEXT_ENCODER_DIR, tokenizer=self.tokenizer.hf)
        self.tokenizer.save_pretrained(out / TOKENIZER_DIR)
        if self.keywords is not None:
            self.keywords.save_pretrained(out / KeywordVocabulary.DIRNAME)
        if self.keypatch_bank is not None:
            self.keypatch_bank.save_pretrained(out / KeypatchBank.DIRNAME)
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", *, trust_remote_code: bool = False
    ) -> AdaMatchRun:
        """Load the component at ``directory`` (or ``directory/adamatch/`` when ``directory`` is a run).

        A text encoder that ships its own model code is loaded only with ``trust_remote_code=True`` (or
        ``MEDVL_TRUST_REMOTE_CODE=1``): the flag saved in the run's config is not read for that."""
        art = component_dir(directory, cls.DIRNAME)
        meta = read_config(
            art, cls.FORMAT, what="AdaMatch model", hint="train one with `medvl train adamatch`"
        )
        cfg = from_dict(AdaMatchConfig, meta["config"])
        tokenizer = ReportTokenizer.from_pretrained(art / TOKENIZER_DIR)
        model = AdaMatch(
            cfg,
            TextEncoder.from_saved_config(
                art / TEXT_ENCODER_DIR, cfg.embed_dim, cfg.text.lexical, trust_remote_code
            ),
        )
        missing, unexpected = model.load_state_dict(load_weights(art), strict=False)
        if missing or unexpected:
            raise RunError(
                f"{art}/model.safetensors does not match its config: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        kw_dir = art / KeywordVocabulary.DIRNAME
        keywords = KeywordVocabulary.from_pretrained(kw_dir) if kw_dir.is_dir() else None
        bank_dir = art / KeypatchBank.DIRNAME
        bank = KeypatchBank.from_pretrained(bank_dir) if bank_dir.is_dir() else None
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
            warnings.warn(
                "images look like [0, 1] or [0, 255] pixels (no negative value); medvl expects "
                "[-1024, 1024] with dark lungs (medvl.data.read_xray gives that)",
                stacklevel=3,
            )
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
    def top_keywords(self, patches: ImagePatches, top_k: int = 5) -> TopKeywords:
        """The ``top_k`` keywords of each image, on the device (nothing is read by the host).

        For each keyword the best patch (max cosine) is found; keywords are ranked by that cosine z-scored
        against training images (so words present in every report do not always win)."""
        if self.keywords is None or not len(self.keywords):
            raise RunError("this run has no keyword vocabulary")
        sim = F.normalize(patches.features, dim=-1) @ self._kw_emb.t()  # (B, P, K)
        best, where = sim.max(1)  # (B, K)
        z = (best - self.keywords.mean.to(best)) / self.keywords.std.to(best)
        top = z.topk(min(top_k, z.shape[1]), dim=1)
        at = where.gather(1, top.indices)  # (B, k) each keyword's best patch
        boxes = patches.boxes.gather(1, at.unsqueeze(-1).expand(-1, -1, patches.boxes.shape[-1]))
        return TopKeywords(top.indices, top.values, best.gather(1, top.indices), at, boxes)

    @torch.no_grad()
    def image_keywords(
        self, images, top_k: int = 5, patches: ImagePatches | None = None
    ) -> list[list[Keyword]]:
        """Ranked keywords per image with the box of each keyword's best patch (:meth:`top_keywords`, read by
        the host once per batch)."""
        if self.keywords is None or not len(self.keywords):
            raise RunError("this run has no keyword vocabulary")
        if patches is None:
            patches = self.encode_images(images)
        top = self.top_keywords(patches, top_k)
        values, kws, at, cosines, boxes = (
            t.tolist() for t in (top.score, top.index, top.patch, top.similarity, top.boxes)
        )
        return [
            [
                Keyword(self.keywords.words[kw], float(z_), float(cos), tuple(float(v) for v in box), p)
                for z_, kw, p, cos, box in zip(values[b], kws[b], at[b], cosines[b], boxes[b], strict=True)
            ]
            for b in range(len(values))
        ]

    @torch.no_grad()
    def report_keypatches(
        self, texts: Sequence[str], top_k: int = 8, encoded: TextTokens | None = None, words: bool = True
    ) -> Keypatches:
        """Top ``top_k`` bank patches per report by their best cosine with the report's affirmed words.
        ``encoded``: :meth:`encode_reports` of ``texts`` when the caller has it already (not encoded again).
        ``words=False`` leaves ``words`` empty and ``entries`` on the device: nothing is read by the host (the
        diffusion stage's training step, which needs only the patches)."""
        bank = self.keypatch_bank
        if bank is None or not len(bank):
            raise RunError("this run has no keypatch bank")
        tok = self.encode_reports(texts) if encoded is None else encoded
        txt = F.normalize(tok.features, dim=-1)
        sim = torch.einsum("btd,nd->btn", txt, self._bank_norm)  # (B, T, N)
        sim = sim.masked_fill(~tok.match_mask.unsqueeze(-1), -2.0).amax(1)  # (B, N)
        k = min(top_k, sim.shape[1])
        scores, idx = sim.topk(k, dim=1)
        features, boxes = self._bank_features[idx], self._bank_boxes[idx]
        if not words:
            return Keypatches(features, boxes, scores, words=[], entries=idx)
        entries = idx.cpu()
        names = [
            [self.keywords.words[int(bank.word_index[i])] if self.keywords else "" for i in row]
            for row in entries.tolist()
        ]
        return Keypatches(features, boxes, scores, words=names, entries=entries)

"""Keywords and keypatches mined from a trained AdaMatch model and its training split.

:class:`KeywordVocabulary`: keywords (affirmed content words of training reports by document frequency, plus the
labeler's positive head words) with their embeddings and calibration statistics. :class:`KeypatchBank`: for each
keyword, the best-matching training patches (features and boxes; no pixels, no scan ids). Both are saved components
(:mod:`medvl.models.pretrained`), kept under the AdaMatch folder (``adamatch/keywords/``, ``adamatch/keypatches/``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medvl.data.prepared import PreparedDataset
from medvl.errors import DataError, InvalidReportError
from medvl.models.adamatch.model import AdaMatch
from medvl.models.pretrained import load_weights, read_config, save_weights, write_config
from medvl.text.labeler import extract_mentions
from medvl.text.tokenizer import ReportTokenizer

__all__ = [
    "KeywordVocabulary",
    "KeypatchBank",
    "MiningConfig",
    "crop_boxes",
    "mine_vocabulary",
    "split_fingerprint",
    "build_keywords_and_bank",
]


@dataclass
class KeywordVocabulary:
    """Keywords mined from training reports with their embeddings (K, D) L2-normalised, and the mean
    and std (K,) of each keyword's best-patch cosine over training images (for calibration)."""

    FORMAT: ClassVar[str] = "medvl.keywords"
    DIRNAME: ClassVar[str] = "keywords"

    words: list[str]
    counts: list[int]
    embeddings: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.words)

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` (words, counts) and ``model.safetensors`` (embeddings, mean, std); returns the folder."""
        directory = Path(directory)
        write_config(directory, self.FORMAT, words=self.words, counts=self.counts)
        save_weights(directory, {"embeddings": self.embeddings, "mean": self.mean, "std": self.std})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> KeywordVocabulary:
        meta = read_config(directory, cls.FORMAT, what="keyword vocabulary")
        t = load_weights(directory, device)
        return cls(meta["words"], meta["counts"], t["embeddings"], t["mean"], t["std"])


def split_fingerprint(dicom_ids: Sequence[str]) -> str:
    """SHA-256 of a split's scan ids in order: tells whether a prepared dataset is the one a bank was mined from,
    without naming any scan."""
    digest = hashlib.sha256()
    for d in dicom_ids:
        digest.update(str(d).encode("utf-8") + b"\n")
    return digest.hexdigest()


@dataclass
class KeypatchBank:
    """Best-matched training patches per keyword: ``features`` (N, D) (patch space, not normalised),
    ``boxes`` (N, 4) normalised x0, y0, x1, y1, ``scores`` (N,) word-patch cosine, ``word_index`` (N,) into the
    keyword list, ``rows`` (N,) the position of each patch's scan in the training split it was mined from.

    No pixels and no scan ids: a run directory may hold the bank without holding any of the training data. The
    crops are cut at display time from that prepared dataset (:meth:`source_scans`, :meth:`crops`), which
    ``data_fingerprint`` (:func:`split_fingerprint` of its training split) recognises."""

    FORMAT: ClassVar[str] = "medvl.keypatches"
    DIRNAME: ClassVar[str] = "keypatches"
    SPLIT: ClassVar[str] = "train"

    features: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    word_index: torch.Tensor
    rows: torch.Tensor | None  # None: a bank saved by an older medvl (its crops are no longer read)
    data_fingerprint: str = ""
    crop_size: int = 32

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` (the training split's fingerprint, the crop size) and ``model.safetensors`` (features,
        boxes, scores, word_index, rows); returns the folder."""
        directory = Path(directory)
        write_config(directory, self.FORMAT, data_fingerprint=self.data_fingerprint, crop_size=self.crop_size)
        tensors = {
            "features": self.features,
            "boxes": self.boxes,
            "scores": self.scores,
            "word_index": self.word_index,
        }
        if self.rows is not None:
            tensors["rows"] = self.rows
        save_weights(directory, tensors)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> KeypatchBank:
        meta = read_config(directory, cls.FORMAT, what="keypatch bank")
        t = load_weights(directory, device)
        return cls(
            t["features"],
            t["boxes"],
            t["scores"],
            t["word_index"],
            t.get("rows"),
            str(meta.get("data_fingerprint", "")),
            int(meta.get("crop_size", 32)),
        )

    def source_scans(self, entries: Sequence[int], data: str | Path) -> list[np.ndarray]:
        """The training scans (S, S) in [-1024, 1024] that bank ``entries`` were cut from, read from the prepared
        dataset ``data``; :class:`DataError` when ``data`` is not the dataset the bank was mined from."""
        if self.rows is None or not self.data_fingerprint:
            raise DataError("this keypatch bank was saved by an older medvl and names no training scans")
        ds = PreparedDataset(data, self.SPLIT)
        if split_fingerprint(ds.index["dicom_id"].astype(str).tolist()) != self.data_fingerprint:
            raise DataError(
                f"{data} is not the prepared dataset this keypatch bank was mined from (its training split "
                "differs); pass the --data the AdaMatch run was trained on"
            )
        return [ds.image(int(self.rows[int(e)])) for e in entries]

    def crops(self, entries: Sequence[int], data: str | Path, size: int | None = None) -> torch.Tensor:
        """(n, size, size) uint8 crops of bank ``entries`` cut from ``data`` (see :meth:`source_scans`), at
        ``crop_size`` unless ``size`` is given."""
        entries = [int(e) for e in entries]
        if not entries:
            c = size or self.crop_size
            return torch.zeros(0, c, c, dtype=torch.uint8)
        scans = torch.from_numpy(np.stack(self.source_scans(entries, data))).float()[:, None]
        return crop_boxes(scans, self.boxes[entries].float().cpu(), size or self.crop_size)


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
    crop_size: int = 32  # side of the crops cut for display (KeypatchBank.crops); the bank stores no pixels
    batch_size: int = 32


def mine_vocabulary(
    tokenizer: ReportTokenizer, reports: Sequence[str], cfg: MiningConfig
) -> list[tuple[str, int]]:
    """Keywords: affirmed content words of training reports by document frequency, plus the head words of
    the labeler's positive mentions (kept even when rarer than ``min_count``)."""
    counts: Counter[str] = Counter()
    heads: set[str] = set()
    for start in range(0, len(reports), 256):
        batch = list(reports[start : start + 256])
        enc = tokenizer.encode(batch)
        for words in enc.words:
            counts.update(
                {
                    w.text.lower()
                    for w in words
                    if w.content and not w.negated and w.text.isalpha() and len(w.text) >= cfg.min_length
                }
            )
    for text in reports:
        for m in extract_mentions(text):
            if m.head and float(m.value) == 1.0 and str(m.head).isalpha():
                heads.add(str(m.head).lower())
    ranked = [(w, c) for w, c in counts.most_common() if c >= cfg.min_count or (w in heads and c > 0)]
    ranked = sorted(ranked, key=lambda wc: (wc[0] not in heads, -wc[1], wc[0]))[: cfg.vocab_size]
    return sorted(ranked, key=lambda wc: (-wc[1], wc[0]))


@torch.no_grad()
def build_keywords_and_bank(
    model: AdaMatch,
    tokenizer: ReportTokenizer,
    dataset,
    cfg: MiningConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[KeywordVocabulary, KeypatchBank]:
    """Mine the keyword vocabulary and the keypatch bank from a training split (``PreparedDataset``-like).

    Keyword embeddings are the mean of the keyword's affirmed, in-context word features over the
    training reports; the bank holds, for each affirmed keyword occurrence, the best-matching patch of
    the paired image, keeping the ``bank_per_word`` best per keyword.
    """
    model.eval()
    reports = (
        [dataset[i]["report"] for i in range(len(dataset))]
        if not hasattr(dataset, "index")
        else list(dataset.index["report"])
    )
    vocab = mine_vocabulary(tokenizer, reports, cfg)
    if not vocab:
        raise InvalidReportError(
            "no keyword occurs often enough in the training reports (keywords.min_count)"
        )
    word_to_id = {w: i for i, (w, _) in enumerate(vocab)}
    k, d = len(vocab), model.embed_dim
    emb_sum = torch.zeros(k, d)
    emb_n = torch.zeros(k)
    cand: dict[str, list] = {"feat": [], "box": [], "score": [], "word": [], "row": []}
    split_ids: list[str] = []
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
                cand["row"].append(start + b)
        split_ids.extend(str(x["dicom_id"]) for x in items)
        patch_cache.append(pn.cpu())
    embeddings = F.normalize(emb_sum / emb_n.clamp_min(1).unsqueeze(-1), dim=-1)
    for pn in patch_cache:
        img_best.append((pn @ embeddings.t()).amax(1))  # (b, K)
    best = torch.cat(img_best)
    vocab_out = KeywordVocabulary(
        [w for w, _ in vocab],
        [c for _, c in vocab],
        embeddings,
        best.mean(0),
        best.std(0).clamp_min(1e-4) if best.shape[0] > 1 else torch.ones(k),
    )
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
    bank = KeypatchBank(
        torch.stack(cand["feat"])[keep_idx],
        torch.stack(cand["box"])[keep_idx],
        scores[keep_idx],
        words[keep_idx],
        torch.tensor(cand["row"], dtype=torch.long)[keep_idx],
        split_fingerprint(split_ids),
        cfg.crop_size,
    )
    return vocab_out, bank

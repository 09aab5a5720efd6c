"""The report head's word-level tokenizer: trained on the training reports, reports to ids and ids back to text.

Normalisation NFKC and lowercase; words and punctuation marks are tokens ("effusion." is ``effusion``, ``.``);
ids 0-3 are ``[PAD] [BOS] [EOS] [UNK]``. Saved with the head (``report_head/tokenizer/``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LogitsProcessor, PreTrainedTokenizerFast

__all__ = [
    "PAD",
    "BOS",
    "EOS",
    "UNK",
    "SPECIAL_TOKENS",
    "build_report_tokenizer",
    "detokenize",
    "encode_reports",
    "decode_sequences",
    "NearRepeatBan",
]

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def build_report_tokenizer(
    texts: Sequence[str], *, min_freq: int = 2, max_vocab: int = 4000
) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on report texts.

    Normalisation: NFKC, lowercase. Pre-tokenisation: runs of word characters and runs of punctuation
    (``tokenizers``' ``Whitespace``), so "effusion." is ``effusion``, ``.``. Words seen fewer than
    ``min_freq`` times map to ``[UNK]``. Ids 0-3 are ``[PAD] [BOS] [EOS] [UNK]``.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("cannot build a report tokenizer from no report text")
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_vocab, min_frequency=min_freq, special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


_SPACE_BEFORE = re.compile(r"\s+([.,;:!?%)])")
_SPACE_AFTER = re.compile(r"([(])\s+")
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")


def detokenize(tokens: Sequence[str]) -> str:
    """Word-level tokens -> readable report text (punctuation attached, sentences capitalised)."""
    words = [t for t in tokens if t not in SPECIAL_TOKENS]
    text = " ".join(words)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = re.sub(r"\s*-\s*", "-", text)
    text = re.sub(r"(\d)\. (\d)", r"\1.\2", text)  # "3 . 5 cm" -> "3.5 cm"
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text).strip()


def encode_reports(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Reports -> ``input_ids`` (B, T) = [BOS] words [EOS] [PAD]..., ``attention_mask`` (B, T), ``labels``
    (B, T) with -100 on padding. Reports longer than ``max_length`` are cut (and then carry no EOS)."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [([bos] + ids + [eos])[:max_length] for ids in enc]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    attention_mask = (torch.arange(length)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def decode_sequences(
    tokenizer: PreTrainedTokenizerFast, sequences: torch.Tensor, eos_id: int
) -> tuple[list[str], list[list[str]]]:
    """Generated ids (B, L) -> report texts and their word tokens (stopping at the first EOS)."""
    texts, token_lists = [], []
    for row in sequences.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        tokens = [t for t in tokenizer.convert_ids_to_tokens(row) if t not in SPECIAL_TOKENS]
        token_lists.append(tokens)
        texts.append(detokenize(tokens))
    return texts, token_lists


class NearRepeatBan(LogitsProcessor):
    """A decoding rule: a word may not come back within ``window`` tokens of itself, so "pneumothorax, or
    pneumothorax" cannot be written (the n-gram block only stops repeated n-grams). Tokens without a letter
    (punctuation, numbers), the redaction mark "xxxx" and the special tokens are exempt."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, window: int):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.bannable = torch.zeros(len(tokenizer), dtype=torch.bool)
        for token, i in tokenizer.get_vocab().items():
            if token not in SPECIAL_TOKENS and token != "xxxx" and any(c.isalpha() for c in token):
                self.bannable[i] = True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        recent = input_ids[:, -self.window :]
        seen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, recent, True)
        return scores.masked_fill(seen & self.bannable.to(scores.device), float("-inf"))

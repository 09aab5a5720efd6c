"""Report tokenisation for AdaMatch: a WordPiece tokenizer plus word-level masks.

AdaMatch matches image patches with report *words*, not WordPiece pieces. This module

* trains a WordPiece tokenizer on training reports (``tokenizers``), wrapped as a Hugging Face
  :class:`~transformers.PreTrainedTokenizerFast` so that every run saves it with
  ``save_pretrained`` and reloads it offline; or loads the tokenizer of any local Hugging Face
  model directory (never the hub);
* maps pieces to words with the fast tokenizer's ``word_ids`` (a word is what the BERT
  pre-tokenizer yields: a run of letters/digits, or one punctuation mark);
* marks each word as stop word, punctuation or *negated* (inside a negated mention, e.g. the
  "pleural effusion" of "no pleural effusion"), and caps the number of content words per report.

Decision: a word's feature is the **mean of its pieces'**
features (done in :class:`medvl.models.adamatch.encoders.TextEncoder`); the masks mark the word's **first
piece** only, so each word counts once in the loss while every piece carries the pooled feature.

Masks returned by :meth:`ReportTokenizer.__call__` (all ``(B, T)``):

* ``word_ids``: word index of each piece within its report, ``-1`` for special tokens and padding;
* ``word_mask``: first piece of a content word (not stop word, not punctuation), within the cap.
  Used by the image-to-report score (each patch looks for its best word);
* ``match_mask``: ``word_mask`` and not negated. Used by the report-to-image score (each real,
  affirmed word looks for its best patch), the keyword miner and the pointing game;
* ``word_weight`` (float): the word's inverse document frequency over the training reports at its
  first piece (0 elsewhere), as BERTScore weights its greedy token matching: "heart", "lungs" and
  "clear" are in most reports and say little about *this* image; "granulomas" says a lot.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from medvl.errors import ConfigError, InvalidReportError
from medvl.text.labeler import report_mentions

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_META = "medvl_tokenizer.json"

#: Function words and report filler that carry no location: left out of the matching.
#: Negation cues ("no", "not", "without", ...) are here too. "xxxx" is IU X-ray's de-identification mark.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a an the and or nor but if then than so as at by for from in into of off on onto to up with within
    is are was were be been being am has have had having do does did doing will would shall should can could
    may might must this that these those there here it its it's they them their we our you your he she his her
    i me my which who whom whose what when where why how all any both each few more most other some such only
    own same too very just also again further once about above below over under between through during before
    after while until because per via vs versus
    no not without none neither negative free absent absence nothing never cannot
    seen noted identified demonstrated present appears appear appearing seems visualized evidence
    please see xxxx x
    """.split()
)


@lru_cache(maxsize=65536)
def _negated_spans_cached(text: str) -> tuple[tuple[int, int], ...]:
    return tuple((int(m.start), int(m.end)) for m in report_mentions(text) if float(m.value) == 0.0)


def negated_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``text`` that lie inside negated mentions.

    Uses medvl's labeler (:func:`medvl.text.labeler.extract_mentions`): the phrase span of each negated
    mention (value 0), the same labeler that decides what IU-Phantom draws. Cue words ("no", "without")
    are stop words, so they are out of the matching anyway. Without the labeler, a NegEx-style fallback
    (cue to the end of the clause) gives the same kind of spans. Cached: training reports repeat every epoch.
    """
    return list(_negated_spans_cached(text))


def train_wordpiece(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2):
    """Train a lower-casing WordPiece tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InvalidReportError("cannot train a tokenizer: no non-empty training reports")
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer creates each "##c" piece when it first meets c inside a word while walking a hash map, so the
    # pieces' ids, and through them the tie-breaks between equally frequent merges, change from run to run
    # (huggingface/tokenizers#1794): the same reports gave vocabularies differing in ~250 of 2,000 ids, which
    # broke same-seed reproducibility and made a resumed run (or another DDP rank) retrain a different tokenizer.
    # Registering every "##c" up front, in sorted order, leaves nothing to the hash order.
    inner = sorted(
        {
            c
            for t in texts
            for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))
            for c in w[1:]
        }
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in inner)],
        show_progress=False,
    )
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer, trained.pre_tokenizer = normalizer, pre_tokenizer
    trained.train_from_iterator(texts, trainer)
    # The same vocabulary in a fresh model, so that only the real special tokens are special.
    tok = Tokenizer(
        models.WordPiece(vocab=trained.get_vocab(), unk_token="[UNK]", continuing_subword_prefix="##")
    )
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def load_hf_tokenizer(path: str | Path):
    """A fast tokenizer from a local directory (never the hub)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist (only local directories are read)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a tokenizer from {path}: {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"the tokenizer in {path} is not a fast tokenizer; word alignment needs one")
    if tok.pad_token is None:
        raise ConfigError(f"the tokenizer in {path} has no padding token")
    return tok


@dataclass
class Word:
    """One word of a report as the matcher sees it."""

    text: str
    start: int  # character span in the report
    end: int
    stop: bool
    punct: bool
    negated: bool

    @property
    def content(self) -> bool:
        return not (self.stop or self.punct)


@dataclass
class TokenizedReports:
    """Tensors ``(B, T)`` for the encoder plus each report's words (index = ``word_ids`` value)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: torch.Tensor
    word_mask: torch.Tensor
    match_mask: torch.Tensor
    word_weight: torch.Tensor
    words: list[list[Word]]
    word_key: torch.Tensor  # (B, T) int64: word_key_id at each content word's first piece, else 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "word_ids": self.word_ids,
            "word_mask": self.word_mask,
            "match_mask": self.match_mask,
            "word_weight": self.word_weight,
        }


def _is_punct(word: str) -> bool:
    return not any(ch.isalnum() for ch in word)


class ReportTokenizer:
    """A fast Hugging Face tokenizer plus the word-level masks AdaMatch needs.

    ``max_tokens`` truncates pieces; ``max_words`` caps content words per report (the prototype's
    lesson: the batch x batch x patches x words similarity grows with words).
    """

    def __init__(
        self,
        tokenizer,
        max_tokens: int = 128,
        max_words: int = 64,
        idf: dict[str, float] | None = None,
        idf_default: float = 1.0,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("ReportTokenizer needs a fast tokenizer (word alignment uses word_ids)")
        self.hf = tokenizer
        self.max_tokens = int(max_tokens)
        self.max_words = int(max_words)
        self.idf: dict[str, float] = dict(idf or {})
        self.idf_default = float(idf_default)  # words unseen in training: as rare as the rarest

    def fit_idf(self, texts: Sequence[str], floor: float = 0.1) -> None:
        """Smoothed inverse document frequency ``log((N + 1) / (df + 1))`` of each lower-cased word of
        ``texts`` (floored at ``floor`` so ubiquitous words still count a little). A report counts for a
        word only where the word is affirmed: "effusion" is in most reports, nearly always as "no effusion",
        and the weight is for the report-to-image score, which sees affirmed words only."""
        df: Counter[str] = Counter()
        n = 0
        for text in texts:
            if text and text.strip():
                n += 1
                df.update({w.text.lower() for w in content_words(text) if w.content and not w.negated})
        self.idf = {w: max(floor, math.log((n + 1) / (c + 1))) for w, c in df.items()}
        self.idf_default = max(floor, math.log(n + 1))

    def weight(self, word: str) -> float:
        return self.idf.get(word.lower(), self.idf_default) if self.idf else 1.0

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    def encode(self, texts: Sequence[str]) -> TokenizedReports:
        """Tokenise a batch of reports. Empty reports raise :class:`InvalidReportError`."""
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidReportError(f"report {i} is empty")
        enc = self.hf(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
            return_offsets_mapping=True,
        )
        b, t = enc["input_ids"].shape
        word_ids = torch.full((b, t), -1, dtype=torch.long)
        word_mask = torch.zeros((b, t), dtype=torch.bool)
        match_mask = torch.zeros((b, t), dtype=torch.bool)
        word_weight = torch.zeros((b, t), dtype=torch.float32)
        word_key = torch.zeros((b, t), dtype=torch.long)
        all_words: list[list[Word]] = []
        for i, text in enumerate(texts):
            spans = negated_spans(text)
            ids = enc.word_ids(i)
            words: list[Word] = []
            seen: dict[int, int] = {}
            n_content = 0
            for pos, wid in enumerate(ids):
                if wid is None:
                    continue
                if wid not in seen:
                    cs = enc.word_to_chars(i, wid)
                    raw = text[cs.start : cs.end]
                    low = raw.lower()
                    neg = any(a <= cs.start < e for a, e in spans)
                    w = Word(raw, cs.start, cs.end, stop=low in STOP_WORDS, punct=_is_punct(raw), negated=neg)
                    seen[wid] = len(words)
                    words.append(w)
                    if w.content and n_content < self.max_words:
                        n_content += 1
                        word_mask[i, pos] = True
                        match_mask[i, pos] = not neg
                        word_weight[i, pos] = self.weight(low)
                        word_key[i, pos] = word_key_id(low)
                word_ids[i, pos] = seen[wid]
            all_words.append(words)
        return TokenizedReports(
            enc["input_ids"],
            enc["attention_mask"],
            word_ids,
            word_mask,
            match_mask,
            word_weight,
            all_words,
            word_key,
        )

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``dict(input_ids, attention_mask, word_ids, word_mask, match_mask, word_weight)``, each ``(B, T)``."""
        return self.encode(texts).tensors()

    def save_pretrained(self, directory: str | Path) -> Path:
        """The Hugging Face tokenizer files and ``medvl_tokenizer.json`` (caps, idf weights); returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        (directory / TOKENIZER_META).write_text(
            json.dumps(
                {
                    "max_tokens": self.max_tokens,
                    "max_words": self.max_words,
                    "idf_default": self.idf_default,
                    "idf": dict(sorted(self.idf.items())),
                },
                indent=0,
            )
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ReportTokenizer:
        """What :meth:`save_pretrained` wrote (or any local Hugging Face tokenizer folder: default caps, no idf)."""
        directory = Path(directory)
        meta_path = directory / TOKENIZER_META
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return cls(load_hf_tokenizer(directory), **meta)


# Suffix rewrites that map a finding word's forms onto one stem, tried in order (the first that applies wins):
# granulomatous / granulomata -> granuloma, emphysematous -> emphysema, opacities -> opacity,
# atelectatic -> atelectasis. Then a plural "s" goes (not from -ss, -is, -us: mass, atelectasis, hiatus).
_STEM_REWRITES = (("atous", "a"), ("ata", "a"), ("ies", "y"), ("atic", "asis"), ("sses", "ss"))


def word_stem(word: str) -> str:
    """The stem that pools a report word's forms (``granuloma``, ``granulomas``, ``granulomatous``;
    ``opacity``, ``opacities``; ``effusion``, ``effusions``): lower-cased, a few suffix rewrites, no plural "s".
    Only forms of one word meet; it is a key, not a linguistic stem."""
    w = word.lower()
    for suffix, repl in _STEM_REWRITES:
        if w.endswith(suffix) and len(w) - len(suffix) >= 2:
            return w[: -len(suffix)] + repl
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "is", "us")):
        return w[:-1]
    return w


def word_key_id(word: str) -> int:
    """A positive int64 id of :func:`word_stem` (CRC-32 + 1: stable across processes and runs, never 0)."""
    return zlib.crc32(word_stem(word).encode()) + 1


def content_words(text: str) -> list[Word]:
    """Words of ``text`` by a plain regex split (no tokenizer): for mining keywords and tests."""
    spans = negated_spans(text)
    words = []
    for m in re.finditer(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", text):
        raw = m.group()
        words.append(
            Word(
                raw,
                m.start(),
                m.end(),
                stop=raw.lower() in STOP_WORDS,
                punct=_is_punct(raw),
                negated=any(a <= m.start() < e for a, e in spans),
            )
        )
    return words

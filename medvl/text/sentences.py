"""Cutting a report into sentences and clauses (negation and uncertainty never reach across a clause: ``;``,
``:``, "but", "however", "although", "except", "other than"...), and what counts as a word."""

from __future__ import annotations

import re


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_SENTENCE_BREAK = _rx(r"(?<=[.!?])\s+|\s*\n\s*|(?<=[a-z]{3}\.)(?=[A-Z][a-z])")
_NO_BREAK_AFTER = _rx(r"\b(?:vs|dr|e\.g|i\.e|approx|no|st|mr|ms|mrs|fig)\.$")
#: A sentence or report with a letter in it says something.
HAS_WORD = re.compile(r"[A-Za-z]")
#: A word, for counting the words between a cue and a mention.
WORD = re.compile(r"[A-Za-z0-9']+")
_CLAUSE_BREAK = _rx(
    r";|:|\s-\s|\b(?:but|however|although|though|whereas|except|aside\s+from|apart\s+from|other\s+than|"
    r"otherwise|nevertheless|yet)\b"
)


def split_sentences(report: str) -> list[tuple[int, int]]:
    """Sentence spans ``(start, end)`` of a report: only spans with a letter count ("1." is not a sentence)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_BREAK.finditer(report):
        if _NO_BREAK_AFTER.search(report, max(0, m.start() - 8), m.start()):
            continue
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(report)))
    return [(a, b) for a, b in spans if HAS_WORD.search(report, a, b)]


def split_clauses(report: str, sentences: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Clause spans ``(start, end, sentence_index)`` in report order."""
    out = []
    for si, (a, b) in enumerate(sentences):
        start = a
        for m in _CLAUSE_BREAK.finditer(report, a, b):
            if m.start() > start:
                out.append((start, m.start(), si))
            start = m.end() if m.group(0) in ";:" else m.start()
        out.append((start, b, si))
    return out

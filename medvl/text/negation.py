"""Whether a mention is negated, uncertain or positive, from the cues around it in its clause.

A mention is negated when a negation cue ("no", "without", "free of", "clear of", "negative for", "resolved"...)
precedes it in its clause within a short list-like scope ("no focal consolidation, pleural effusion or
pneumothorax"), or follows it ("... is not seen", "... has resolved"); otherwise it is uncertain when an
uncertainty cue precedes or follows it ("may represent", "possible", "cannot be excluded", "versus"); otherwise it
is positive. Negation wins over uncertainty ("no findings to suggest pneumonia" is negative), as in the CheXpert
labeler.
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from collections.abc import Sequence

from medvl.text.chexpert import NEGATIVE, POSITIVE, UNCERTAIN
from medvl.text.phrases import Candidate
from medvl.text.sentences import WORD


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_NEG_PRE = _rx(
    r"\b(?:no|not|without|free\s+of|clear\s+of|negative\s+for|absence\s+of|absent|resolution\s+of|resolved|"
    r"removal\s+of|nor|neither|lack\s+of|never|disappearance\s+of)\b"
)
# Cues that look like negation but are not: "no change in", "cannot be excluded", "without interval change".
_NEG_MASK = _rx(
    r"\bno\s+(?:\w+\s+){0,2}?(?:change|changes|increase|worsening|progression|improvement|difference|growth)\b"
    r"|\bwithout\s+(?:\w+\s+)?(?:change|changes)\b"
    r"|\b(?:can\s*)?not\s+(?:be\s+)?(?:\w+\s+)?(?:exclude[ds]?|ruled?\s+out)\b"
    r"|\bnot\s+only\b"
)
_NEG_POST = _rx(
    r"\b(?:(?:is|are|was|were|has|have|has\s+been|have\s+been)\s+)?(?:not|no\s+longer)\s+(?:been\s+)?(?:\w+\s+)?"
    r"(?:seen|identified|present|visualized|visible|demonstrated|evident|noted|appreciated|detected|apparent|"
    r"shown|observed|suggested|included)\b"
    r"|\b(?:has|have)\s+(?:since\s+|now\s+|completely\s+)?(?:resolved|cleared|disappeared)\b"
    r"|\b(?:is|are)\s+(?:now\s+)?(?:resolved|absent|gone)\b"
    r"|\b(?:has|have)\s+been\s+(?:removed|resolved)\b"
    r"|(?<!partially\s)(?<!partly\s)(?<!nearly\s)(?<!mostly\s)(?<!largely\s)(?<!almost\s)\bresolved\b"
    r"|\b(?:is|are|was|were|has\s+been|have\s+been)\s+(?:ruled\s+out|excluded)\b"
)
_UNC_PRE = _rx(
    r"\b(?:may|might|could|possibl[ey]|possibility|probabl[ey]|likely|questionabl[ey]|question(?:ed)?|"
    r"suspicious|suspect(?:ed)?|suspicion|suggest(?:s|ed|ive|ing|ion)?|concern(?:ing)?\s+for|worrisome|"
    r"compatible\s+with|can\s*not\s+(?:be\s+)?(?:\w+\s+)?(?:exclude[ds]?|ruled?\s+out)|"
    r"not\s+(?:be\s+)?(?:\w+\s+)?(?:excluded|ruled\s+out)|rule\s+out|r/o|differential|versus|vs|"
    r"consider(?:ed|ation)?|presum(?:ed|ably|ptive)|equivocal|indeterminate|borderline|uncertain|"
    r"favou?r(?:s|ed|ing)?|perhaps|or\s+less\s+likely|evaluat\w*\s+for|assess\w*\s+for)\b|\?"
)
_UNC_POST = _rx(
    r"\b(?:(?:is|are)\s+)?(?:can\s*not|not|could\s+not)\s+(?:be\s+)?(?:\w+\s+)?(?:excluded|ruled\s+out)\b"
    r"|\b(?:is|are)\s+(?:also\s+|more\s+|less\s+)?(?:possible|suspected|questioned|considered|a\s+consideration|"
    r"likely|probable|favou?red|difficult\s+to\s+exclude)\b"
    r"|\b(?:could|may|might)\s+(?:also\s+)?(?:be\s+)?(?:present|considered)\b"
    r"|\?|\b(?:vs|versus)\b|\bor\s+not\b"
)
# Where a cue's reach ends: a new clause-like segment inside the clause.
_SCOPE_BREAK = _rx(
    r"\b(?:but|however|although|though|while|whereas|which|that|who|there\s+(?:is|are|was|were|has|have)|with|"
    r"except|aside|apart|other\s+than|given|because|due\s+to|as\s+well\s+as|persist\w*|remains?|"
    r"(?:is|are)\s+(?:seen|noted|present|identified|unchanged|stable))\b"
    # A list item after a comma that starts like a new statement ("no effusion, stable cardiomegaly"); severity
    # words do not count: "no consolidation, large effusion or pneumothorax" is one negated list.
    r"|[,;]\s*(?:and\s+|but\s+)?(?:the|a|an|there|stable|persistent|chronic|unchanged|improved|improving|"
    r"increased|increasing|decreased|decreasing|worsening|worsened|again|old|healed|calcified|however|otherwise|"
    r"status|s/p|post|likely|probable|possible)\b"
    r"|\band\s+(?:the|there|a|an)\b"
)
#: A hypothetical clause ("if there is concern for fracture, ...") states nothing about the patient.
HYPOTHETICAL = _rx(r"\W*(?:\d+\s*[.)]\s*)?(?:if|should|in\s+case|whether)\b")
_PRE_SCOPE_WORDS = 14
_UNC_SCOPE_WORDS = 10
_POST_SCOPE_WORDS = 6
# Two neighbouring mentions joined by one of these are a differential: both uncertain.
DIFFERENTIAL = _rx(
    r"^\s*,?\s*(?:or|and/or|versus|vs\.?|/)\s+(?:(?:less|more|most)\s+likely\s+|possibly\s+|perhaps\s+|less\s+"
    r"likely\s+)?(?:[\w-]+\s+){0,3}?$"
)


def _unmasked(
    pattern: re.Pattern[str], text: str, mask: re.Pattern[str] | None, *, last: bool
) -> re.Match[str] | None:
    """The last (or first) match of ``pattern`` in ``text`` that does not start inside a match of ``mask``."""
    hits = pattern.finditer(text)
    if mask is None:
        if not last:
            return next(hits, None)
        tail = deque(hits, maxlen=1)
        return tail[0] if tail else None
    ordered = list(hits)
    if not ordered:
        return None
    spans = [(m.start(), m.end()) for m in mask.finditer(text)]
    for h in reversed(ordered) if last else ordered:
        if not any(a <= h.start() < b for a, b in spans):
            return h
    return None


class _Others:
    """The spans (report offsets) of a clause's other candidates, for reading the gap between a cue and a mention
    with them blanked: they are list items, not scope words."""

    def __init__(self, report: str, spans: Sequence[tuple[int, int]]):
        self.report = report
        self.spans = sorted(spans)
        self.starts = [a for a, _ in self.spans]
        self.reach = max((b - a for a, b in self.spans), default=0)

    def gap(self, start: int, end: int) -> str:
        """``report[start:end]`` with the other candidates' spans blanked."""
        first = bisect.bisect_left(self.starts, start - self.reach)
        last = bisect.bisect_left(self.starts, end)
        pieces: list[str] = []
        pos = start
        for a, b in self.spans[first:last]:
            a, b = max(a, pos), min(b, end)
            if b <= a:
                continue
            pieces.append(self.report[pos:a])
            pieces.append(" " * (b - a))
            pos = b
        pieces.append(self.report[pos:end])
        return "".join(pieces)


def _cue_before(
    prefix: str,
    cue: re.Pattern[str],
    mask: re.Pattern[str] | None,
    max_words: int,
    others: _Others,
    offset: int,
) -> re.Match[str] | None:
    """The last cue in ``prefix`` (``report[offset:...]``) whose scope reaches its end (no scope break, few words
    between)."""
    last = _unmasked(cue, prefix, mask, last=True)
    if last is None:
        return None
    between = others.gap(offset + last.end(), offset + len(prefix))
    if _SCOPE_BREAK.search(between) or len(WORD.findall(between)) > max_words:
        return None
    return last


def _cue_after(
    suffix: str,
    cue: re.Pattern[str],
    mask: re.Pattern[str] | None,
    others: _Others,
    offset: int,
) -> re.Match[str] | None:
    first = _unmasked(cue, suffix, mask, last=False)
    if first is None:
        return None
    between = others.gap(offset, offset + first.start())
    if _SCOPE_BREAK.search(between) or len(WORD.findall(between)) > _POST_SCOPE_WORDS:
        return None
    return first


# "{mention} is normal" / "... within normal limits" negates only when nothing but other mentions stands between
# ("heart size and pulmonary vascular engorgement appear within limits of normal").
_NEG_POST_NORMAL = _rx(
    r"\b(?:is|are|appears?|remains?|seems?)\s+(?:\w+\s+)?(?:normal|unremarkable|within\s+(?:the\s+)?"
    r"(?:normal\s+limits|limits\s+of\s+normal))\b"
)
_NEG_POST_MASK = _rx(
    r"\b(?:partially|partly|nearly|mostly|largely|almost|incompletely|not\s+(?:completely|entirely|fully))\s+(?:resolved|cleared)\b"
)


def mention_value(
    report: str,
    c: Candidate,
    clause: tuple[int, int, int],
    others: list[tuple[int, int]],
    absent: frozenset[re.Pattern[str]] = frozenset(),
) -> float:
    """``c``'s value in its ``clause``: NEGATIVE, UNCERTAIN or POSITIVE (``others``: the spans of the clause's other
    candidates, list items rather than scope words; ``absent``: cue patterns known not to occur around ``c``)."""
    c_start, c_end, _ = clause
    prefix = report[c_start : c.start]
    suffix = report[c.end : c_end]
    blanks = _Others(report, others)
    negated = (
        _NEG_PRE not in absent
        and _cue_before(prefix, _NEG_PRE, _NEG_MASK, _PRE_SCOPE_WORDS, blanks, c_start) is not None
    )
    if not negated and not c.subject:
        negated = (
            _NEG_POST not in absent
            and _cue_after(suffix, _NEG_POST, _NEG_POST_MASK, blanks, c.end) is not None
        )
        if not negated and _NEG_POST_NORMAL not in absent:
            m = _NEG_POST_NORMAL.search(suffix)
            if m is not None:
                between = blanks.gap(c.end, c.end + m.start())
                negated = len(WORD.findall(between)) <= 2 and not _SCOPE_BREAK.search(between)
    if c.fixed is not None:
        if c.fixed == NEGATIVE or negated:
            return NEGATIVE
        base = c.fixed
    else:
        if negated:
            return NEGATIVE
        base = POSITIVE
    if base == UNCERTAIN:
        return UNCERTAIN
    uncertain = (
        _UNC_PRE not in absent
        and _cue_before(prefix, _UNC_PRE, None, _UNC_SCOPE_WORDS, blanks, c_start) is not None
    )
    if not uncertain and c.subject:
        # "the heart may be mildly enlarged": the cue sits inside the subject's own phrase.
        uncertain = _UNC_PRE.search(report, c.start, c.end) is not None
    if not uncertain and not c.subject:
        uncertain = _UNC_POST not in absent and _cue_after(suffix, _UNC_POST, None, blanks, c.end) is not None
    return UNCERTAIN if uncertain else POSITIVE


#: How far (characters) around a mention its cues are looked for. A cue reaches a mention across at most
#: ``_PRE_SCOPE_WORDS`` words plus the other mentions of a list between them, so only a list of dozens of
#: findings after one "no" comes near the bound; it keeps labelling linear in the length of a clause (a run-on
#: report of 100,000 characters may be one clause). A clause that fits in it is read exactly as a whole.
SCOPE_WINDOW_CHARS = 600
_SPACE = re.compile(r"\s")
_PRE_CUES = (_NEG_PRE, _UNC_PRE)
_POST_CUES = (_NEG_POST, _NEG_POST_NORMAL, _UNC_POST)
_CUE_REACH = 200  # longer than any cue's match: a cue starting further away cannot enter a window


def clause_values(report: str, group: Sequence[Candidate], clause: tuple[int, int, int]) -> list[float]:
    """:func:`mention_value` of every candidate of ``clause`` (``group``, in report order), each read within
    :data:`SCOPE_WINDOW_CHARS` characters of it, with the other candidates there as list items.

    In a clause longer than that, where each cue occurs is found once for the whole clause, and a window without
    a cue is not searched again: a list of thousands of findings costs time in proportion to its length.
    """
    c_start, c_end, si = clause
    spans = sorted({(c.start, c.end) for c in group})
    starts = [a for a, _ in spans]
    longest = max((b - a for a, b in spans), default=0)
    cue_starts: dict[re.Pattern[str], list[int]] = {}
    if c_end - c_start > SCOPE_WINDOW_CHARS:
        cue_starts = {
            cue: [m.start() for m in cue.finditer(report, c_start, c_end)] for cue in _PRE_CUES + _POST_CUES
        }
    values = []
    for c in group:
        lo, hi = c_start, c_end
        if c.start - lo > SCOPE_WINDOW_CHARS:
            space = _SPACE.search(report, c.start - SCOPE_WINDOW_CHARS, c.start)
            lo = space.end() if space is not None else c.start
        if hi - c.end > SCOPE_WINDOW_CHARS:
            cut = c.end + SCOPE_WINDOW_CHARS
            hi = max(report.rfind(" ", c.end, cut), report.rfind("\t", c.end, cut))
            hi = hi if hi >= c.end else c.end
        absent = frozenset(
            cue
            for cues, a, b in ((_PRE_CUES, lo, c.start), (_POST_CUES, c.end, hi))
            for cue in cues
            if cue in cue_starts and not _any_between(cue_starts[cue], a - _CUE_REACH, b + _CUE_REACH)
        )
        first = bisect.bisect_left(starts, lo - longest)
        last = bisect.bisect_left(starts, hi)
        own = (c.start, c.end)
        others = [s for s in spans[first:last] if s[1] > lo and s != own]
        values.append(mention_value(report, c, (lo, hi, si), others, absent))
    return values


def _any_between(sorted_values: list[int], lo: int, hi: int) -> bool:
    i = bisect.bisect_left(sorted_values, lo)
    return i < len(sorted_values) and sorted_values[i] < hi

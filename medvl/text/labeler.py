"""Rule-based labeler for CheXpert's 14 observations, with attributes the phantom draws from.

How a report is read:

1. It is cut into sentences and each sentence into clauses (``;``, ``:``, "but", "however", "although",
   "except", "other than"...): negation and uncertainty never reach across a clause.
2. Mentions are found with the phrase tables of :mod:`medvl.text.phrases` (phrases that name a finding, and
   subjects such as "heart size" whose predicate says enlarged / normal / borderline).
3. Each mention is negated when a negation cue ("no", "without", "free of", "clear of", "negative for",
   "resolved"...) precedes it in its clause within a short list-like scope ("no focal consolidation, pleural
   effusion or pneumothorax"), or follows it ("... is not seen", "... has resolved"); otherwise it is uncertain
   when an uncertainty cue precedes or follows it ("may represent", "possible", "cannot be excluded",
   "versus", "X or Y" as a differential); otherwise it is positive. Negation wins over uncertainty
   ("no findings to suggest pneumonia" is negative), as in the CheXpert labeler.
4. Attributes (side, zone, severity, device kind) come from the mention's own noun phrase and the
   prepositional phrase after it ("small left pleural effusion", "opacity in the right lower lobe"); a mention
   linked to a neighbour by "may represent", "versus", "or"... shares that neighbour's side and zone.
5. Report labels aggregate mentions per observation with CheXpert's precedence positive > uncertain > negative;
   CheXpert's exception "CHF" / "heart failure" also makes Cardiomegaly uncertain; No Finding is 1 when no
   observation other than Support Devices is positive or uncertain, else blank (never 0). An empty report
   gives all blanks.

Value convention (CheXpert): 1 positive, 0 negated, -1 uncertain, NaN (blank in CSV) not mentioned.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from medvl.errors import DataError
from medvl.text.chexpert import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN
from medvl.text.phrases import PHRASE_RULES, SUBJECT_RULES, Finding, PhraseRule, SubjectRule

__all__ = [
    "Finding", "Mention", "Side", "Zone", "Severity", "extract_mentions", "label_report", "label_reports",
    "aggregate_mentions", "split_sentences", "label_command", "format_label",
]

Side = Literal["left", "right", "bilateral"]
Zone = Literal["apex", "upper", "mid", "lower", "base", "perihilar", "retrocardiac"]
Severity = Literal["trace", "small", "mild", "moderate", "large", "severe"]

#: Severity words from least to most (the largest stated wins: "small to moderate" is moderate).
SEVERITY_ORDER: tuple[str, ...] = ("trace", "small", "mild", "moderate", "large", "severe")

_LABEL_INDEX = {name: i for i, name in enumerate(CHEXPERT_LABELS)}
_NO_FINDING = "No Finding"
_SUPPORT_DEVICES = "Support Devices"
# Observations where side / zone mean nothing (the heart is one organ; its "left ventricle" is not a side).
_NO_SIDE = frozenset({"Cardiomegaly", "Enlarged Cardiomediastinum"})


@dataclass(frozen=True)
class Mention:
    """One mention of a CheXpert observation in a report.

    ``phrase`` is ``report[start:end]``; ``head`` is the word that names the finding, lower case, as it appears
    in the report (None where the phrase has no finding noun, e.g. "the heart is enlarged"); ``sentence`` is the
    0-based index of the sentence in :func:`split_sentences`.
    """

    observation: str
    value: float
    finding: Finding | None
    phrase: str
    head: str | None
    side: Side | None
    zone: Zone | None
    severity: Severity | None
    device: str | None
    sentence: int
    start: int
    end: int


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# --- segmentation ----------------------------------------------------------------------------------------------
_SENTENCE_BREAK = _rx(r"(?<=[.!?])\s+|\s*\n\s*|(?<=[a-z]{3}\.)(?=[A-Z][a-z])")
_NO_BREAK_AFTER = _rx(r"\b(?:vs|dr|e\.g|i\.e|approx|no|st|mr|ms|mrs|fig)\.$")
_HAS_WORD = re.compile(r"[A-Za-z]")
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
    return [(a, b) for a, b in spans if _HAS_WORD.search(report, a, b)]


def _clauses(report: str, sentences: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
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


# --- negation and uncertainty ----------------------------------------------------------------------------------
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
_WORD = re.compile(r"[A-Za-z0-9']+")
_HYPOTHETICAL = _rx(r"\W*(?:\d+\s*[.)]\s*)?(?:if|should|in\s+case|whether)\b")
_PRE_SCOPE_WORDS = 14
_UNC_SCOPE_WORDS = 10
_POST_SCOPE_WORDS = 6
# Two neighbouring mentions joined by one of these are a differential: both uncertain.
_DIFFERENTIAL = _rx(
    r"^\s*,?\s*(?:or|and/or|versus|vs\.?|/)\s+(?:(?:less|more|most)\s+likely\s+|possibly\s+|perhaps\s+|less\s+"
    r"likely\s+)?(?:[\w-]+\s+){0,3}?$"
)


def _masked(pattern: re.Pattern[str], text: str, mask: re.Pattern[str] | None) -> list[re.Match[str]]:
    hits = list(pattern.finditer(text))
    if mask is None or not hits:
        return hits
    spans = [(m.start(), m.end()) for m in mask.finditer(text)]
    return [h for h in hits if not any(a <= h.start() < b for a, b in spans)]


def _gap_text(text: str, start: int, end: int, others: Sequence[tuple[int, int]]) -> str:
    """``text[start:end]`` with the spans of other mentions blanked (they are list items, not scope words)."""
    chunk = list(text[start:end])
    for a, b in others:
        a, b = max(a, start), min(b, end)
        for i in range(a - start, b - start):
            chunk[i] = " "
    return "".join(chunk)


def _cue_before(prefix: str, cue: re.Pattern[str], mask: re.Pattern[str] | None, max_words: int,
                others: Sequence[tuple[int, int]], offset: int) -> re.Match[str] | None:
    """The last cue in ``prefix`` whose scope reaches its end (no scope break, few words between)."""
    hits = _masked(cue, prefix, mask)
    if not hits:
        return None
    last = hits[-1]
    between = _gap_text(prefix, last.end(), len(prefix), [(a - offset, b - offset) for a, b in others])
    if _SCOPE_BREAK.search(between) or len(_WORD.findall(between)) > max_words:
        return None
    return last


def _cue_after(suffix: str, cue: re.Pattern[str], mask: re.Pattern[str] | None,
               others: Sequence[tuple[int, int]], offset: int) -> re.Match[str] | None:
    hits = _masked(cue, suffix, mask)
    if not hits:
        return None
    first = hits[0]
    between = _gap_text(suffix, 0, first.start(), [(a - offset, b - offset) for a, b in others])
    if _SCOPE_BREAK.search(between) or len(_WORD.findall(between)) > _POST_SCOPE_WORDS:
        return None
    return first


# "{mention} is normal" / "... within normal limits" negates only when nothing but other mentions stands between
# ("heart size and pulmonary vascular engorgement appear within limits of normal").
_NEG_POST_NORMAL = _rx(
    r"\b(?:is|are|appears?|remains?|seems?)\s+(?:\w+\s+)?(?:normal|unremarkable|within\s+(?:the\s+)?"
    r"(?:normal\s+limits|limits\s+of\s+normal))\b"
)
_NEG_POST_MASK = _rx(r"\b(?:partially|partly|nearly|mostly|largely|almost|incompletely|not\s+(?:completely|entirely|fully))\s+(?:resolved|cleared)\b")


# --- attributes ---------------------------------------------------------------------------------------------------
_SIDE_WORDS = _rx(
    r"\b(?P<bilateral>bilateral(?:ly)?|both|bibasilar|bibasal|bibasally|biapical|bi-basilar|bi-apical)\b"
    # "right atrium", "left ventricle" name cardiac chambers (where leads lie), not the side of a finding.
    r"|\b(?P<left>left(?:-sided)?|lll|lul|lingula|lingular)\b(?!\s+(?:atri|ventric))"
    r"|\b(?P<right>right(?:-sided)?|rll|rul|rml)\b(?!\s+(?:atri|ventric))"
)
_ZONE_WORDS = _rx(
    r"\b(?P<retrocardiac>retrocardiac|behind\s+the\s+heart)\b"
    r"|\b(?P<apex>apex|apices|apical|biapical|bi-apical|apicoposterior)\b"
    r"|\b(?P<upper>upper[-\s]+(?:lobes?|lungs?|lung\s+(?:zones?|fields?)|zones?|fields?|thirds?)|rul|lul)\b"
    r"|\b(?P<mid>mid(?:dle)?[-\s]*(?:lungs?|lobes?|lung\s+(?:zones?|fields?)|zones?|fields?|thirds?)|midlung|"
    r"midzone|rml|lingula|lingular)\b"
    r"|\b(?P<lower>lower[-\s]+(?:lobes?|lungs?|lung\s+(?:zones?|fields?)|zones?|fields?|thirds?)|rll|lll|infrahilar)\b"
    r"|\b(?P<base>bases?|basilar|basal|bibasilar|bi-basilar|bibasal|bibasally|costophrenic|subpulmonic|"
    r"hemidiaphragms?|diaphragm|(?<!superior\s)(?:sulcus|sulci))\b"
    r"|\b(?P<perihilar>perihilar|parahilar|hilar|hila|hilum|hilus)\b"
)
_SEVERITY_WORDS = _rx(
    r"\b(?P<trace>trace|tiny|minimal|minimally|minute)\b"
    r"|\b(?P<small>small|smaller|small-sized)\b"
    r"|\b(?P<mild>mild|mildly|slight|slightly|subtle)\b"
    r"|\b(?P<moderate>moderate|moderately|moderate-sized|medium)\b"
    r"|\b(?P<large>large|larger|sizable|sizeable|extensive|big|considerable)\b"
    r"|\b(?P<severe>severe|severely|marked|markedly|massive|massively|huge)\b"
)
# Words that end a mention's own noun phrase, looking back from it.
_NP_BOUNDARY_PRE = _rx(
    r"[,;(]|\b(?:and|or|with|without|in|at|to|from|by|for|but|which|that|is|are|was|were|has|have|there|of|"
    r"represent\w*|reflect\w*|likely|suggest\w*|versus|vs)\b"
)
# Words that end the prepositional phrase after a mention.
_NP_BOUNDARY_POST = _rx(
    r"[,;(]|\b(?:which|with|without|but|that|likely|may|might|could|represent\w*|reflect\w*|suggest\w*|"
    r"consistent|compatible|concerning|suspicious|due|secondary|versus|vs|or)\b|\band\s+(?:there|the|a|an)\b"
)
# Mentions joined by one of these describe the same finding ("opacity ... which may represent atelectasis").
_LINK = _rx(
    r"\b(?:represent\w*|reflect\w*|consistent\s+with|suggest\w*|compatible\s+with|likely|probabl[ey]|"
    r"possibl[ey]|due\s+to|secondary\s+to|or|versus|vs|and/or|concerning\s+for|suspicious\s+for|worrisome|may|"
    r"could|favou?r\w*|related\s+to|from)\b|^\s*[,:(-]\s*$"
)
_POST_ATTR_WORDS = 10


def _side_of(text: str) -> str | None:
    sides = {m.lastgroup for m in _SIDE_WORDS.finditer(text)}
    if not sides:
        return None
    if "bilateral" in sides or {"left", "right"} <= sides:
        return "bilateral"
    return sides.pop()


def _zone_of(text: str, anchor: int) -> str | None:
    """The zone word nearest to ``anchor`` (a position in ``text``)."""
    best, best_d = None, math.inf
    for m in _ZONE_WORDS.finditer(text):
        d = 0 if m.start() <= anchor <= m.end() else min(abs(m.start() - anchor), abs(m.end() - anchor))
        if d < best_d:
            best, best_d = m.lastgroup, d
    return best


def _severity_of(text: str) -> str | None:
    found = [SEVERITY_ORDER.index(m.lastgroup) for m in _SEVERITY_WORDS.finditer(text)]
    return SEVERITY_ORDER[max(found)] if found else None


# --- matching ---------------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    observation: str
    finding: Finding
    start: int
    end: int
    head: tuple[int, int] | None
    device: str | None
    fixed: float | None  # value decided by the rule (subject predicates, fixed negatives)
    subject: bool  # found through a subject's predicate: post-mention cues belong to the predicate


def _clause_of(clauses: list[tuple[int, int, int]], starts: list[int], pos: int) -> int:
    return max(0, bisect.bisect_right(starts, pos) - 1)


def _head_span(m: re.Match[str]) -> tuple[int, int] | None:
    """The span of the named group ``head`` (or ``head2`` in patterns with two alternatives), if it matched."""
    for name in ("head", "head2"):
        if name in m.re.groupindex and m.group(name):
            return m.span(name)
    return None


def _phrase_candidates(report: str, rule: PhraseRule) -> Iterable[_Candidate]:
    for m in rule.pattern.finditer(report):
        if rule.exclude_before is not None and rule.exclude_before.search(report, max(0, m.start() - 40), m.start()):
            continue
        if rule.exclude_after is not None and rule.exclude_after.match(report, m.end()):
            continue
        head = _head_span(m)
        yield _Candidate(rule.observation, rule.finding, m.start(), m.end(), head, rule.device, rule.value, False)


# "XXXX" is IU X-ray's de-identification mark; in "heart size XXXX mildly enlarged" it stands for a verb.
_SUBJECT_VERB = _rx(r"\b(?:is|are|was|were|appears?|appearing|remains?|seems?|looks?|has|have|measures?|xxxx)\b")
_SUBJECT_ADJACENT = _rx(r"[\s,]*(?:(?:at|near|within|to|in)\s+)?(?:the\s+)?(?:\w+ly\s+)?")
_SUBJECT_STOP = _rx(r";|\b(?:with|but|which|there|however|although|whereas)\b")
_SUBJECT_WORDS = 8
_PREMOD_CHARS = 48
_VALUE_OF_GROUP = {"pos": POSITIVE, "neg": NEGATIVE, "unc": UNCERTAIN}


def _subject_candidates(report: str, rule: SubjectRule, clauses: list[tuple[int, int, int]],
                        starts: list[int]) -> Iterable[_Candidate]:
    for m in rule.subject.finditer(report):
        if rule.exclude_after is not None and rule.exclude_after.match(report, m.end()):
            continue
        c_start, c_end, _ = clauses[_clause_of(clauses, starts, m.start())]
        head = _head_span(m)
        pre = report[max(c_start, m.start() - _PREMOD_CHARS):m.start()]
        pm = rule.premodifier.search(pre)
        if pm is not None:
            start = m.start() - len(pre) + pm.start()
            yield _Candidate(rule.observation, rule.finding, start, m.end(), head, None,
                             _VALUE_OF_GROUP[pm.lastgroup], True)
            continue
        # The predicate: a few words after the subject, stopping where another statement begins.
        window_end = min(c_end, m.end() + 120)
        window = report[m.end():window_end]
        stop = _SUBJECT_STOP.search(window)
        if stop is not None:
            window = window[:stop.start()]
        comma = window.find(",")
        if comma >= 0 and _SUBJECT_VERB.search(window, 0, comma):
            window = window[:comma]
        words = list(_WORD.finditer(window))
        if len(words) > _SUBJECT_WORDS:
            window = window[:words[_SUBJECT_WORDS].start()]
        pred = rule.predicate.search(window)
        if pred is None:
            continue
        # The predicate must be the subject's: after a copula ("heart size is ... enlarged") or right after it
        # ("heart size normal", "heart size at the upper limits of normal"), not "mediastinal nodes as well as
        # large calcifications".
        between = window[:pred.start()]
        if not (_SUBJECT_VERB.search(between) or _SUBJECT_ADJACENT.fullmatch(between)):
            continue
        yield _Candidate(rule.observation, rule.finding, m.start(), m.end() + pred.end(), head, None,
                         _VALUE_OF_GROUP[pred.lastgroup], True)


def _dedupe(cands: list[_Candidate]) -> list[_Candidate]:
    """Per observation, drop a candidate that overlaps a longer one (e.g. "PICC" inside "PICC line")."""
    cands.sort(key=lambda c: (c.observation, c.start, -(c.end - c.start)))
    kept: list[_Candidate] = []
    last_end: dict[str, int] = {}
    for c in sorted(cands, key=lambda c: (-(c.end - c.start), c.start)):
        if any(k.observation == c.observation and k.start < c.end and c.start < k.end for k in kept):
            continue
        kept.append(c)
        last_end[c.observation] = c.end
    kept.sort(key=lambda c: (c.start, _LABEL_INDEX[c.observation]))
    return kept


def _value(report: str, c: _Candidate, clause: tuple[int, int, int], others: list[tuple[int, int]]) -> float:
    c_start, c_end, _ = clause
    prefix = report[c_start:c.start]
    suffix = report[c.end:c_end]
    negated = _cue_before(prefix, _NEG_PRE, _NEG_MASK, _PRE_SCOPE_WORDS, others, c_start) is not None
    if not negated and not c.subject:
        negated = _cue_after(suffix, _NEG_POST, _NEG_POST_MASK, others, c.end) is not None
        if not negated:
            m = _NEG_POST_NORMAL.search(suffix)
            if m is not None:
                between = _gap_text(suffix, 0, m.start(), [(a - c.end, b - c.end) for a, b in others])
                negated = len(_WORD.findall(between)) <= 2 and not _SCOPE_BREAK.search(between)
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
    uncertain = _cue_before(prefix, _UNC_PRE, None, _UNC_SCOPE_WORDS, others, c_start) is not None
    if not uncertain and c.subject:
        # "the heart may be mildly enlarged": the cue sits inside the subject's own phrase.
        uncertain = _UNC_PRE.search(report, c.start, c.end) is not None
    if not uncertain and not c.subject:
        uncertain = _cue_after(suffix, _UNC_POST, None, others, c.end) is not None
    return UNCERTAIN if uncertain else POSITIVE


def extract_mentions(report: str) -> list[Mention]:
    """All mentions of CheXpert observations in ``report``, in report order.

    Each carries its value (1 positive, 0 negated, -1 uncertain), the fine-grained :class:`Finding`, the
    phrase with its character offsets, the head word, and the side / zone / severity / device kind read from
    its clause. Derived mentions (CheXpert's "CHF implies uncertain cardiomegaly") share the phrase that
    implied them.
    """
    if not isinstance(report, str):
        raise TypeError(f"a report must be a str, not {type(report).__name__}")
    return _extract(report, prefilter=True)


_ALL_KEYS = frozenset(k for rule in PHRASE_RULES for k in rule.keys)


def _extract(report: str, *, prefilter: bool) -> list[Mention]:
    sentences = split_sentences(report)
    if not sentences:
        return []
    clauses = _clauses(report, sentences)
    starts = [c[0] for c in clauses]
    cands: list[_Candidate] = []
    lower = report.lower()
    present = {k for k in _ALL_KEYS if k in lower}
    for rule in PHRASE_RULES:
        if prefilter and rule.keys and present.isdisjoint(rule.keys):
            continue
        cands.extend(_phrase_candidates(report, rule))
    for srule in SUBJECT_RULES:
        cands.extend(_subject_candidates(report, srule, clauses, starts))
    # Hypothetical clauses ("if there is concern for fracture, ...") state nothing about this patient.
    hypothetical = {i for i, (a, b, _) in enumerate(clauses) if _HYPOTHETICAL.match(report, a, b)}
    cands = [c for c in cands if _clause_of(clauses, starts, c.start) not in hypothetical]
    cands = _dedupe(cands)

    by_clause: dict[int, list[_Candidate]] = {}
    for c in cands:
        by_clause.setdefault(_clause_of(clauses, starts, c.start), []).append(c)

    mentions: list[Mention] = []
    for ci, group in sorted(by_clause.items()):
        clause = clauses[ci]
        spans = [(c.start, c.end) for c in group]
        values = [_value(report, c, clause, [s for s in spans if s != (c.start, c.end)]) for c in group]
        # "atelectasis or pneumonia", "edema versus infection": a differential leaves each uncertain.
        for i in range(len(group) - 1):
            a, b = group[i], group[i + 1]
            if a.observation == b.observation or b.start < a.end:
                continue
            if _DIFFERENTIAL.match(report[a.end:b.start]):
                for j in (i, i + 1):
                    if values[j] == POSITIVE:
                        values[j] = UNCERTAIN
        attrs = [_attributes(report, group, i, clause) for i in range(len(group))]
        _share_linked_attributes(report, group, attrs)
        for c, v, (side, zone, severity) in zip(group, values, attrs, strict=True):
            head = report[c.head[0]:c.head[1]].lower() if c.head is not None else None
            mentions.append(Mention(
                observation=c.observation, value=v, finding=c.finding, phrase=report[c.start:c.end], head=head,
                side=side, zone=zone, severity=severity, device=c.device, sentence=clause[2], start=c.start,
                end=c.end,
            ))
            if c.observation == "Edema" and v != NEGATIVE and head in ("chf", "failure", "congestive"):
                # CheXpert's exception: heart failure makes Cardiomegaly uncertain.
                mentions.append(replace(mentions[-1], observation="Cardiomegaly", value=UNCERTAIN,
                                        finding=Finding.CARDIOMEGALY, head=None, side=None, zone=None,
                                        severity=None))
    return mentions


def _attributes(report: str, group: list[_Candidate], i: int,
                clause: tuple[int, int, int]) -> tuple[str | None, str | None, str | None]:
    c = group[i]
    c_start, c_end, _ = clause
    prev_end = max([g.end for g in group[:i] if g.end <= c.start], default=c_start)
    nxt = [g.start for g in group[i + 1:] if g.start >= c.end]
    next_start = min(nxt, default=c_end)
    # The mention's own noun phrase: back to the last boundary word before it.
    pre_full = report[prev_end:c.start]
    cut = 0
    for m in _NP_BOUNDARY_PRE.finditer(pre_full):
        cut = m.end()
    pre = pre_full[cut:]
    # The prepositional phrase after it, without the next mention's own pre-modifiers.
    post = report[c.end:next_start]
    if nxt:
        last = None
        for m in _rx(r"[,;]|\b(?:and|or|with)\b").finditer(post):
            last = m
        if last is not None:
            post = post[:last.start()]
    stop = _NP_BOUNDARY_POST.search(post)
    if stop is not None:
        post = post[:stop.start()]
    words = list(_WORD.finditer(post))
    if len(words) > _POST_ATTR_WORDS:
        post = post[:words[_POST_ATTR_WORDS].start()]
    phrase = report[c.start:c.end]
    local = f"{pre}{phrase}{post}"
    severity = _severity_of(local)
    if c.observation in _NO_SIDE:
        return None, None, severity
    if c.device is not None:
        side = _side_of(pre + phrase) or _side_of(post)
    else:
        side = _side_of(local)
        head_plural = c.head is not None and report[c.head[1] - 1:c.head[1]].lower() == "s"
        if side in ("left", "right") and head_plural and _side_of(pre_full) == "bilateral":
            side = "bilateral"  # "moderate right and small left effusions"
            severity = _severity_of(f"{pre_full}{phrase}{post}")
    if c.device is not None:
        # A device's course ("tube courses below the diaphragm") is not where it sits: only its own noun phrase.
        zone = _zone_of(pre + phrase, len(pre) + len(phrase) // 2)
    else:
        zone = _zone_of(local, len(pre) + len(phrase) // 2)
    return side, zone, severity


def _share_linked_attributes(report: str, group: list[_Candidate],
                             attrs: list[tuple[str | None, str | None, str | None]]) -> None:
    """Neighbours joined by "may represent", "versus", "or"... describe one finding: share side and zone."""
    for i in range(len(group) - 1):
        a, b = group[i], group[i + 1]
        if a.observation in _NO_SIDE or b.observation in _NO_SIDE or a.device or b.device or b.start < a.end:
            continue
        if not _LINK.search(report[a.end:b.start]):
            continue
        (sa, za, va), (sb, zb, vb) = attrs[i], attrs[i + 1]
        attrs[i + 1] = (sb or sa, zb or za, vb)
        attrs[i] = (sa or sb, za or zb, va)


# --- report labels ----------------------------------------------------------------------------------------------
def aggregate_mentions(mentions: Iterable[Mention], *, empty: bool = False) -> np.ndarray:
    """CheXpert's aggregation of mentions into the 14 labels, shape ``(14,)`` float32 in CheXpert order.

    Per observation: positive if any mention is positive, else uncertain if any is uncertain, else negative if
    mentioned, else NaN. No Finding: 1 when no observation but Support Devices is positive or uncertain, NaN
    otherwise (and NaN for an ``empty`` report).
    """
    out = np.full(len(CHEXPERT_LABELS), np.nan, dtype=np.float32)
    rank = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}
    best: dict[int, float] = {}
    for m in mentions:
        j = _LABEL_INDEX[m.observation]
        if j not in best or rank[m.value] > rank[best[j]]:
            best[j] = m.value
    for j, v in best.items():
        out[j] = v
    if not empty:
        finding = any(v in (POSITIVE, UNCERTAIN) for j, v in best.items() if CHEXPERT_LABELS[j] != _SUPPORT_DEVICES)
        if not finding:
            out[_LABEL_INDEX[_NO_FINDING]] = POSITIVE
    return out


def _is_empty(report: str | None) -> bool:
    return report is None or (isinstance(report, float) and math.isnan(report)) or not _HAS_WORD.search(str(report))


def _label_array(report: str) -> np.ndarray:
    if _is_empty(report):
        return np.full(len(CHEXPERT_LABELS), np.nan, dtype=np.float32)
    return aggregate_mentions(extract_mentions(report))


def label_report(report: str) -> dict[str, float]:
    """CheXpert's 14 labels of one report: name -> 1.0 / 0.0 / -1.0 / NaN (not mentioned)."""
    values = _label_array(report)
    return {name: float(v) for name, v in zip(CHEXPERT_LABELS, values, strict=True)}


def label_reports(reports: Sequence[str], *, progress: bool = False) -> np.ndarray:
    """Labels of many reports, shape ``(N, 14)`` float32 in CheXpert order, NaN for blank.

    Identical reports are labelled once (IU X-ray and MIMIC repeat many normal reports word for word).
    ``None`` / NaN / empty strings give an all-blank row.
    """
    out = np.full((len(reports), len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    items: Iterable[tuple[int, str]] = enumerate(reports)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(reports), desc="labelling reports", unit="report")
    for i, report in items:
        if _is_empty(report):
            continue
        key = str(report)
        row = cache.get(key)
        if row is None:
            row = cache[key] = _label_array(key)
        out[i] = row
    return out


def format_label(value: float) -> str:
    """CSV cell of a label value: ``1``, ``0``, ``-1`` or blank."""
    if value is None or math.isnan(value):
        return ""
    return str(int(value))


def _read_reports(file: str) -> list[str]:
    if file == "-":
        return [sys.stdin.read()]
    path = Path(file)
    if not path.exists():
        raise FileNotFoundError(f"{file}: no such file")
    if path.is_dir():
        raise DataError(f"{file} is a directory; medvl label takes a CSV file with a 'report' column or -")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "report" not in reader.fieldnames:
            cols = ", ".join(reader.fieldnames or []) or "none"
            raise DataError(f"{file}: no 'report' column (columns: {cols}); medvl label reads the column 'report'")
        return [row["report"] or "" for row in reader]


def label_command(file: str) -> int:
    """``medvl label [FILE.csv|-]``: CheXpert's 14 labels as CSV on standard output, one row per report.

    An empty report gives a blank row (said on standard error) so that rows stay in input order.
    """
    reports = _read_reports(file)
    labels = label_reports(reports, progress=len(reports) > 5000)
    for i, report in enumerate(reports):
        if _is_empty(report):
            where = "standard input" if file == "-" else f"row {i + 1}"
            print(f"medvl label: {where}: empty report; writing a blank row", file=sys.stderr)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CHEXPERT_LABELS)
    for row in labels:
        writer.writerow([format_label(v) for v in row])
    sys.stdout.write(buf.getvalue())
    return 0

"""A mention's attributes, read from its own noun phrase and the prepositional phrase after it: the patient side
("left", "bilateral"...), the lung zone ("apical", "right lower lobe", "retrocardiac"...) and the severity
("trace" ... "severe"); mentions linked by "may represent", "versus", "or"... share side and zone."""

from __future__ import annotations

import bisect
import math
import re
from typing import Literal

from medvl.text.phrases import Candidate
from medvl.text.sentences import WORD

Side = Literal["left", "right", "bilateral"]
Zone = Literal["apex", "upper", "mid", "lower", "base", "perihilar", "retrocardiac"]
Severity = Literal["trace", "small", "mild", "moderate", "large", "severe"]

#: Severity words from least to most (the largest stated wins: "small to moderate" is moderate).
SEVERITY_ORDER: tuple[str, ...] = ("trace", "small", "mild", "moderate", "large", "severe")

# Observations where side / zone mean nothing (the heart is one organ; its "left ventricle" is not a side).
_NO_SIDE = frozenset({"Cardiomegaly", "Enlarged Cardiomediastinum"})


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


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
# Where the next mention's own pre-modifiers begin, looking back from it.
_NEXT_PREMODIFIERS = _rx(r"[,;]|\b(?:and|or|with)\b")


def side_of(text: str) -> str | None:
    """The side ``text`` names: ``left``, ``right``, ``bilateral`` (both, or left and right) or None."""
    sides = {m.lastgroup for m in _SIDE_WORDS.finditer(text)}
    if not sides:
        return None
    if "bilateral" in sides or {"left", "right"} <= sides:
        return "bilateral"
    return sides.pop()


def zone_of(text: str, anchor: int) -> str | None:
    """The zone word nearest to ``anchor`` (a position in ``text``)."""
    best, best_d = None, math.inf
    for m in _ZONE_WORDS.finditer(text):
        d = 0 if m.start() <= anchor <= m.end() else min(abs(m.start() - anchor), abs(m.end() - anchor))
        if d < best_d:
            best, best_d = m.lastgroup, d
    return best


def severity_of(text: str) -> str | None:
    """The largest severity word in ``text`` (:data:`SEVERITY_ORDER`), or None."""
    found = [SEVERITY_ORDER.index(m.lastgroup) for m in _SEVERITY_WORDS.finditer(text)]
    return SEVERITY_ORDER[max(found)] if found else None


def mention_attributes(
    report: str, group: list[Candidate], i: int, clause: tuple[int, int, int]
) -> tuple[str | None, str | None, str | None]:
    """``(side, zone, severity)`` of ``group[i]``, one of the candidates of ``clause`` (report order), read from
    its own noun phrase and the prepositional phrase after it (up to the next candidate)."""
    c = group[i]
    c_start, c_end, _ = clause
    prev_end = max([g.end for g in group[:i] if g.end <= c.start], default=c_start)
    nxt = [g.start for g in group[i + 1 :] if g.start >= c.end]
    return _attributes(report, c, prev_end, min(nxt, default=c_end), bool(nxt))


def clause_attributes(
    report: str, group: list[Candidate], clause: tuple[int, int, int]
) -> list[tuple[str | None, str | None, str | None]]:
    """:func:`mention_attributes` of every candidate of ``clause`` (``group``, in report order), in time linear in
    the number of candidates: the previous candidate's end and the next one's start are found by bisection."""
    c_start, c_end, _ = clause
    ends = sorted(g.end for g in group)
    starts = sorted(g.start for g in group)
    out = []
    for c in group:
        # A candidate that ends before c starts comes before it in report order, one that starts after c ends
        # after it: the group's order needs no checking.
        k = bisect.bisect_right(ends, c.start)
        prev_end = max(ends[k - 1], c_start) if k else c_start
        j = bisect.bisect_left(starts, c.end)
        has_next = j < len(starts)
        out.append(_attributes(report, c, prev_end, starts[j] if has_next else c_end, has_next))
    return out


def _attributes(
    report: str, c: Candidate, prev_end: int, next_start: int, has_next: bool
) -> tuple[str | None, str | None, str | None]:
    # The mention's own noun phrase: back to the last boundary word before it.
    pre_full = report[prev_end : c.start]
    cut = 0
    for m in _NP_BOUNDARY_PRE.finditer(pre_full):
        cut = m.end()
    pre = pre_full[cut:]
    # The prepositional phrase after it, without the next mention's own pre-modifiers.
    post = report[c.end : next_start]
    if has_next:
        last = None
        for m in _NEXT_PREMODIFIERS.finditer(post):
            last = m
        if last is not None:
            post = post[: last.start()]
    stop = _NP_BOUNDARY_POST.search(post)
    if stop is not None:
        post = post[: stop.start()]
    words = list(WORD.finditer(post))
    if len(words) > _POST_ATTR_WORDS:
        post = post[: words[_POST_ATTR_WORDS].start()]
    phrase = report[c.start : c.end]
    local = f"{pre}{phrase}{post}"
    severity = severity_of(local)
    if c.observation in _NO_SIDE:
        return None, None, severity
    if c.device is not None:
        side = side_of(pre + phrase) or side_of(post)
    else:
        side = side_of(local)
        head_plural = c.head is not None and report[c.head[1] - 1 : c.head[1]].lower() == "s"
        if side in ("left", "right") and head_plural and side_of(pre_full) == "bilateral":
            side = "bilateral"  # "moderate right and small left effusions"
            severity = severity_of(f"{pre_full}{phrase}{post}")
    if c.device is not None:
        # A device's course ("tube courses below the diaphragm") is not where it sits: only its own noun phrase.
        zone = zone_of(pre + phrase, len(pre) + len(phrase) // 2)
    else:
        zone = zone_of(local, len(pre) + len(phrase) // 2)
    return side, zone, severity


def share_linked_attributes(
    report: str, group: list[Candidate], attrs: list[tuple[str | None, str | None, str | None]]
) -> None:
    """Neighbours joined by "may represent", "versus", "or"... describe one finding: share side and zone."""
    for i in range(len(group) - 1):
        a, b = group[i], group[i + 1]
        if a.observation in _NO_SIDE or b.observation in _NO_SIDE or a.device or b.device or b.start < a.end:
            continue
        if not _LINK.search(report[a.end : b.start]):
            continue
        (sa, za, va), (sb, zb, vb) = attrs[i], attrs[i + 1]
        attrs[i + 1] = (sb or sa, zb or za, vb)
        attrs[i] = (sa or sb, za or zb, va)

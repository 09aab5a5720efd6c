"""Rule-based labeler for CheXpert's 14 observations, with attributes the phantom draws from.

How a report is read:

1. It is cut into sentences and each sentence into clauses (``;``, ``:``, "but", "however", "although",
   "except", "other than"...): negation and uncertainty never reach across a clause (:mod:`medvl.text.sentences`).
2. Mentions are found with the phrase tables of :mod:`medvl.text.phrase_rules` (phrases that name a finding) and
   :mod:`medvl.text.subject_rules` (subjects such as "heart size" whose predicate says enlarged / normal /
   borderline).
3. Each mention is negated when a negation cue ("no", "without", "free of", "clear of", "negative for",
   "resolved"...) precedes it in its clause within a short list-like scope ("no focal consolidation, pleural
   effusion or pneumothorax"), or follows it ("... is not seen", "... has resolved"); otherwise it is uncertain
   when an uncertainty cue precedes or follows it ("may represent", "possible", "cannot be excluded",
   "versus", "X or Y" as a differential); otherwise it is positive. Negation wins over uncertainty
   ("no findings to suggest pneumonia" is negative), as in the CheXpert labeler (:mod:`medvl.text.negation`).
4. Attributes (side, zone, severity, device kind) come from the mention's own noun phrase and the
   prepositional phrase after it ("small left pleural effusion", "opacity in the right lower lobe"); a mention
   linked to a neighbour by "may represent", "versus", "or"... shares that neighbour's side and zone
   (:mod:`medvl.text.attributes`).
5. Report labels aggregate mentions per observation with CheXpert's precedence positive > uncertain > negative;
   CheXpert's exception "CHF" / "heart failure" also makes Cardiomegaly uncertain; No Finding is 1 when no
   observation other than Support Devices is positive or uncertain, else blank (never 0). An empty report
   gives all blanks.

Value convention (CheXpert): 1 positive, 0 negated, -1 uncertain, NaN (blank in CSV) not mentioned.

Label convention (:class:`LabelConvention`): CheXpert's definitions by default, where Lung Lesion is a nodule, mass
or tumour; a granuloma ("calcified granuloma", "granulomatous disease") and a calcified nodule are old, healed
findings and count for no observation. IU X-ray's reports mention granulomas in about one report in ten; the
``iu`` convention counts them (and calcified nodules) as Lung Lesion. Either way the mentions are extracted, with
their side and zone, so the phantom draws them; only the labels differ.
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
from enum import Enum
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medvl.errors import DataError, InvalidReportError
from medvl.text.attributes import Severity, Side, Zone, clause_attributes, share_linked_attributes
from medvl.text.chexpert import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN
from medvl.text.negation import DIFFERENTIAL, HYPOTHETICAL, clause_values
from medvl.text.phrase_rules import PHRASE_RULES
from medvl.text.phrases import Candidate, Finding, PhraseRule, SubjectRule
from medvl.text.sentences import HAS_WORD, WORD, split_clauses, split_sentences
from medvl.text.subject_rules import SUBJECT_RULES

__all__ = [
    "Finding",
    "LabelConvention",
    "Mention",
    "Side",
    "Zone",
    "Severity",
    "extract_mentions",
    "label_report",
    "label_reports",
    "aggregate_mentions",
    "decode_report",
    "split_sentences",
    "label_command",
    "format_label",
]

_LABEL_INDEX = {name: i for i, name in enumerate(CHEXPERT_LABELS)}


class LabelConvention(str, Enum):
    """Which definitions turn mentions into labels (see the module docstring)."""

    CHEXPERT = "chexpert"
    IU = "iu"


#: Mentions the ``iu`` convention adds to Lung Lesion and CheXpert's leaves out: ``Mention.extension``.
CALCIFIED_LESION = "calcified lesion"
# A calcification word shortly before a nodule's head: "calcified nodule", "calcified right upper lobe nodule".
_CALCIFIED_BEFORE = re.compile(r"\bcalci(?:fied|fic|fications?)\s+(?:[\w-]+\s+){0,3}$")
_LOOKBACK = 60
_NO_FINDING = "No Finding"
_SUPPORT_DEVICES = "Support Devices"


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
    extension: str | None = None


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# --- matching ---------------------------------------------------------------------------------------------------
def _clause_of(clauses: list[tuple[int, int, int]], starts: list[int], pos: int) -> int:
    return max(0, bisect.bisect_right(starts, pos) - 1)


def _head_span(m: re.Match[str]) -> tuple[int, int] | None:
    """The span of the named group ``head`` (or ``head2`` in patterns with two alternatives), if it matched."""
    for name in ("head", "head2"):
        if name in m.re.groupindex and m.group(name):
            return m.span(name)
    return None


def _phrase_candidates(report: str, rule: PhraseRule) -> Iterable[Candidate]:
    for m in rule.pattern.finditer(report):
        if rule.exclude_before is not None and rule.exclude_before.search(
            report, max(0, m.start() - 40), m.start()
        ):
            continue
        if rule.exclude_after is not None and rule.exclude_after.match(report, m.end()):
            continue
        head = _head_span(m)
        yield Candidate(
            rule.observation, rule.finding, m.start(), m.end(), head, rule.device, rule.value, False
        )


# "XXXX" is IU X-ray's de-identification mark; in "heart size XXXX mildly enlarged" it stands for a verb.
_SUBJECT_VERB = _rx(
    r"\b(?:is|are|was|were|appears?|appearing|remains?|seems?|looks?|has|have|measures?|xxxx)\b"
)
_SUBJECT_ADJACENT = _rx(r"[\s,]*(?:(?:at|near|within|to|in)\s+)?(?:the\s+)?(?:\w+ly\s+)?")
_SUBJECT_STOP = _rx(r";|\b(?:with|but|which|there|however|although|whereas)\b")
_SUBJECT_WORDS = 8
_PREMOD_CHARS = 48
_VALUE_OF_GROUP = {"pos": POSITIVE, "neg": NEGATIVE, "unc": UNCERTAIN}


def _subject_candidates(
    report: str, rule: SubjectRule, clauses: list[tuple[int, int, int]], starts: list[int]
) -> Iterable[Candidate]:
    for m in rule.subject.finditer(report):
        if rule.exclude_after is not None and rule.exclude_after.match(report, m.end()):
            continue
        c_start, c_end, _ = clauses[_clause_of(clauses, starts, m.start())]
        head = _head_span(m)
        pre = report[max(c_start, m.start() - _PREMOD_CHARS) : m.start()]
        pm = rule.premodifier.search(pre)
        if pm is not None:
            start = m.start() - len(pre) + pm.start()
            yield Candidate(
                rule.observation,
                rule.finding,
                start,
                m.end(),
                head,
                None,
                _VALUE_OF_GROUP[pm.lastgroup],
                True,
            )
            continue
        # The predicate: a few words after the subject, stopping where another statement begins.
        window_end = min(c_end, m.end() + 120)
        window = report[m.end() : window_end]
        stop = _SUBJECT_STOP.search(window)
        if stop is not None:
            window = window[: stop.start()]
        comma = window.find(",")
        if comma >= 0 and _SUBJECT_VERB.search(window, 0, comma):
            window = window[:comma]
        words = list(WORD.finditer(window))
        if len(words) > _SUBJECT_WORDS:
            window = window[: words[_SUBJECT_WORDS].start()]
        pred = rule.predicate.search(window)
        if pred is None:
            continue
        # The predicate must be the subject's: after a copula ("heart size is ... enlarged") or right after it
        # ("heart size normal", "heart size at the upper limits of normal"), not "mediastinal nodes as well as
        # large calcifications".
        between = window[: pred.start()]
        if not (_SUBJECT_VERB.search(between) or _SUBJECT_ADJACENT.fullmatch(between)):
            continue
        yield Candidate(
            rule.observation,
            rule.finding,
            m.start(),
            m.end() + pred.end(),
            head,
            None,
            _VALUE_OF_GROUP[pred.lastgroup],
            True,
        )


def _dedupe(cands: list[Candidate]) -> list[Candidate]:
    """Per observation, drop a candidate that overlaps a longer one (e.g. "PICC" inside "PICC line")."""
    cands.sort(key=lambda c: (c.observation, c.start, -(c.end - c.start)))
    kept: list[Candidate] = []
    # Per observation, the kept spans: disjoint, so sorted by start they are sorted by end too.
    taken: dict[str, tuple[list[int], list[int]]] = {}
    for c in sorted(cands, key=lambda c: (-(c.end - c.start), c.start)):
        k_starts, k_ends = taken.setdefault(c.observation, ([], []))
        i = bisect.bisect_left(k_starts, c.end)  # kept spans starting before c ends: [:i]
        if i and k_ends[i - 1] > c.start:
            continue
        k_starts.insert(i, c.start)
        k_ends.insert(i, c.end)
        kept.append(c)
    kept.sort(key=lambda c: (c.start, _LABEL_INDEX[c.observation]))
    return kept


def extract_mentions(report: str) -> list[Mention]:
    """All mentions of CheXpert observations in ``report``, in report order.

    Each carries its value (1 positive, 0 negated, -1 uncertain), the fine-grained :class:`Finding`, the
    phrase with its character offsets, the head word, and the side / zone / severity / device kind read from
    its clause. Derived mentions (CheXpert's "CHF implies uncertain cardiomegaly") share the phrase that
    implied them.
    """
    return _extract(_report_text(report), prefilter=True)


def report_mentions(report: str) -> tuple[Mention, ...]:
    """:func:`extract_mentions`, remembered per report text (mentions are frozen): for a pipeline that reads one
    report's mentions more than once. Synthesis reads them for the text encoder's negated words and again for
    the layout hint."""
    return _remembered_mentions(_report_text(report))


def _report_text(report: object) -> str:
    """``report`` as text (bytes decoded as UTF-8); anything else: TypeError."""
    report = decode_report(report)
    if not isinstance(report, str):
        raise TypeError(f"a report must be a str, not {type(report).__name__}")
    return report


@lru_cache(maxsize=16384)
def _remembered_mentions(report: str) -> tuple[Mention, ...]:
    return tuple(_extract(report, prefilter=True))


_ALL_KEYS = frozenset(k for rule in PHRASE_RULES for k in rule.keys)


def _extract(report: str, *, prefilter: bool) -> list[Mention]:
    sentences = split_sentences(report)
    if not sentences:
        return []
    clauses = split_clauses(report, sentences)
    starts = [c[0] for c in clauses]
    cands: list[Candidate] = []
    lower = report.lower()
    present = {k for k in _ALL_KEYS if k in lower}
    for rule in PHRASE_RULES:
        if prefilter and rule.keys and present.isdisjoint(rule.keys):
            continue
        cands.extend(_phrase_candidates(report, rule))
    for srule in SUBJECT_RULES:
        cands.extend(_subject_candidates(report, srule, clauses, starts))
    # Hypothetical clauses ("if there is concern for fracture, ...") state nothing about this patient.
    hypothetical = {i for i, (a, b, _) in enumerate(clauses) if HYPOTHETICAL.match(report, a, b)}
    cands = [c for c in cands if _clause_of(clauses, starts, c.start) not in hypothetical]
    cands = _dedupe(cands)

    by_clause: dict[int, list[Candidate]] = {}
    for c in cands:
        by_clause.setdefault(_clause_of(clauses, starts, c.start), []).append(c)

    mentions: list[Mention] = []
    for ci, group in sorted(by_clause.items()):
        clause = clauses[ci]
        values = clause_values(report, group, clause)
        # "atelectasis or pneumonia", "edema versus infection": a differential leaves each uncertain.
        for i in range(len(group) - 1):
            a, b = group[i], group[i + 1]
            if a.observation == b.observation or b.start < a.end:
                continue
            if DIFFERENTIAL.match(report[a.end : b.start]):
                for j in (i, i + 1):
                    if values[j] == POSITIVE:
                        values[j] = UNCERTAIN
        attrs = clause_attributes(report, group, clause)
        share_linked_attributes(report, group, attrs)
        for c, v, (side, zone, severity) in zip(group, values, attrs, strict=True):
            head = report[c.head[0] : c.head[1]].lower() if c.head is not None else None
            extension = None
            if c.finding == Finding.GRANULOMA or (
                c.finding == Finding.NODULE
                and _CALCIFIED_BEFORE.search(report[max(0, c.start - _LOOKBACK) : c.start].lower())
            ):
                extension = CALCIFIED_LESION
            mentions.append(
                Mention(
                    observation=c.observation,
                    value=v,
                    finding=c.finding,
                    phrase=report[c.start : c.end],
                    head=head,
                    side=side,
                    zone=zone,
                    severity=severity,
                    device=c.device,
                    sentence=clause[2],
                    start=c.start,
                    end=c.end,
                    extension=extension,
                )
            )
            if c.observation == "Edema" and v != NEGATIVE and head in ("chf", "failure", "congestive"):
                # CheXpert's exception: heart failure makes Cardiomegaly uncertain.
                mentions.append(
                    replace(
                        mentions[-1],
                        observation="Cardiomegaly",
                        value=UNCERTAIN,
                        finding=Finding.CARDIOMEGALY,
                        head=None,
                        side=None,
                        zone=None,
                        severity=None,
                    )
                )
    return mentions


# --- report labels ----------------------------------------------------------------------------------------------
def aggregate_mentions(
    mentions: Iterable[Mention],
    *,
    empty: bool = False,
    convention: LabelConvention | str = LabelConvention.CHEXPERT,
) -> np.ndarray:
    """CheXpert's aggregation of mentions into the 14 labels, shape ``(14,)`` float32 in CheXpert order.

    Per observation: positive if any mention is positive, else uncertain if any is uncertain, else negative if
    mentioned, else NaN. No Finding: 1 when no observation but Support Devices is positive or uncertain, NaN
    otherwise (and NaN for an ``empty`` report). Under CheXpert's ``convention`` mentions with an
    ``extension`` (granulomas, calcified nodules) count for nothing.
    """
    convention = LabelConvention(convention)
    out = np.full(len(CHEXPERT_LABELS), np.nan, dtype=np.float32)
    rank = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}
    best: dict[int, float] = {}
    for m in mentions:
        if m.extension is not None and convention == LabelConvention.CHEXPERT:
            continue
        j = _LABEL_INDEX[m.observation]
        if j not in best or rank[m.value] > rank[best[j]]:
            best[j] = m.value
    for j, v in best.items():
        out[j] = v
    if not empty:
        finding = any(
            v in (POSITIVE, UNCERTAIN) for j, v in best.items() if CHEXPERT_LABELS[j] != _SUPPORT_DEVICES
        )
        if not finding:
            out[_LABEL_INDEX[_NO_FINDING]] = POSITIVE
    return out


def decode_report(report: object) -> object:
    """A report given as bytes, decoded as UTF-8 (never labelled or matched as its ``repr``); anything else as
    it is. Not UTF-8: :class:`InvalidReportError`."""
    if isinstance(report, (bytes, bytearray, memoryview)):
        try:
            return bytes(report).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidReportError(
                f"a report given as bytes is not UTF-8 text ({exc.reason} at byte {exc.start}); decode it first"
            ) from None
    return report


def _is_empty(report: str | None) -> bool:
    return (
        report is None
        or (isinstance(report, float) and math.isnan(report))
        or not HAS_WORD.search(str(report))
    )


def _label_array(report: str, convention: LabelConvention | str = LabelConvention.CHEXPERT) -> np.ndarray:
    report = decode_report(report)
    if _is_empty(report):
        return np.full(len(CHEXPERT_LABELS), np.nan, dtype=np.float32)
    return aggregate_mentions(extract_mentions(report), convention=convention)


def label_report(
    report: str, *, convention: LabelConvention | str = LabelConvention.CHEXPERT
) -> dict[str, float]:
    """CheXpert's 14 labels of one report: name -> 1.0 / 0.0 / -1.0 / NaN (not mentioned)."""
    values = _label_array(report, convention)
    return {name: float(v) for name, v in zip(CHEXPERT_LABELS, values, strict=True)}


def label_reports(
    reports: Sequence[str],
    *,
    progress: bool = False,
    convention: LabelConvention | str = LabelConvention.CHEXPERT,
) -> np.ndarray:
    """Labels of many reports, shape ``(N, 14)`` float32 in CheXpert order, NaN for blank.

    Identical reports are labelled once (IU X-ray and MIMIC repeat many normal reports word for word).
    ``None`` / NaN / empty strings give an all-blank row.
    """
    out = np.full((len(reports), len(CHEXPERT_LABELS)), np.nan, dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    items: Iterable[tuple[int, str]] = enumerate(reports)
    if progress:
        items = tqdm(items, total=len(reports), desc="labelling reports", unit="report")
    for i, report in items:
        report = decode_report(report)
        if _is_empty(report):
            continue
        key = str(report)
        row = cache.get(key)
        if row is None:
            row = cache[key] = _label_array(key, convention)
        out[i] = row
    return out


def format_label(value: float) -> str:
    """CSV cell of a label value: ``1``, ``0``, ``-1`` or blank."""
    if value is None or math.isnan(value):
        return ""
    return str(int(value))


#: The longest CSV field ``medvl label`` reads (the csv module's default, 131,072 characters, is less than some
#: run-on reports); the labeler's time grows linearly with a report's length.
CSV_FIELD_LIMIT = 10_000_000


def _read_reports(file: str) -> list[str]:
    if file == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"standard input is not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
        return [data]
    path = Path(file)
    if not path.exists():
        raise FileNotFoundError(f"{file}: no such file")
    if path.is_dir():
        raise DataError(f"{file} is a directory; medvl label takes a CSV file with a 'report' column or -")
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, CSV_FIELD_LIMIT))
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            try:
                if reader.fieldnames is None or "report" not in reader.fieldnames:
                    cols = ", ".join(reader.fieldnames or []) or "none"
                    raise DataError(
                        f"{file}: no 'report' column (columns: {cols}); medvl label reads the column 'report'"
                    )
                return [row["report"] or "" for row in reader]
            except csv.Error as exc:
                raise DataError(f"{file}: line {reader.line_num}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    finally:
        csv.field_size_limit(limit)


def label_command(file: str, *, convention: LabelConvention | str = LabelConvention.CHEXPERT) -> int:
    """``medvl label [FILE.csv|-]``: CheXpert's 14 labels as CSV on standard output, one row per report.

    An empty report gives a blank row (said on standard error) so that rows stay in input order.
    """
    reports = _read_reports(file)
    labels = label_reports(reports, progress=len(reports) > 5000, convention=convention)
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

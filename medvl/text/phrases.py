"""Vocabulary and rule types of the report labeler: how radiologists name CheXpert's observations.

Two kinds of rules:

* :class:`PhraseRule`: a phrase that names a finding by itself ("pleural effusion", "cardiomegaly", "PICC
  line"). Whether it is positive, negated or uncertain is decided from its sentence and clause
  (see :mod:`medvl.text.labeler`).
* :class:`SubjectRule`: an anatomical subject whose finding lies in its predicate or pre-modifier ("the heart is
  enlarged", "normal heart size", "mediastinum is widened", "interstitial markings are prominent"). Without a
  predicate that says enlarged / normal / borderline the subject is not a mention.

The tables themselves live beside this module: :mod:`medvl.text.phrase_rules` (``PHRASE_RULES``, with the
Support Devices phrases of :mod:`medvl.text.device_rules`) and :mod:`medvl.text.subject_rules`
(``SUBJECT_RULES``).

The lists follow the CheXpert labeler's mention conventions (Irvin et al. 2019, ``phrases/mention``) where known,
with additions the IU X-ray reports need ("blunting of the costophrenic angle", "granuloma" as Lung Lesion,
"scarring" as Lung Opacity, "sternotomy wires" as Support Devices). All patterns are matched case-insensitively
on the report as written so that offsets point into the original text; a named group ``head`` marks the word
that names the finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from medvl.text.chexpert import NEGATIVE, POSITIVE, UNCERTAIN

__all__ = [
    "Candidate",
    "Finding",
    "PhraseRule",
    "PhraseTable",
    "SubjectRule",
    "DEVICE_KINDS",
    "rx",
]


class Finding(str, Enum):
    """Fine-grained kinds of finding that the phantom can draw (several may map to one CheXpert label)."""

    CARDIOMEGALY = "cardiomegaly"
    EFFUSION = "effusion"
    PNEUMOTHORAX = "pneumothorax"
    CONSOLIDATION = "consolidation"
    OPACITY = "opacity"
    PNEUMONIA = "pneumonia"
    ATELECTASIS = "atelectasis"
    EDEMA = "edema"
    NODULE = "nodule"
    MASS = "mass"
    GRANULOMA = "granuloma"
    DEVICE = "device"
    FRACTURE = "fracture"
    ENLARGED_CARDIOMEDIASTINUM = "enlarged_cardiomediastinum"
    PLEURAL_OTHER = "pleural_other"


#: Device kinds that :attr:`Mention.device` takes for Support Devices.
DEVICE_KINDS: tuple[str, ...] = (
    "pacemaker",
    "tube",
    "line",
    "catheter",
    "port",
    "clip",
    "wire",
    "stent",
    "valve",
    "hardware",
    "drain",
    "coil",
    "filter",
    "prosthesis",
    "suture",
    "device",
)

_FLAGS = re.IGNORECASE


def rx(pattern: str) -> re.Pattern[str]:
    """A rule pattern, compiled case-insensitively (reports are matched as written)."""
    return re.compile(pattern, _FLAGS)


@dataclass(frozen=True)
class PhraseRule:
    """A phrase that names a finding.

    ``exclude_before`` is searched in the (up to) 40 characters before the match and must end at the match
    (anchor it with ``$``); ``exclude_after`` is matched (``re.match``, no ``^``) right after it. ``value`` fixes the value
    (e.g. "sharp costophrenic angles" is always a negative effusion mention); otherwise context decides.
    """

    observation: str
    finding: Finding
    pattern: re.Pattern[str]
    device: str | None = None
    exclude_before: re.Pattern[str] | None = None
    exclude_after: re.Pattern[str] | None = None
    value: float | None = None
    #: Lower-case words of which every match contains one (a cheap prefilter); empty: always run the pattern.
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubjectRule:
    """An anatomical subject that becomes a mention through its predicate or pre-modifier.

    ``predicate`` is searched in the few words after the subject (within the clause) and ``premodifier`` must
    end right before it; both have named groups ``unc``, ``neg`` and ``pos`` (the first that matches decides,
    earliest position first). A group missing from a pattern never matches.
    """

    observation: str
    finding: Finding
    subject: re.Pattern[str]
    predicate: re.Pattern[str]
    premodifier: re.Pattern[str]
    exclude_after: re.Pattern[str] | None = None


@dataclass
class Candidate:
    """A match of a rule in a report, before its value and attributes are read: ``start``/``end`` of the phrase,
    ``head`` the span of the word that names the finding."""

    observation: str
    finding: Finding
    start: int
    end: int
    head: tuple[int, int] | None
    device: str | None
    fixed: float | None  # value decided by the rule (subject predicates, fixed negatives)
    subject: bool  # found through a subject's predicate: post-mention cues belong to the predicate


def _literal_keys(pattern: str) -> tuple[str, ...]:
    """Literal prefixes (3+ characters) of the alternatives of the ``head`` (and ``head2``) groups; () when an
    alternative has none or a group is missing.

    Every match of the pattern contains its head, so it contains one of these prefixes: reports without any of
    them skip the pattern (most of the labeler's time went to scanning for phrases that are not there). A
    pattern whose top-level alternatives name their heads ``head`` and ``head2`` needs both groups' keys.
    """
    keys = _group_keys(pattern, "head")
    if "(?P<head2>" in pattern:
        more = _group_keys(pattern, "head2")
        keys = keys + more if keys and more else ()
    return keys


def _group_keys(pattern: str, name: str) -> tuple[str, ...]:
    start = pattern.find(f"(?P<{name}>")
    if start < 0:
        return ()
    i, depth, body = start + len(f"(?P<{name}>"), 1, []
    while i < len(pattern) and depth:
        ch = pattern[i]
        if ch == "\\":
            body.append(pattern[i : i + 2])
            i += 2
            continue
        depth += ch == "("
        depth -= ch == ")"
        if depth:
            body.append(ch)
        i += 1
    alternatives, level, current = [], 0, ""
    for tok in body:
        if tok == "|" and level == 0:
            alternatives.append(current)
            current = ""
            continue
        level += tok == "("
        level -= tok == ")"
        current += tok
    alternatives.append(current)
    keys = []
    for alt in alternatives:
        prefix = ""
        for j, ch in enumerate(alt):
            if ch in "?*{":
                prefix = prefix[:-1]
                break
            if ch in "()[]|+.\\^$":
                break
            prefix += ch
            if j + 1 == len(alt):
                break
        if len(prefix) < 3:
            return ()
        keys.append(prefix.lower())
    return tuple(keys)


class PhraseTable:
    """An ordered list of :class:`PhraseRule`, built one phrase at a time (the labeler keeps the order)."""

    def __init__(self) -> None:
        self.rules: list[PhraseRule] = []

    def add(
        self,
        observation: str,
        finding: Finding,
        pattern: str,
        *,
        device: str | None = None,
        before: str | None = None,
        after: str | None = None,
        value: float | None = None,
    ) -> None:
        self.rules.append(
            PhraseRule(
                observation,
                finding,
                rx(pattern),
                device,
                rx(before) if before else None,
                rx(after) if after else None,
                value,
                _literal_keys(pattern),
            )
        )


#: Values that a fixed rule may carry (re-exported for the labeler).
VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)

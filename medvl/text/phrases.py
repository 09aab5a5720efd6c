"""Phrase tables of the report labeler: how radiologists name CheXpert's observations.

Two kinds of rules:

* :class:`PhraseRule`: a phrase that names a finding by itself ("pleural effusion", "cardiomegaly", "PICC
  line"). Whether it is positive, negated or uncertain is decided from its sentence and clause
  (see :mod:`medvl.text.labeler`).
* :class:`SubjectRule`: an anatomical subject whose finding lies in its predicate or pre-modifier ("the heart is
  enlarged", "normal heart size", "mediastinum is widened", "interstitial markings are prominent"). Without a
  predicate that says enlarged / normal / borderline the subject is not a mention.

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
    "SubjectRule",
    "PHRASE_RULES",
    "SUBJECT_RULES",
    "DEVICE_KINDS",
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


def _rx(pattern: str) -> re.Pattern[str]:
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


# --- shared word classes --------------------------------------------------------------------------------------
_ADV = r"(?:(?:mildly|minimally|moderately|markedly|severely|slightly|significantly|massively|borderline|substantially|somewhat|again|still|now|stably|diffusely|globally|grossly)\s+)?"
_SIDE = r"(?:(?:right|left|bilateral|lateral|posterior|both|the)\s+)*"

# Indexers at NLM read "borderline" heart size as (borderline) cardiomegaly but "upper limits of normal" as
# normal (52/56 vs 10/121 IU reports indexed Cardiomegaly): the first is uncertain, the second negative.
_CARDIO_BORDERLINE = (
    r"borderline(?:\s+(?:enlarged|large|in\s+size|cardiomegaly|size|prominent))?"
    r"|(?:(?:at\s+)?(?:the\s+)?(?:upper|top|high)[-\s]+(?:limits?\s+(?:of\s+)?|range\s+of\s+)?)?normal\s+(?:to|or)\s+"
    r"(?:mildly\s+|minimally\s+|slightly\s+|borderline\s+)?(?:enlarged|large|prominent)"
    r"|(?:possibly|questionably|possibly\s+mildly|perhaps)\s+(?:enlarged|large|prominent)"
)
_CARDIO_NORMAL = (
    r"not\s+(?:\w+\s+)?(?:enlarged|large|increased|widened|prominent)|normal|within\s+normal\s+limits|unremarkable"
    r"|(?:at\s+)?(?:the\s+)?(?:upper|top|high)[-\s]+(?:limits?\s+(?:of\s+)?|range\s+of\s+)?normal"
    r"|no\s+(?:evidence\s+of\s+)?(?:enlargement|cardiomegaly)"
)


def _predicate(pos: str, neg: str | None, unc: str | None) -> re.Pattern[str]:
    parts = []
    if unc:
        parts.append(rf"(?P<unc>{unc})")
    if neg:
        parts.append(rf"(?P<neg>{neg})")
    parts.append(rf"(?P<pos>{pos})")
    return _rx(r"\b(?:" + "|".join(parts) + r")\b")


def _premodifier(pos: str, neg: str | None, unc: str | None) -> re.Pattern[str]:
    parts = []
    if unc:
        parts.append(rf"(?P<unc>{unc})")
    if neg:
        parts.append(rf"(?P<neg>{neg})")
    parts.append(rf"(?P<pos>{pos})")
    return _rx(r"\b(?:" + "|".join(parts) + r")[\s,-]+(?:the\s+|a\s+)?$")


_ENLARGED = (
    _ADV
    + r"(?:enlarged|enlargement|large|larger|increased|prominent|prominence|big|globular|cardiomegaly|dilated)"
)
_WIDENED = (
    _ADV
    + r"(?:widened|widening|wide|enlarged|enlargement|prominent|prominence|increased|large|broad|broadened)"
)

SUBJECT_RULES: tuple[SubjectRule, ...] = (
    SubjectRule(
        "Cardiomegaly",
        Finding.CARDIOMEGALY,
        _rx(r"\b(?:heart|cardiac)(?:\s+(?:size|silhouette|shadow|contours?|diameter|border|borders))?\b"),
        _predicate(_ENLARGED, _CARDIO_NORMAL, _CARDIO_BORDERLINE),
        _premodifier(
            _ADV + r"(?:enlarged|large|prominent|increased|big|globular)",
            r"(?:(?:top|upper|high)[-\s]+)?normal(?:[-\s]+(?:sized?|appearing|in\s+size))?|not\s+enlarged|stable\s+normal",
            r"borderline(?:[-\s]+(?:enlarged|large|prominent|sized?))?",
        ),
        exclude_after=_rx(r"\s*(?:failure|disease|valve|surgery|catheterization|transplant)"),
    ),
    SubjectRule(
        "Enlarged Cardiomediastinum",
        Finding.ENLARGED_CARDIOMEDIASTINUM,
        _rx(
            r"\b(?:cardio[-\s]?mediastinal|(?:(?:superior|upper)\s+)?mediastinal)(?:\s+(?:silhouettes?|contours?|shadow|size|width|structures|borders?|outlines?))?\b"
            r"|\b(?:(?:superior|upper)\s+)?(?:cardio)?mediastinum\b"
        ),
        _predicate(_WIDENED, _CARDIO_NORMAL, _CARDIO_BORDERLINE),
        _premodifier(
            _ADV + r"(?:enlarged|widened|wide|prominent|increased|broad|broadened)",
            r"(?:(?:top|upper|high)[-\s]+)?normal(?:[-\s]+(?:sized?|appearing|in\s+size))?|stable\s+normal",
            r"borderline(?:[-\s]+(?:enlarged|widened|prominent))?",
        ),
        exclude_after=_rx(r"\s*(?:lymph|nodes?|adenopathy|lymphadenopathy|mass|masses|air|emphysema|shift)"),
    ),
    SubjectRule(
        "Lung Opacity",
        Finding.OPACITY,
        _rx(
            r"\b(?:(?:interstitial|bronchovascular|lung|pulmonary|reticular|reticulonodular|parenchymal)\s+)+(?P<head>markings?)\b"
        ),
        _predicate(
            _ADV
            + r"(?:increased|prominent|prominence|coarse|coarsened|coarsening|accentuated|accentuation|chronic|thickened|reticular|streaky)",
            r"normal|within\s+normal\s+limits|unremarkable|not\s+(?:\w+\s+)?(?:increased|prominent)",
            None,
        ),
        _premodifier(
            _ADV
            + r"(?:increased|prominent|coarse|coarsened|accentuated|chronic(?:ally\s+increased|[-\s]appearing)?|diffuse|bilateral|reticular|streaky|irregular|prominence\s+of|increase\s+in|accentuation\s+of|(?:mild|minimal|slight)\s+(?:increase|prominence)\s+(?:in|of))",
            r"normal",
            None,
        ),
    ),
    SubjectRule(
        "Edema",
        Finding.EDEMA,
        _rx(
            r"\b(?:pulmonary\s+|central\s+|hilar\s+|lung\s+)*(?P<head>vascularity|vasculature|vascular\s+markings|vessels)\b"
        ),
        _predicate(
            _ADV
            + r"(?:increased|prominent|engorged|indistinct|congested|cephalized|cephalization|redistributed|redistribution|plethoric)",
            r"normal|within\s+normal\s+limits|unremarkable|not\s+(?:\w+\s+)?(?:increased|prominent|engorged|congested)",
            None,
        ),
        _premodifier(
            _ADV + r"(?:increased|prominent|engorged|indistinct|congested|cephalized|plethoric)", None, None
        ),
    ),
)

# --- phrase rules -----------------------------------------------------------------------------------------------
_R: list[PhraseRule] = []


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


def _add(
    observation: str,
    finding: Finding,
    pattern: str,
    *,
    device: str | None = None,
    before: str | None = None,
    after: str | None = None,
    value: float | None = None,
) -> None:
    _R.append(
        PhraseRule(
            observation,
            finding,
            _rx(pattern),
            device,
            _rx(before) if before else None,
            _rx(after) if after else None,
            value,
            _literal_keys(pattern),
        )
    )


# Cardiomegaly and Enlarged Cardiomediastinum (besides the subject rules above)
_add("Cardiomegaly", Finding.CARDIOMEGALY, r"\b(?P<head>cardiomegaly)\b")
_add(
    "Cardiomegaly",
    Finding.CARDIOMEGALY,
    r"\b(?:cardiac|heart)\s+(?:silhouette\s+|shadow\s+|size\s+)?(?P<head>enlargement)\b",
)
_add(
    "Cardiomegaly",
    Finding.CARDIOMEGALY,
    r"\b(?P<head>enlargement|prominence)\s+of\s+the\s+(?:(?:right|left)\s+)?(?:heart|cardiac\s+(?:silhouette|shadow|size|contours?))\b",
)
# "interval increase in heart size" (but "no increase in heart size" says nothing about cardiomegaly)
_add(
    "Cardiomegaly",
    Finding.CARDIOMEGALY,
    r"\b(?P<head>increase)\s+in\s+(?:the\s+)?(?:heart\s+size|size\s+of\s+the\s+(?:heart|cardiac\s+silhouette)|cardiac\s+(?:size|silhouette))\b",
    before=r"\bno\s+(?:\w+\s+){0,2}$",
)
_add(
    "Enlarged Cardiomediastinum",
    Finding.ENLARGED_CARDIOMEDIASTINUM,
    r"\b(?:cardio[-\s]?mediastinal|mediastinal)\s+(?:silhouette\s+|contours?\s+)?(?P<head>widening|enlargement)\b",
)
_add(
    "Enlarged Cardiomediastinum",
    Finding.ENLARGED_CARDIOMEDIASTINUM,
    r"\b(?P<head>widening|enlargement|prominence|fullness)\s+of\s+the\s+(?:(?:superior|upper)\s+)?(?:cardio)?mediastin(?:um|al\s+(?:silhouette|contours?|shadow))\b",
)

# Pleural Effusion
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?:pleural\s+)?(?P<head>effusions?)\b",
    before=r"\b(?:pericardial|joint|knee|shoulder|elbow|subpulmonic\s+pericardial)[\s-]+(?:\w+\s+)?$",
)
_add("Pleural Effusion", Finding.EFFUSION, r"\bpleural\s+(?P<head>fluid)\b")
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>fluid)\s+(?:with)?in\s+the\s+"
    + _SIDE
    + r"(?:pleural\s+spaces?|(?:minor|major|horizontal|oblique)\s+fissures?)",
)
_add("Pleural Effusion", Finding.EFFUSION, r"\b(?P<head>hydrothorax|hydropneumothorax|hemothorax|empyema)\b")
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>blunting|obliteration)\s+of\s+(?:both\s+|the\s+)?"
    + _SIDE
    + r"(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>blunt(?:ed|ing))\s+(?:of\s+)?"
    + _SIDE
    + r"(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?P<head>blunting|blunted)\s+(?:of\s+)?(?:both\s+|the\s+)?"
    + _SIDE
    + r"(?:(?:lateral|posterior|anterior)\s+(?:and\s+\w+\s+)?)?(?:sulcus|sulci)\b",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?:costophrenic|cp)\s+(?:(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)\s+)?(?:(?:is|are|appears?|remains?)\s+)?"
    r"(?:(?:mildly|minimally|slightly|again|still|now|persistently)\s+)?(?P<head>blunting|blunted)\b",
)
_add(
    "Pleural Effusion",
    Finding.EFFUSION,
    r"\b(?:(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx)\s+(?:are|is|appear|appears|remain)\s+(?:\w+\s+)?(?:sharp|sharply\s+defined|clear|preserved|well[-\s]defined)"
    r"|(?:sharp|clear|preserved)\s+(?:\w+\s+)?(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?|xxxx))\b",
    value=NEGATIVE,
)

# Pneumothorax
_add("Pneumothorax", Finding.PNEUMOTHORAX, r"\b(?P<head>(?:hydro)?pneumothora(?:x|ces|xes|xs))\b")
_add("Pneumothorax", Finding.PNEUMOTHORAX, r"\bpleural\s+(?P<head>air)\b(?:\s+collections?)?")

# Consolidation
_add("Consolidation", Finding.CONSOLIDATION, r"\b(?P<head>consolidat(?:ion|ions|ive|ed|ing))\b")

# Pneumonia
_add("Pneumonia", Finding.PNEUMONIA, r"\b(?P<head>(?:broncho)?pneumonias?|pneumonitis)\b")
_add(
    "Pneumonia",
    Finding.PNEUMONIA,
    r"\b(?P<head>infections?)\b",
    before=r"\b(?:granulomatous|prior|old|remote|previous|healed|past|tb|tuberculous|fungal|histoplasm\w*|viral|urinary|skin)\s+(?:\w+\s+)?$",
)
_add(
    "Pneumonia",
    Finding.PNEUMONIA,
    r"\b(?P<head>infectious)\s+(?:\w+\s+)?(?:process|etiology|cause|infiltrates?|disease|pneumonitis|consolidation)\b",
)

# Atelectasis
_add("Atelectasis", Finding.ATELECTASIS, r"\b(?P<head>atelecta(?:sis|ses|tic|sia))\b")
_add(
    "Atelectasis", Finding.ATELECTASIS, r"\b(?:lobar|lobe|lung|segmental|subsegmental)\s+(?P<head>collapse)\b"
)
_add(
    "Atelectasis",
    Finding.ATELECTASIS,
    r"\b(?P<head>collapse)\s+of\s+the\s+(?:\w+\s+){0,3}(?:lobes?|lungs?|lingula|segments?)\b",
)
_add(
    "Atelectasis", Finding.ATELECTASIS, r"\b(?P<head>collapsed)\s+(?:\w+\s+){0,2}(?:lobes?|lungs?|lingula)\b"
)

# Edema
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?P<head>edema|oedema|edematous)\b",
    before=r"\b(?:soft[-\s]tissue|subcutaneous|extremity|facial|chest\s+wall|mucosal|leg|pedal|scalp|airway)\s+(?:\w+\s+)?$",
)
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?:(?:pulmonary|vascular|venous|interstitial|central|hilar|perihilar|mild|moderate)\s+)*(?P<head>congestion)\b",
    before=r"\b(?:nasal|sinus|hepatic|liver|splenic)\s+$",
)
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?:pulmonary\s+|central\s+|hilar\s+)*vascular\s+(?P<head>prominence|engorgement|redistribution|indistinctness|plethora)\b",
)
_add("Edema", Finding.EDEMA, r"\bpulmonary\s+venous\s+(?P<head>hypertension|engorgement)\b")
_add(
    "Edema",
    Finding.EDEMA,
    r"\bpulmonary\s+xxxx\s+(?:are|is|appear|appears)\s+(?:\w+ly\s+)?(?P<head>engorged)\b",
)
_add(
    "Edema",
    Finding.EDEMA,
    r"\b(?P<head>indistinct)\s+(?:pulmonary\s+|central\s+|hilar\s+)?vascula\w+(?:\s+margin\w*)?",
)
_add("Edema", Finding.EDEMA, r"\b(?P<head>congestive)\s+(?:heart\s+)?failure\b")
_add("Edema", Finding.EDEMA, r"\b(?P<head>chf)\b")
_add("Edema", Finding.EDEMA, r"\bheart\s+(?P<head>failure)\b")
_add("Edema", Finding.EDEMA, r"\b(?P<head>cephalization)\b")
_add("Edema", Finding.EDEMA, r"\b(?P<head>kerley)\b")
_add("Edema", Finding.EDEMA, r"\bfluid\s+(?P<head>overload)\b")

# Lung Opacity
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>opaci(?:ty|ties|fication|fications|fied))\b",
    before=r"\b(?:nodular|nodule[-\s]like|round|rounded|mass[-\s]like|pleural[-\s]based|pleuroparenchymal|pleural[-\s]parenchymal)[\s-]+(?:\w+\s+)?$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>infiltrat(?:e|es|ion|ions|ive))\b",
    before=r"\bnodular[\s-]+$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>airspace|air-space)\s+(?:disease|process|opacit\w*|densit\w*|filling)\b",
)
_add(
    "Lung Opacity", Finding.OPACITY, r"\bair\s+space\s+(?P<head>disease|process|opacity|opacities|filling)\b"
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?:increased|hazy|patchy|streaky|linear|ill-defined|ground[-\s]glass|airspace|interstitial|reticular|parenchymal|focal)\s+(?:\w+\s+)?(?P<head>densit(?:y|ies))\b",
    before=r"\b(?:nodular|round|rounded|calcified|bone|breast|soft\s+tissue)\s+$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>densit(?:y|ies))\s+(?:\w+\s+){0,2}(?:in|at|within|of|involving|projecting\s+over|overlying)\s+the\s+(?:\w+\s+){0,3}(?:lobes?|lungs?|bases?|base|apex|apices|lingula|hemithorax|zones?|fields?|hilum|hila|retrocardiac|region)\b",
    before=r"\b(?:nodular|round|rounded|calcified|bone|breast|soft\s+tissue|mineral|granulomatous)\s+(?:\w+\s+)?$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?:(?:retrocardiac|basilar|bibasilar|perihilar|lingular|apical)\s+)(?P<head>densit(?:y|ies))\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\binterstitial\s+(?P<head>pattern|prominence|thickening|disease|lung\s+disease|changes?|process|abnormalit(?:y|ies)|fibrosis|infiltrates?)\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>reticulonodular|reticular)\s+(?:pattern|changes?|markings?|opacit\w*|densit\w*|prominence)\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>reticulation|haziness|fibrosis|fibrotic)\b",
    before=r"\b(?:pleural|cystic)[\s-]+$",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?:peribronchial|bronchial\s+wall|airway\s+wall|bronchovascular)\s+(?P<head>thickening|cuffing)\b",
)
_add(
    "Lung Opacity",
    Finding.OPACITY,
    r"\b(?P<head>scar(?:s|ring|red)?)\b",
    before=r"\b(?:pleural|pleuroparenchymal|pleural[-\s]parenchymal|pleural\s+parenchymal|pleural\s+based|skin|surgical|sternotomy|chest\s+wall|soft\s+tissue)[\s-]+(?:\w+\s+)?$",
)

# Lung Lesion
_add(
    "Lung Lesion",
    Finding.NODULE,
    r"\b(?P<head>nodules?|nodularity|micronodules?)\b",
    before=r"\b(?:thyroid|breast|lymph|nipple|skin|soft\s+tissue|liver|hepatic|renal|adrenal)[\s-]+(?:\w+\s+)?$",
)
_add(
    "Lung Lesion",
    Finding.NODULE,
    r"\bnodular\s+(?P<head>opacit\w*|densit\w*|lesions?|infiltrates?|foci|focus|shadows?)\b",
)
_add("Lung Lesion", Finding.NODULE, r"\b(?:round|rounded)\s+(?P<head>opacit(?:y|ies)|densit(?:y|ies))\b")
_add(
    "Lung Lesion",
    Finding.NODULE,
    r"\b(?P<head>lesions?)\b",
    before=r"\b(?:lytic|sclerotic|blastic|bone|bony|osseous|skin|cutaneous|osteolytic|expansile|rib|spine|spinal|vertebral|liver|hepatic)[\s-]+(?:\w+\s+)?$",
)
_add(
    "Lung Lesion",
    Finding.MASS,
    r"\b(?P<head>mass(?:es)?)\b",
    before=r"\b(?:soft\s+tissue|muscle|bone|breast|body|chest\s+wall|thyroid|abdominal|neck)[\s-]+(?:\w+\s+)?$",
    after=r"[\s-]+effect",
)
_add(
    "Lung Lesion",
    Finding.MASS,
    r"\b(?P<head>tumou?rs?|neoplasms?|neoplastic|carcinoma|malignancy|cancer|metastas[ie]s|metastatic)\b",
    before=r"\b(?:breast|prostate|colon|renal|thyroid|bladder|skin|ovarian|cervical|uterine)\s+$",
)
_add("Lung Lesion", Finding.MASS, r"\bcavitary\s+(?P<head>lesions?|masse?s?|nodules?)\b")
_add("Lung Lesion", Finding.GRANULOMA, r"\b(?P<head>granulomas?|granulomata)\b")
_add(
    "Lung Lesion",
    Finding.GRANULOMA,
    r"\b(?P<head>granulomatous)\s+(?:\w+\s+)?(?:disease|changes?|process|sequela\w*|infection|exposure|scarring|calcifications?|nodes?|foci|focus|lesions?|pattern)\b",
)

# Pleural Other
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\bpleural\s+(?P<head>thickening|plaques?|calcifications?|scarring|scars?|fibrosis|reaction|calcified\s+plaques?)\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?:pleuroparenchymal|pleural[-\s]parenchymal|pleural[-\s]+based|parenchymal[-\s]pleural)\s+(?P<head>scarring|scars?|thickening|opacit(?:y|ies)|densit(?:y|ies)|changes?|fibrosis)\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?P<head>thickening)\s+of\s+the\s+" + _SIDE + r"(?:apical\s+)?pleura\b",
)
_add("Pleural Other", Finding.PLEURAL_OTHER, r"\b(?P<head>fibrothorax|pleurodesis)\b")
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?:interlobar\s+)?(?:fissural|fissure)\s+(?P<head>thickening)\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?P<head>thickening)\s+(?:in|of)\s+the\s+(?:\w+\s+){0,2}fissures?\b",
)
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\bpleural[-\s]\w+\s+(?P<head>scarring|scars?|thickening)\b",
    before=r"\b(?:no|without)\s+$",
)
_add("Pleural Other", Finding.PLEURAL_OTHER, r"\bapical\s+(?:pleural\s+)?(?P<head>cap(?:s|ping)?)\b")
_add(
    "Pleural Other",
    Finding.PLEURAL_OTHER,
    r"\b(?:calcified\s+)?(?P<head>plaques?)\b",
    before=r"\b(?:atherosclerotic|aortic|vascular|arterial|pleural|calcified\s+pleural)[\s-]+(?:\w+\s+)?$",
)

# Fracture
_add("Fracture", Finding.FRACTURE, r"\b(?P<head>fractures?|fractured|fx|fxs)\b")

# Support Devices
_SD = "Support Devices"
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:(?:dual|single|biventricular|left|right|chest|cardiac|permanent|transvenous)[-\s]+(?:chamber\s+|lead\s+|sided\s+|wall\s+)?)?"
    r"(?P<head>pacemakers?|pacers?|defibrillators?|aicds?|icds?|cardioverter[-\s]defibrillators?|pacemaker/defibrillator|pacer/defibrillator)(?:\s+(?:leads?|wires?|generators?|devices?|battery))?\b",
    device="pacemaker",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:pacer|pacemaker|pacing|transvenous|epicardial|icd|aicd|defibrillator|ventricular|atrial|cardiac)\s+(?P<head>leads?|wires?|generators?)\b",
    device="pacemaker",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:endotracheal|et|nasogastric|ng|og|orogastric|feeding|chest|thoracostomy|tracheostomy|tracheotomy|enteric|gastric|dobhoff|dobbhoff|gastrostomy|jejunostomy|nasoenteric|g|j|pigtail)[-\s]+(?P<head>tubes?)\b",
    device="tube",
)
_add(_SD, Finding.DEVICE, r"\b(?P<head>ett|tracheostomy|trach|dobhoff|dobbhoff)\b", device="tube")
_add(_SD, Finding.DEVICE, r"\b(?:support|monitoring)\s+(?P<head>tubes?|lines?)\b", device="line")
_add(_SD, Finding.DEVICE, r"\b(?P<head>tubes)\s+and\s+lines\b", device="tube")
_add(_SD, Finding.DEVICE, r"\b(?P<head>lines)\s+and\s+tubes\b", device="line")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:picc|central|central\s+venous|venous|ij|internal\s+jugular|subclavian|swan[-\s]ganz|arterial|dialysis|hickman|hemodialysis|port|triple[-\s]lumen|double[-\s]lumen)\s+(?:\w+\s+)?(?P<head>lines?)\b",
    device="line",
)
_add(_SD, Finding.DEVICE, r"\b(?P<head>picc)\b", device="line")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:swan[-\s]ganz\s+|pulmonary\s+artery\s+|central\s+venous\s+|venous\s+|dialysis\s+|hemodialysis\s+|indwelling\s+|pigtail\s+)?(?P<head>catheters?)\b",
    device="catheter",
    before=r"\b(?:urinary|foley|bladder)\s+$",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>port[-\s]?a[-\s]?cath|portacath|mediport|powerport|infusaport)\b",
    device="port",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:chest|infusion|venous|subcutaneous|power|central\s+venous|chest\s+wall|right[-\s]sided|left[-\s]sided|right|left)\s+(?P<head>port)\b",
    device="port",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:surgical|vascular|cholecystectomy|metallic|metal|hemostatic|aneurysm)?\s*(?P<head>clips?|staples)\b",
    device="clip",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:median\s+)?(?:sternotomy|sternal|cerclage|surgical|metallic|suture)\s+(?P<head>wires?|sutures)\b",
    device="wire",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>wires?)\b",
    device="wire",
    before=r"\b(?:guide|pacer|pacemaker|pacing|transvenous|epicardial|icd|aicd|defibrillator|ventricular|atrial|cardiac)\s+$",
)
# A bare "sternotomy" is a procedure, not a device: NLM's indexers do not index it as one (its wires are).
_add(_SD, Finding.DEVICE, r"\b(?P<head>stents?)\b", device="stent")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:prosthetic|mechanical|artificial|bioprosthetic|replacement)\s+(?:\w+\s+)?(?P<head>valves?)\b",
    device="valve",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:aortic|mitral|tricuspid)\s+(?P<head>valve)\s+(?:replacement|prosthes[ie]s)\b",
    device="valve",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:orthopedic\s+|surgical\s+|fixation\s+|spinal\s+|fusion\s+|postsurgical\s+|metallic\s+|cervical\s+|thoracic\s+|lumbar\s+)*(?P<head>hardware)\b",
    device="hardware",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:fixation|orthopedic|surgical|metallic|compression|fusion|spinal|harrington)\s+(?:\w+\s+)?(?P<head>plates?|screws?|rods?)\b",
    device="hardware",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:chest\s+|pleural\s+|surgical\s+|mediastinal\s+|pigtail\s+)?(?P<head>drains?)\b",
    device="drain",
)
_add(_SD, Finding.DEVICE, r"\b(?:embolization\s+)?(?P<head>coils?)\b", device="coil")
_add(_SD, Finding.DEVICE, r"\b(?:ivc|vena\s+cava|caval)\s+(?P<head>filter)\b", device="filter")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>prosthes[ie]s|arthroplasty|arthroplasties|implants?)\b",
    device="prosthesis",
)
# IU X-ray redacts some words as "XXXX": "left chest XXXX with tip in the SVC" is a port or catheter.
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:chest|chest\s+wall|ij|subclavian|jugular)\s+(?P<head>xxxx)\s+(?:with\s+(?:its\s+|the\s+|a\s+)?|whose\s+)?(?:distal\s+)?tip\b",
    device="catheter",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:cardiac|pacer|pacemaker|pulse|xxxx)\s+(?P<head>generator)\b",
    device="pacemaker",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:left|right)(?:-sided)?\s+(?:sided\s+)?chest\s+(?:wall\s+)?(?P<head>xxxx)\b(?!\s+(?:are|is\s+within|representing))",
    device="catheter",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\bcardiac\s+(?P<head>xxxx)\s+(?:generator|in\s+stable|and\s+leads|with\s+leads|project\w*|is\s+intact|are\s+visualized|device)\b",
    device="pacemaker",
)
_add(_SD, Finding.DEVICE, r"\b(?P<head>xxxx)-a-xxxx\b", device="port")
_add(_SD, Finding.DEVICE, r"\b(?P<head>portacatheter|port-a-catheter)\b", device="port")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:closure|occluder|occlusion)\s+(?P<head>device)\b|\b(?:septal\s+)?(?P<head2>occluder)\b",
    device="device",
)
_add(_SD, Finding.DEVICE, r"\b(?:cabg|bypass|graft|surgical)\s+(?P<head>markers?)\b", device="clip")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?P<head>leads?)\s+(?:\w+\s+){0,3}(?:the\s+)?(?:right|left)\s+(?:atri|ventric)\w*",
    device="pacemaker",
)
_add(_SD, Finding.DEVICE, r"\b(?:\w+\s+)?(?P<head>stimulator)\b", device="device")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:vp|ventriculoperitoneal|ventriculoatrial|shunt)\s+(?P<head>shunt|tubing|catheter)\b",
    device="tube",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:cardiac\s+|heart\s+)?(?P<head>valve)\s+(?:replacement|prosthes[ie]s)\b",
    device="valve",
)
_add(_SD, Finding.DEVICE, r"\b(?:internal\s+)?(?P<head>fixation)\b", device="hardware")
_add(_SD, Finding.DEVICE, r"\b(?:bone|suture)\s+(?P<head>anchors?)\b", device="hardware")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:surgical\s+|radiopaque\s+)?(?P<head>sutures?)(?:\s+(?:material|line))?\b",
    device="suture",
)
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:ecg|ekg|telemetry|monitoring|monitor|cardiac\s+monitoring)\s+(?P<head>leads?|electrodes?|wires?)\b",
    device="wire",
)
_add(_SD, Finding.DEVICE, r"\b(?:loop\s+|cardiac\s+|event\s+)(?P<head>recorder|monitor)\b", device="device")
_add(
    _SD,
    Finding.DEVICE,
    r"\b(?:medical|support|cardiac|implanted|implantable|monitoring|electronic|surgical|metallic)\s+(?P<head>devices?)\b",
    device="device",
)

PHRASE_RULES: tuple[PhraseRule, ...] = tuple(_R)

#: Values that a fixed rule may carry (re-exported for the labeler).
VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)

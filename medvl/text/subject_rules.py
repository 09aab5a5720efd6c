"""Subject rules of the report labeler: anatomical subjects whose predicate or pre-modifier names a finding.

"the heart is enlarged", "normal heart size", "mediastinum is widened", "interstitial markings are prominent",
"pulmonary vascularity is increased" (see :class:`~medvl.text.phrases.SubjectRule`).
"""

from __future__ import annotations

import re

from medvl.text.phrases import Finding, SubjectRule, rx

__all__ = ["SUBJECT_RULES"]

# --- shared word classes --------------------------------------------------------------------------------------
_ADV = r"(?:(?:mildly|minimally|moderately|markedly|severely|slightly|significantly|massively|borderline|substantially|somewhat|again|still|now|stably|diffusely|globally|grossly)\s+)?"

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


def _value_groups(pos: str, neg: str | None, unc: str | None) -> str:
    """Alternatives named ``unc``, ``neg`` and ``pos`` (in that order; a missing one is left out)."""
    parts = []
    if unc:
        parts.append(rf"(?P<unc>{unc})")
    if neg:
        parts.append(rf"(?P<neg>{neg})")
    parts.append(rf"(?P<pos>{pos})")
    return "|".join(parts)


def _predicate(pos: str, neg: str | None, unc: str | None) -> re.Pattern[str]:
    return rx(r"\b(?:" + _value_groups(pos, neg, unc) + r")\b")


def _premodifier(pos: str, neg: str | None, unc: str | None) -> re.Pattern[str]:
    return rx(r"\b(?:" + _value_groups(pos, neg, unc) + r")[\s,-]+(?:the\s+|a\s+)?$")


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
        rx(r"\b(?:heart|cardiac)(?:\s+(?:size|silhouette|shadow|contours?|diameter|border|borders))?\b"),
        _predicate(_ENLARGED, _CARDIO_NORMAL, _CARDIO_BORDERLINE),
        _premodifier(
            _ADV + r"(?:enlarged|large|prominent|increased|big|globular)",
            r"(?:(?:top|upper|high)[-\s]+)?normal(?:[-\s]+(?:sized?|appearing|in\s+size))?|not\s+enlarged|stable\s+normal",
            r"borderline(?:[-\s]+(?:enlarged|large|prominent|sized?))?",
        ),
        exclude_after=rx(r"\s*(?:failure|disease|valve|surgery|catheterization|transplant)"),
    ),
    SubjectRule(
        "Enlarged Cardiomediastinum",
        Finding.ENLARGED_CARDIOMEDIASTINUM,
        rx(
            r"\b(?:cardio[-\s]?mediastinal|(?:(?:superior|upper)\s+)?mediastinal)(?:\s+(?:silhouettes?|contours?|shadow|size|width|structures|borders?|outlines?))?\b"
            r"|\b(?:(?:superior|upper)\s+)?(?:cardio)?mediastinum\b"
        ),
        _predicate(_WIDENED, _CARDIO_NORMAL, _CARDIO_BORDERLINE),
        _premodifier(
            _ADV + r"(?:enlarged|widened|wide|prominent|increased|broad|broadened)",
            r"(?:(?:top|upper|high)[-\s]+)?normal(?:[-\s]+(?:sized?|appearing|in\s+size))?|stable\s+normal",
            r"borderline(?:[-\s]+(?:enlarged|widened|prominent))?",
        ),
        exclude_after=rx(r"\s*(?:lymph|nodes?|adenopathy|lymphadenopathy|mass|masses|air|emphysema|shift)"),
    ),
    SubjectRule(
        "Lung Opacity",
        Finding.OPACITY,
        rx(
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
        rx(
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

"""Negation, uncertainty, lists, clause scope, attributes and No Finding logic of the labeler."""

from __future__ import annotations

import math

import pytest

from medvl.text.labeler import Mention, extract_mentions, label_report, split_sentences


def _labels(report: str) -> dict[str, float]:
    return {k: v for k, v in label_report(report).items() if not math.isnan(v)}


def _mentions(report: str, observation: str) -> list[Mention]:
    return [m for m in extract_mentions(report) if m.observation == observation]


def _one(report: str, observation: str) -> Mention:
    found = _mentions(report, observation)
    assert len(found) == 1, (report, found)
    return found[0]


# --- negation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("report", "observation"),
    [
        ("No pleural effusion.", "Pleural Effusion"),
        ("There is no pneumothorax.", "Pneumothorax"),
        ("Lungs are clear without focal consolidation.", "Consolidation"),
        ("The lungs are free of focal airspace disease.", "Lung Opacity"),
        ("The lungs are clear of consolidation.", "Consolidation"),
        ("Negative for pneumothorax.", "Pneumothorax"),
        ("Previously seen left pleural effusion has resolved.", "Pleural Effusion"),
        ("Interval resolution of the right lower lobe pneumonia.", "Pneumonia"),
        ("No evidence of pulmonary edema.", "Edema"),
        ("Pneumothorax is not seen.", "Pneumothorax"),
        ("Pleural effusion is no longer visualized.", "Pleural Effusion"),
        ("The heart is not enlarged.", "Cardiomegaly"),
        ("Heart size is normal.", "Cardiomegaly"),
        ("Normal heart size.", "Cardiomegaly"),
        ("Heart size is at the upper limits of normal.", "Cardiomegaly"),
        ("Cardiomediastinal silhouette is within normal limits.", "Enlarged Cardiomediastinum"),
        ("No acute fracture.", "Fracture"),
        ("The ET tube has been removed.", "Support Devices"),
        ("No focal airspace consolidation to suggest pneumonia.", "Pneumonia"),
        ("No definite pleural effusion.", "Pleural Effusion"),
        ("No large pleural effusion.", "Pleural Effusion"),
    ],
)
def test_negated(report: str, observation: str) -> None:
    assert _labels(report)[observation] == 0.0


@pytest.mark.parametrize(
    "report",
    [
        "No focal consolidation, pleural effusion or pneumothorax.",
        "No focal consolidation, large pleural effusion, or pneumothorax is identified.",
        "There is no pneumothorax, pleural effusion, or focal airspace consolidation.",
        "No consolidation, effusion or pneumothorax.",
        "Consolidation, pleural effusion and pneumothorax are not seen.",
        "Without consolidation, effusion, or pneumothorax.",
    ],
)
def test_negation_spans_lists(report: str) -> None:
    labels = _labels(report)
    assert labels["Consolidation"] == 0.0
    assert labels["Pleural Effusion"] == 0.0
    assert labels["Pneumothorax"] == 0.0
    assert labels["No Finding"] == 1.0


def test_no_change_is_not_negation() -> None:
    assert _labels("No change in the small left pleural effusion.")["Pleural Effusion"] == 1.0
    assert _labels("No interval change in mild cardiomegaly.")["Cardiomegaly"] == 1.0


# --- uncertainty ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("report", "observation"),
    [
        ("Left basilar opacity may represent atelectasis.", "Atelectasis"),
        ("Pneumonia cannot be excluded.", "Pneumonia"),
        ("Cannot exclude a small left effusion.", "Pleural Effusion"),
        ("Possible small right pleural effusion.", "Pleural Effusion"),
        ("Findings are suggestive of pulmonary edema.", "Edema"),
        ("Findings are concerning for pneumonia.", "Pneumonia"),
        ("Atelectasis versus consolidation in the left lower lobe.", "Atelectasis"),
        ("Atelectasis versus consolidation in the left lower lobe.", "Consolidation"),
        ("Right base opacity, likely atelectasis.", "Atelectasis"),
        ("Questionable small pneumothorax at the right apex.", "Pneumothorax"),
        ("Borderline cardiomegaly.", "Cardiomegaly"),
        ("Heart size is borderline enlarged.", "Cardiomegaly"),
        ("Bibasilar atelectasis or scarring.", "Atelectasis"),
        ("Pneumothorax is not excluded.", "Pneumothorax"),
    ],
)
def test_uncertain(report: str, observation: str) -> None:
    assert _labels(report)[observation] == -1.0


def test_uncertainty_does_not_reach_the_finding_before_it() -> None:
    labels = _labels("Right lower lobe opacity which may represent pneumonia.")
    assert labels["Lung Opacity"] == 1.0 and labels["Pneumonia"] == -1.0


def test_chf_makes_cardiomegaly_uncertain() -> None:
    labels = _labels("Findings compatible with CHF.")
    assert labels["Edema"] == -1.0 and labels["Cardiomegaly"] == -1.0
    assert _labels("Congestive heart failure.")["Cardiomegaly"] == -1.0
    assert "Cardiomegaly" not in _labels("No evidence of CHF.")


# --- clause scope -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "report",
    [
        "No pneumothorax, but there is a small right pleural effusion.",
        "No pneumothorax; small right pleural effusion.",
        "No pneumothorax. Small right pleural effusion.",
        "No pneumothorax however a small right pleural effusion is present.",
        "There is no pneumothorax and there is a small right pleural effusion.",
        "No pneumothorax or acute abnormality other than a small right pleural effusion.",
    ],
)
def test_negation_stops_at_clause(report: str) -> None:
    labels = _labels(report)
    assert labels["Pneumothorax"] == 0.0
    assert labels["Pleural Effusion"] == 1.0


def test_uncertainty_stops_at_clause() -> None:
    labels = _labels("Possible pneumonia; there is a large left pleural effusion.")
    assert labels["Pneumonia"] == -1.0 and labels["Pleural Effusion"] == 1.0


def test_hypothetical_clause_is_not_a_mention() -> None:
    assert "Fracture" not in _labels("If there is concern for rib fracture, consider a rib series.")


# --- aggregation and No Finding -------------------------------------------------------------------------------
def test_precedence_positive_over_uncertain_over_negative() -> None:
    assert _labels("No right effusion. Small left pleural effusion.")["Pleural Effusion"] == 1.0
    assert _labels("No right effusion. Possible left pleural effusion.")["Pleural Effusion"] == -1.0
    assert _labels("No pleural effusion. Effusion is not seen.")["Pleural Effusion"] == 0.0


def test_no_finding_rule() -> None:
    # Nothing positive or uncertain: No Finding is 1 (even with negatives and non-CheXpert findings).
    assert _labels("Heart size normal. Lungs clear. Degenerative changes of the spine.") == {
        "No Finding": 1.0,
        "Cardiomegaly": 0.0,
    }
    # Support Devices alone keeps No Finding.
    assert _labels("Left chest pacemaker. Lungs are clear.") == {"No Finding": 1.0, "Support Devices": 1.0}
    # An uncertain finding removes it (blank, never 0).
    labels = label_report("Possible small left pleural effusion.")
    assert math.isnan(labels["No Finding"])
    # A positive fracture removes it too.
    assert math.isnan(label_report("Healed right rib fracture.")["No Finding"])


def test_empty_and_whitespace_reports_are_blank() -> None:
    for text in ("", "   ", "\n", "...", "1. 2."):
        assert all(math.isnan(v) for v in label_report(text).values()), text


def test_label_report_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        extract_mentions(None)  # type: ignore[arg-type]


# --- attributes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("report", "observation", "side", "zone", "severity"),
    [
        ("Small left pleural effusion.", "Pleural Effusion", "left", None, "small"),
        ("Large right pleural effusion.", "Pleural Effusion", "right", None, "large"),
        ("Moderate bilateral pleural effusions.", "Pleural Effusion", "bilateral", None, "moderate"),
        ("Trace right pleural effusion.", "Pleural Effusion", "right", None, "trace"),
        (
            "Moderate right and small left pleural effusions.",
            "Pleural Effusion",
            "bilateral",
            None,
            "moderate",
        ),
        ("Right lower lobe opacity.", "Lung Opacity", "right", "lower", None),
        ("Opacity in the right lower lobe.", "Lung Opacity", "right", "lower", None),
        ("RLL consolidation.", "Consolidation", "right", "lower", None),
        ("Bibasilar atelectasis.", "Atelectasis", "bilateral", "base", None),
        ("Mild atelectasis at the left lung base.", "Atelectasis", "left", "base", "mild"),
        ("Small left apical pneumothorax.", "Pneumothorax", "left", "apex", "small"),
        ("Left upper lobe mass.", "Lung Lesion", "left", "upper", None),
        ("Lingular opacity.", "Lung Opacity", "left", "mid", None),
        ("Opacity in the lingula.", "Lung Opacity", "left", "mid", None),
        ("Retrocardiac opacity.", "Lung Opacity", None, "retrocardiac", None),
        ("Bilateral perihilar opacities.", "Lung Opacity", "bilateral", "perihilar", None),
        ("Mild pulmonary edema.", "Edema", None, None, "mild"),
        ("The heart is moderately enlarged.", "Cardiomegaly", None, None, "moderate"),
        ("Severe cardiomegaly.", "Cardiomegaly", None, None, "severe"),
        ("Blunting of the left costophrenic angle.", "Pleural Effusion", "left", "base", None),
        ("Calcified granuloma in the right upper lobe.", "Lung Lesion", "right", "upper", None),
        ("Left greater than right pleural effusions.", "Pleural Effusion", "bilateral", None, None),
        ("Opacities in the right and left lower lobes.", "Lung Opacity", "bilateral", "lower", None),
    ],
)
def test_attributes(
    report: str, observation: str, side: str | None, zone: str | None, severity: str | None
) -> None:
    m = _one(report, observation)
    assert (m.side, m.zone, m.severity) == (side, zone, severity)


def test_attributes_stay_with_their_own_finding() -> None:
    ms = extract_mentions("Right lower lobe opacity and small left pleural effusion.")
    by = {m.observation: m for m in ms}
    assert (by["Lung Opacity"].side, by["Lung Opacity"].zone) == ("right", "lower")
    assert (by["Pleural Effusion"].side, by["Pleural Effusion"].severity) == ("left", "small")
    assert by["Lung Opacity"].severity is None


def test_linked_findings_share_side_and_zone() -> None:
    ms = {
        m.observation: m
        for m in extract_mentions("Opacity at the left base which may represent atelectasis.")
    }
    assert (ms["Atelectasis"].side, ms["Atelectasis"].zone) == ("left", "base")
    assert ms["Atelectasis"].value == -1.0


def test_heads_are_report_tokens() -> None:
    report = "Small bilateral pleural effusions. Cardiomegaly. The heart is enlarged. Calcified granuloma."
    heads = {(m.observation, m.head) for m in extract_mentions(report)}
    assert ("Pleural Effusion", "effusions") in heads
    assert ("Cardiomegaly", "cardiomegaly") in heads
    assert ("Cardiomegaly", None) in heads  # "the heart is enlarged" has no finding noun
    assert ("Lung Lesion", "granuloma") in heads
    words = report.lower().replace(".", " ").split()
    for m in extract_mentions(report):
        assert m.head is None or m.head in words
        assert report[m.start : m.end] == m.phrase


def test_devices() -> None:
    kinds = {
        m.device
        for m in extract_mentions(
            "Left chest wall pacemaker. Right IJ central venous catheter. ET tube 4 cm above the carina. "
            "NG tube in the stomach. Right PICC line. Surgical clips in the right upper quadrant. Sternotomy wires."
        )
    }
    assert {"pacemaker", "catheter", "tube", "line", "clip", "wire"} <= kinds
    ms = _mentions(
        "Left chest wall pacemaker with leads in the right atrium and right ventricle.", "Support Devices"
    )
    assert [(m.head, m.side, m.device) for m in ms] == [
        ("pacemaker", "left", "pacemaker"),
        ("leads", None, "pacemaker"),
    ]


def test_keyword_prefilter_covers_every_pattern() -> None:
    from medvl.text.labeler import _extract
    from medvl.text.phrase_rules import PHRASE_RULES
    from medvl.text.phrases import _literal_keys

    assert _literal_keys(r"\b(?P<head>effusions?|pleural\s+fluid)\b") == ("effusion", "pleural")
    assert _literal_keys(r"\b(?P<head>fx)\b") == ()  # too short to prefilter: always scanned
    assert _literal_keys(r"\b(?P<head>device)\b|\b(?P<head2>occluder)\b") == ("device", "occluder")
    for rule in PHRASE_RULES:
        assert all(k == k.lower() and len(k) >= 3 for k in rule.keys)
    report = "Atrial septal occluder. Left chest XXXX with tip in the SVC. XXXX-a-XXXX in place."
    assert _extract(report, prefilter=True) == _extract(report, prefilter=False)
    assert len(_mentions(report, "Support Devices")) == 3


def test_sentence_index() -> None:
    report = "Heart size normal. 1. No effusion. 2. Left apical pneumothorax."
    assert len(split_sentences(report)) == 3
    m = _one(report, "Pneumothorax")
    assert m.sentence == 2 and m.side == "left" and m.zone == "apex"

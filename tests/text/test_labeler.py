"""Hand-written sentences for the rule-based CheXpert labeler (medvl.text.labeler)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import (
    Finding,
    LabelConvention,
    Mention,
    extract_mentions,
    label_report,
    label_reports,
)

NAN = float("nan")


def _labels(report: str) -> dict[str, float]:
    """Only the mentioned labels (NaN dropped) so assertions read like CheXpert rows."""
    return {k: v for k, v in label_report(report).items() if not math.isnan(v)}


def _one(report: str, observation: str) -> Mention:
    found = [m for m in extract_mentions(report) if m.observation == observation]
    assert len(found) == 1, (report, found)
    return found[0]


# --- one sentence per observation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("report", "observation", "finding"),
    [
        ("The mediastinum is widened.", "Enlarged Cardiomediastinum", Finding.ENLARGED_CARDIOMEDIASTINUM),
        (
            "Enlarged cardiomediastinal silhouette.",
            "Enlarged Cardiomediastinum",
            Finding.ENLARGED_CARDIOMEDIASTINUM,
        ),
        ("Cardiomegaly.", "Cardiomegaly", Finding.CARDIOMEGALY),
        ("The heart is enlarged.", "Cardiomegaly", Finding.CARDIOMEGALY),
        ("Enlarged heart.", "Cardiomegaly", Finding.CARDIOMEGALY),
        ("Patchy opacity in the right lower lobe.", "Lung Opacity", Finding.OPACITY),
        ("Streaky airspace disease at the left base.", "Lung Opacity", Finding.OPACITY),
        ("Left basilar infiltrate.", "Lung Opacity", Finding.OPACITY),
        ("A 1 cm nodule in the right upper lobe.", "Lung Lesion", Finding.NODULE),
        ("Large left hilar mass.", "Lung Lesion", Finding.MASS),
        ("Mild pulmonary edema.", "Edema", Finding.EDEMA),
        ("Pulmonary vascular congestion.", "Edema", Finding.EDEMA),
        ("Right lower lobe consolidation.", "Consolidation", Finding.CONSOLIDATION),
        ("Findings consistent with pneumonia.", "Pneumonia", Finding.PNEUMONIA),
        ("Bibasilar subsegmental atelectasis.", "Atelectasis", Finding.ATELECTASIS),
        ("Small right apical pneumothorax.", "Pneumothorax", Finding.PNEUMOTHORAX),
        ("Small bilateral pleural effusions.", "Pleural Effusion", Finding.EFFUSION),
        ("Blunting of the right costophrenic angle.", "Pleural Effusion", Finding.EFFUSION),
        ("Biapical pleural thickening.", "Pleural Other", Finding.PLEURAL_OTHER),
        ("Healed left rib fractures.", "Fracture", Finding.FRACTURE),
        ("Left-sided pacemaker.", "Support Devices", Finding.DEVICE),
        ("Right PICC line tip in the SVC.", "Support Devices", Finding.DEVICE),
        ("ET tube terminates 4 cm above the carina.", "Support Devices", Finding.DEVICE),
        ("Median sternotomy wires.", "Support Devices", Finding.DEVICE),
    ],
)
def test_each_observation_positive(report: str, observation: str, finding: Finding) -> None:
    m = _one(report, observation)
    assert m.value == 1.0
    assert m.finding is finding
    assert report[m.start : m.end] == m.phrase
    assert _labels(report)[observation] == 1.0


def test_api_shapes() -> None:
    assert [f.value for f in Finding][:3] == ["cardiomegaly", "effusion", "pneumothorax"]
    arr = label_reports(["Cardiomegaly.", "", "No pneumothorax."])
    assert arr.shape == (3, 14) and arr.dtype == np.float32
    assert np.isnan(arr[1]).all()
    assert arr[0, CHEXPERT_LABELS.index("Cardiomegaly")] == 1.0
    assert arr[2, CHEXPERT_LABELS.index("Pneumothorax")] == 0.0
    assert arr[2, CHEXPERT_LABELS.index("No Finding")] == 1.0


def test_negated_list() -> None:
    labels = _labels("No focal consolidation, pleural effusion or pneumothorax.")
    assert labels == {"No Finding": 1.0, "Consolidation": 0.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0}


def test_uncertain_differential() -> None:
    labels = _labels("Right basilar opacity may represent atelectasis or pneumonia.")
    assert labels["Lung Opacity"] == 1.0
    assert labels["Atelectasis"] == -1.0 and labels["Pneumonia"] == -1.0
    assert "No Finding" not in labels


def test_attributes_basic() -> None:
    m = _one("Small left pleural effusion.", "Pleural Effusion")
    assert (m.side, m.severity, m.head) == ("left", "small", "effusion")
    m = _one("Bibasilar atelectasis.", "Atelectasis")
    assert (m.side, m.zone) == ("bilateral", "base")


def test_empty_report_is_blank() -> None:
    assert all(math.isnan(v) for v in label_report("").values())
    assert extract_mentions("   ") == []


@pytest.mark.parametrize(
    "report, chexpert, iu",
    [
        ("Calcified granuloma in the left upper lobe.", None, 1.0),
        ("Granulomatous disease.", None, 1.0),
        ("Calcified right upper lobe nodule.", None, 1.0),
        ("A 1 cm nodule in the right upper lobe.", 1.0, 1.0),
        ("Calcified granuloma. Spiculated left upper lobe mass.", 1.0, 1.0),
        ("No nodules or masses.", 0.0, 0.0),
    ],
)
def test_lung_lesion_conventions(report: str, chexpert: float | None, iu: float) -> None:
    """CheXpert's Lung Lesion is a nodule, mass or tumour; granulomas and calcified nodules count only under the
    ``iu`` convention, and their mentions (with side and zone) are extracted either way."""
    got = label_report(report)["Lung Lesion"]
    assert np.isnan(got) if chexpert is None else got == chexpert, got
    assert label_report(report, convention="iu")["Lung Lesion"] == iu
    assert (
        label_reports([report], convention=LabelConvention.IU)[0][CHEXPERT_LABELS.index("Lung Lesion")] == iu
    )
    assert any(m.observation == "Lung Lesion" for m in extract_mentions(report))
    if chexpert is None:
        assert label_report(report)["No Finding"] == 1.0  # an old, healed finding only


def test_report_mentions_are_the_labelers_remembered_per_text():
    from medvl.text.labeler import extract_mentions, report_mentions

    text = "Small left pleural effusion. No pneumothorax."
    first = report_mentions(text)
    assert list(first) == extract_mentions(text)
    assert report_mentions(text) is first  # read once per text
    assert report_mentions(text.encode()) is first  # bytes are decoded as UTF-8 first
    with pytest.raises(TypeError, match="must be a str"):
        report_mentions(3)

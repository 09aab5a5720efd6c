"""CE metrics on hand-made label arrays (R2Gen convention), and the labeler adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medvl.eval.clinical import ce_metrics, label_reports, positives
from medvl.text.chexpert import CHEXPERT_LABELS

N = float("nan")
IDX = {name: j for j, name in enumerate(CHEXPERT_LABELS)}


def rows(*dicts):
    out = np.full((len(dicts), len(CHEXPERT_LABELS)), np.nan)
    for i, d in enumerate(dicts):
        for name, v in d.items():
            out[i, IDX[name]] = v
    return out


def test_uncertain_and_blank_count_as_negative():
    assert positives(np.array([[1.0, 0.0, -1.0, N]])).tolist() == [[True, False, False, False]]


def test_counts_by_hand():
    ref = rows(
        {"Cardiomegaly": 1, "Pleural Effusion": 1},  # 2 positives
        {"No Finding": 1},
        {"Edema": 1, "Cardiomegaly": -1},  # uncertain cardiomegaly = negative
        {"Pleural Effusion": 0},
    )
    gen = rows(
        {"Cardiomegaly": 1},  # TP cardiomegaly, FN effusion
        {"No Finding": 1, "Pleural Effusion": 1},  # TP no finding, FP effusion
        {"Cardiomegaly": 1},  # FP cardiomegaly, FN edema
        {"Pleural Effusion": -1},
    )  # nothing
    m = ce_metrics(ref, gen)
    # 14 labels: TP = 2 (cardiomegaly, no finding), FP = 2, FN = 2
    assert m["ce.micro.precision"] == pytest.approx(0.5)
    assert m["ce.micro.recall"] == pytest.approx(0.5)
    assert m["ce.micro.f1"] == pytest.approx(0.5)
    # micro5: cardiomegaly TP 1 FP 1; effusion FN 1 FP 1; edema FN 1 -> P = 1/3, R = 1/3
    assert m["ce.micro5.precision"] == pytest.approx(1 / 3)
    assert m["ce.micro5.recall"] == pytest.approx(1 / 3)
    assert m["ce.micro5.f1"] == pytest.approx(1 / 3)
    assert m["ce.per_label.Cardiomegaly.f1"] == pytest.approx(2 / 3)
    assert m["ce.per_label.No Finding.f1"] == pytest.approx(1.0)
    assert m["ce.per_label.Pleural Effusion.f1"] == pytest.approx(0.0)
    assert m["ce.per_label.Edema.f1"] == pytest.approx(0.0)
    assert m["ce.per_label.Cardiomegaly.support"] == 1
    # macro over labels with support: cardiomegaly 2/3, effusion 0, no finding 1, edema 0
    assert m["ce.macro.f1"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    # a label nobody mentions has no F1 (null in JSON), not 0
    assert math.isnan(m["ce.per_label.Fracture.f1"])


def test_perfect_and_always_normal():
    ref = rows({"Cardiomegaly": 1}, {"No Finding": 1}, {"No Finding": 1}, {"Edema": 1})
    perfect = ce_metrics(ref, ref)
    assert perfect["ce.micro.f1"] == 1.0 and perfect["ce.micro5.f1"] == 1.0
    normal = ce_metrics(ref, rows(*[{"No Finding": 1}] * 4))
    assert normal["ce.micro.f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
    assert normal["ce.micro5.f1"] == 0.0
    assert normal["ce.micro5.precision"] == 0.0  # no positive prediction


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="label arrays"):
        ce_metrics(np.zeros((2, 14)), np.zeros((3, 14)))


def test_labels_come_from_the_labeler():
    labels = label_reports(["Small left pleural effusion.", "The lungs are clear. No pleural effusion.", ""])
    assert labels.shape == (3, 14)
    assert labels[0, IDX["Pleural Effusion"]] == 1
    assert labels[1, IDX["Pleural Effusion"]] == 0
    assert np.isnan(labels[2]).all()
    m = ce_metrics(labels[:1], labels[1:2])
    assert m["ce.per_label.Pleural Effusion.f1"] == 0.0


def test_macro5_and_example_based_by_hand():
    ref = rows(
        {"Cardiomegaly": 1, "Edema": 1},
        {"No Finding": 1},
        {"Pleural Effusion": 1},
    )
    gen = rows(
        {"Cardiomegaly": 1, "Atelectasis": 1},  # TP 1, FP 1, FN 1
        {"No Finding": 1},  # TP 1
        {"No Finding": 1},  # FP 1 (No Finding), FN 1 (effusion)
    )
    m = ce_metrics(ref, gen)
    # per report over 14 labels: F1 = 2TP / (|gen| + |ref|) = 2/4, 2/2, 0/2
    assert m["ce.example.f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["ce.example.precision"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["ce.example.recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # over the 5: report 1 as above (0.5); report 2 has no positive in either -> 0; report 3: 0/1 -> 0
    assert m["ce.example5.f1"] == pytest.approx(0.5 / 3)
    assert m["ce.example5.precision"] == pytest.approx(0.5 / 3)  # report 3 predicts none of the 5 -> 0
    # macro5 over the 5 labels with support: cardiomegaly 1, edema 0, effusion 0 (atelectasis has no support)
    assert m["ce.macro5.f1"] == pytest.approx(1 / 3)
    # the micro figures are unchanged by the new keys: 14 labels TP 2, FP 2, FN 2
    assert m["ce.micro.f1"] == pytest.approx(0.5)
    # micro5: TP 1 (cardiomegaly), FP 1 (atelectasis), FN 2 (edema, effusion)
    assert m["ce.micro5.f1"] == pytest.approx(2 / (2 + 1 + 2))
    # macro over the 14 with support: cardiomegaly 1, edema 0, no finding 2/3, effusion 0
    assert m["ce.macro.f1"] == pytest.approx((1 + 0 + 2 / 3 + 0) / 4)


def test_three_averages_differ_and_are_reported_side_by_side():
    ref = rows({"Cardiomegaly": 1}, {"Cardiomegaly": 1}, {"Cardiomegaly": 1}, {"Edema": 1})
    gen = rows({"Cardiomegaly": 1}, {"Cardiomegaly": 1}, {"Cardiomegaly": 1}, {})
    m = ce_metrics(ref, gen)
    assert m["ce.micro.f1"] == pytest.approx(6 / 7)  # TP 3, FN 1
    assert m["ce.macro.f1"] == pytest.approx(0.5)  # cardiomegaly 1, edema 0
    assert m["ce.example.f1"] == pytest.approx(0.75)
    for key in ("micro", "macro", "example", "micro5", "macro5", "example5"):
        assert f"ce.{key}.f1" in m

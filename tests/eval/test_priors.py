"""The no-pixel pointers of the pointing game (medvl.eval.priors): known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medvl.eval.alignment import PointingRecord, localization_metrics
from medvl.eval.priors import CENTRE_BOX, LayoutPrior, point_scores, score_priors, stated_for

COLS = ["dicom_id", "finding", "side", "zone", "x0", "y0", "x1", "y1", "word"]


def _regions(rows):
    return pd.DataFrame(rows, columns=COLS)


TRAIN = _regions(
    [
        ("t1", "effusion", "left", "base", 0.70, 0.80, 0.90, 0.95, "effusion"),
        ("t2", "effusion", "left", "base", 0.60, 0.70, 0.80, 0.85, "effusion"),
        ("t3", "effusion", "right", "base", 0.10, 0.75, 0.30, 0.90, "effusion"),
        ("t4", "nodule", "right", "upper", 0.20, 0.20, 0.24, 0.24, "nodule"),
        ("t5", "nodule", "left", "upper", 0.70, 0.20, 0.74, 0.24, "nodule"),
        ("t6", "nodule", "left", "upper", 0.72, 0.22, 0.76, 0.26, "nodule"),
        ("t7", "cardiomegaly", "", "", 0.35, 0.45, 0.75, 0.80, "cardiomegaly"),
    ]
)
TRAIN_REPORTS = {
    "t1": "Small left pleural effusion.",
    "t2": "Left effusion.",
    "t3": "Right pleural effusion.",
    "t4": "Nodule in the right upper lobe.",
    "t5": "Nodule in the left upper lobe.",
    "t6": "Pulmonary nodule.",
    "t7": "Cardiomegaly.",
}


def test_prior_box_is_the_mean_training_box_for_the_stated_side():
    prior = LayoutPrior.fit(TRAIN, TRAIN_REPORTS)
    left = prior.box("effusion", stated_for("Small left effusion.")["effusion"])
    np.testing.assert_allclose(left, [0.65, 0.75, 0.85, 0.90])
    right = prior.box("effusion", stated_for("Right pleural effusion.")["effusion"])
    np.testing.assert_allclose(right, [0.10, 0.75, 0.30, 0.90])
    # Stated side and zone: the nodules whose reports said "left upper".
    np.testing.assert_allclose(
        prior.box("nodule", stated_for("Left upper lobe nodule.")["nodule"]), [0.70, 0.20, 0.74, 0.24]
    )
    # No side stated: the side with the most training regions of the finding (two left nodules, one right).
    unsided = prior.box("nodule", stated_for("There is a nodule.")["nodule"])
    assert unsided[0] > 0.5
    np.testing.assert_allclose(prior.box("cardiomegaly", None), [0.35, 0.45, 0.75, 0.80])
    np.testing.assert_allclose(prior.box("pneumothorax", None), CENTRE_BOX)


def test_a_pointer_at_the_prior_box_scores_exactly_the_prior():
    prior = LayoutPrior.fit(TRAIN, TRAIN_REPORTS)
    test = _regions(
        [
            ("a", "effusion", "left", "base", 0.66, 0.78, 0.86, 0.92, "effusion"),
            ("b", "effusion", "right", "base", 0.12, 0.78, 0.30, 0.92, "effusion"),
            ("c", "nodule", "right", "upper", 0.20, 0.30, 0.24, 0.34, "nodule"),
        ]
    )
    reports = {"a": "Left effusion.", "b": "Left effusion.", "c": "Nodule."}
    pairs = [("a", "effusion"), ("b", "effusion"), ("c", "nodule")]
    priors = score_priors(prior, pairs, test, reports)
    assert [p.prior_hit for p in priors] == [1.0, 0.0, 0.0]  # b's report names the wrong side; c the likelier
    assert [p.unstated for p in priors] == [False, False, True]
    # A model whose pointer is the prior's box scores exactly the prior, and its gap is zero.
    records = []
    for d, w in pairs:
        rows = test[test.dicom_id == d]
        finding = rows.finding.iloc[0]
        box = prior.box(finding, stated_for(reports[d]).get(finding))
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        hit, iou = point_scores(centre, box, rows[["x0", "y0", "x1", "y1"]].to_numpy())
        records.append(PointingRecord(d, w, hit, 0.1, iou))
    m = localization_metrics(records, priors, {d: d for d, _ in pairs})
    assert m["pointing_game"] == m["pointing_game_prior"] == pytest.approx(1 / 3)
    assert m["box_iou"] == m["box_iou_prior"]
    assert m["pointing_game_gap_prior"] == 0.0 and m["pointing_game_gap_prior_ci"] == [0.0, 0.0]
    assert m["count_unstated"] == 1 and m["pointing_game_unstated"] == m["pointing_game_prior_unstated"]
    assert m["per_finding.effusion.pointing_game_prior"] == 0.5
    assert m["pointing_game_centre"] == 0.0


def test_point_scores_widen_the_box():
    regions = np.array([[0.4, 0.4, 0.5, 0.5]])
    assert point_scores((0.54, 0.45), (0.4, 0.4, 0.5, 0.5), regions) == (1.0, 1.0)
    assert point_scores((0.56, 0.45), (0.0, 0.0, 0.1, 0.1), regions) == (0.0, 0.0)

"""medvl.eval.crossfit: folds that cover every row once, thresholds fitted only on the other folds, and the
report evaluation's use of them on the validation split (report heads with finding states, classifier templates)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medvl.eval import evaluate, nlg
from medvl.eval.classifier import ClassifierConfig, load_trained_classifier
from medvl.eval.crossfit import CONVENTION, FOLDS, crossfit, crossfit_folds
from medvl.eval.report import generate_for_split, report_studies
from medvl.eval.template_reports import choose_thresholds, classifier_probabilities, template_reports
from medvl.inference.generate import ReportGenerator
from medvl.models.report_labels import f1_thresholds
from medvl.train.classifier import evaluation_classifier
from tests.models.report_fixtures import tiny_runs, train_tiny_report_run

pytestmark = pytest.mark.usefixtures("single_thread")
DATA_CONFIG = {"views": ["PA", "AP"], "one_image_per_study": True}


def test_folds_are_balanced_seeded_and_fits_see_only_the_other_folds():
    fold = crossfit_folds(11)
    assert sorted(np.bincount(fold, minlength=FOLDS).tolist()) == [2] * (FOLDS - 1) + [11 - 2 * (FOLDS - 1)]
    assert np.array_equal(fold, crossfit_folds(11)) and not np.array_equal(fold, crossfit_folds(11, seed=1))
    assert sorted(np.bincount(crossfit_folds(11, folds=2)).tolist()) == [5, 6]
    seen = []
    parts = crossfit(lambda rows: (seen.append(rows), set(rows.tolist()))[1], 11, folds=3)
    assert sorted(np.concatenate([rows for rows, _ in parts]).tolist()) == list(range(11))
    for rows, fitted_on in parts:
        assert fitted_on == set(range(11)) - set(rows.tolist())
    with pytest.raises(ValueError, match="2 folds"):
        crossfit_folds(5, folds=1)


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("crossfit_runs"), tiny_prepared)


@pytest.fixture(scope="module")
def states_run(runs, tmp_path_factory):
    states = ["model.label_loss_weight=1.0", "model.label_states=true", "model.label_pooling=mean_max"]
    out = tmp_path_factory.mktemp("states") / "report"
    return train_tiny_report_run(runs.data, runs.adamatch, out, overrides=[*states, "train.steps=4"])


def test_a_head_with_finding_states_writes_each_validation_fold_with_the_other_folds_thresholds(
    runs, states_run, monkeypatch
):
    generator = ReportGenerator.load(states_run)
    head = generator.head
    val = report_studies(runs.data, "validate", DATA_CONFIG)
    saved = head.label_thresholds.clone()
    used = []
    real_generate = generator.generate

    def spy(images, **kw):  # the thresholds each decoded batch was written with
        used.append((len(images), head.label_thresholds.clone()))
        return real_generate(images, **kw)

    monkeypatch.setattr(generator, "generate", spy)
    texts = generate_for_split(generator, val, crossfit_thresholds=True)
    assert len(texts) == len(val) and torch.equal(head.label_thresholds, saved)  # the head's own kept
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    features, boxes, _, _ = generator.conditions(images)
    with torch.no_grad():
        probs = head.predict_labels(features, boxes)
    targets = torch.as_tensor(np.asarray(val.labels) == 1).float()
    expected = [f1_thresholds(probs[other], targets[other]) for _, other in crossfit(lambda r: r, len(val))]
    assert sum(n for n, _ in used) == len(val)
    assert all(any(torch.allclose(t, e) for e in expected) for _, t in used)
    assert not all(torch.equal(t, saved) for _, t in used)  # not the whole split's thresholds
    used.clear()
    generate_for_split(generator, val)  # the test split's way: the head's own thresholds
    assert all(torch.equal(t, saved) for _, t in used)


def test_validation_scores_say_their_thresholds_are_cross_fitted(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    cfg = ClassifierConfig(image_size=32, channels=[8, 16], steps=30, eval_every=10, batch_size=16, lr=5e-3)
    classifier = load_trained_classifier(evaluation_classifier(runs.data, cfg, device="cpu"))
    out = tmp_path / "report.json"
    evaluate("report", run=runs.report, data=runs.data, split="validate", out=out, classifier=classifier)
    meta = json.loads(out.read_text())["meta"]
    assert meta["conventions"]["thresholds"] == CONVENTION and meta["classifier_template"]["cross_fitted"]
    # the classifier templates of each fold come from thresholds chosen on the other folds
    val = report_studies(runs.data, "validate", DATA_CONFIG)
    probs = classifier_probabilities(classifier[0], val)
    reports = [str(r) for r in val.index["report"]]
    expected = [""] * len(val)
    for rows, t in crossfit(lambda r: choose_thresholds(probs[r], [reports[i] for i in r]), len(val)):
        for i, text in zip(rows, template_reports(probs[rows], t), strict=True):
            expected[i] = text
    saved = json.loads(out.read_text())
    from medvl.eval.clinical import ce_metrics, label_reports

    assert saved["baselines.classifier_template.ce.micro.f1"] == pytest.approx(
        ce_metrics(label_reports(reports), label_reports(expected))["ce.micro.f1"]
    )
    test_out = tmp_path / "test.json"
    evaluate("report", run=runs.report, data=runs.data, split="test", out=test_out, classifier=classifier)
    assert "thresholds" not in json.loads(test_out.read_text())["meta"]["conventions"]

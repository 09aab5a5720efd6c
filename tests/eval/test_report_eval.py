"""``evaluate report`` on a tiny run: the metric keys of docs/design.md section 4, baselines, ablations,
predictions CSV, provenance."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from medvl.eval import evaluate, nlg
from medvl.eval.classifier import ClassifierConfig, load_trained_classifier
from medvl.eval.clinical import ce_metrics, label_reports
from medvl.eval.report import most_frequent_report, predictions_path, report_studies
from medvl.eval.template_reports import (
    FINDINGS,
    NORMAL_SENTENCE,
    TEMPLATE_SENTENCES,
    classifier_probabilities,
    template_reports,
)
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.train.classifier import evaluation_classifier
from tests.models.report_fixtures import tiny_runs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tiny_prepared, tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("report_runs"), tiny_prepared)


def test_most_frequent_report():
    assert most_frequent_report(["b", "a  x", "a x", "b", "a x"]) == "a x"


def test_evaluate_report_writes_the_contract(runs, tmp_path, monkeypatch):
    # METEOR's Java start-up (~10 s) is covered by tests/eval/test_nlg.py; here it is reported missing.
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    out = tmp_path / "eval" / "report.json"
    record = evaluate("report", run=runs.report, data=runs.data, split="test", out=out)
    saved = json.loads(out.read_text())
    assert saved.keys() == record.keys()
    for prefix in ("", "baselines.most_frequent.", "baselines.retrieval.", "ablations.no_memory."):
        for key in (
            "nlg.bleu1",
            "nlg.bleu2",
            "nlg.bleu3",
            "nlg.bleu4",
            "nlg.rouge_l",
            "nlg.cider",
            "ce.micro.precision",
            "ce.micro.recall",
            "ce.micro.f1",
            "ce.macro.f1",
            "ce.micro5.f1",
        ):
            assert isinstance(saved[prefix + key], float), prefix + key
        assert f"{prefix}ce.per_label.Cardiomegaly.f1" in saved
        for key in ("ce.micro.f1_ci", "ce.micro5.f1_ci", "ce.macro.f1_ci", "ce.per_label.Cardiomegaly.f1_ci"):
            ci = saved[prefix + key]  # null only when undefined on most resamples (reason under missing)
            assert (ci is None and prefix + key in saved["meta"]["missing"]) or ci[0] <= ci[1], prefix + key
        low, high = saved[prefix + "ce.micro.f1_ci"]
        assert low <= saved[prefix + "ce.micro.f1"] <= high
        assert 0.0 <= saved[prefix + "report.repeated_sentences"] <= 1.0
        assert f"{prefix}nlg.meteor" not in saved
        assert "java" in saved["meta"]["missing"][prefix + "nlg.meteor"]
    meta = saved["meta"]
    assert meta["split"] == "test" and meta["num_samples"] == 10
    # without an evaluation classifier the classifier-template baseline is missing, with its reason
    assert not any(k.startswith("baselines.classifier_template.") for k in saved)
    assert "no evaluation classifier" in meta["missing"]["baselines.classifier_template"]
    assert "1,000 resamples" in meta["conventions"]["intervals"]
    assert "no interval" in meta["conventions"]["ce.*.f1_ci"]
    assert {"nlg", "ce", "decoding"} <= set(meta["conventions"]) and meta["config_hash"]
    assert meta["ablations"] == ["no_memory"]
    # The most-frequent baseline says the same thing for every study.
    pred = pd.read_csv(predictions_path(out), dtype=str, keep_default_na=False)
    assert list(pred.columns) == ["study_id", "reference", "generated"] and len(pred) == 10
    assert set(pred["study_id"]) == set(
        pd.read_csv(runs.data / "index.csv", dtype=str).query("split == 'test'")["study_id"]
    )
    assert set(CHEXPERT_LABELS) >= {k.split(".")[2] for k in saved if k.startswith("ce.per_label.")}


def test_classifier_template_baseline_with_the_evaluation_classifier(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    cfg = ClassifierConfig(image_size=32, channels=[8, 16], steps=30, eval_every=10, batch_size=16, lr=5e-3)
    classifier = load_trained_classifier(evaluation_classifier(runs.data, cfg, device="cpu"))
    out = tmp_path / "report.json"
    saved = evaluate("report", run=runs.report, data=runs.data, split="test", out=out, classifier=classifier)
    prefix = "baselines.classifier_template."
    for key in ("nlg.bleu4", "nlg.cider", "ce.micro.f1", "ce.micro5.f1", "report.repeated_sentences"):
        assert isinstance(saved[prefix + key], float), key
    assert prefix + "ce.micro.f1_ci" in saved
    for name in ("most_frequent", "retrieval", "classifier_template"):
        gap = saved[f"ce.micro5.f1_gap_{name}"]  # the model minus the baseline, paired interval
        if gap is not None:
            assert gap == pytest.approx(saved["ce.micro5.f1"] - saved[f"baselines.{name}.ce.micro5.f1"])
        assert f"ce.micro.f1_gap_{name}_ci" in saved
    meta = saved["meta"]["classifier_template"]
    validation = report_studies(runs.data, "validate", {"views": ["PA", "AP"], "one_image_per_study": True})
    assert meta["validation_studies"] == len(validation) > 0
    assert set(meta["thresholds"]) == set(FINDINGS)
    # validation has effusion reports: a threshold with its validation F1; a label never positive has none
    effusion = meta["thresholds"]["Pleural Effusion"]
    assert effusion["validation_positives"] > 0 and 0 < effusion["validation_f1"] <= 1
    assert meta["thresholds"]["Fracture"]["threshold"] is None
    assert "validation" in saved["meta"]["conventions"]["baselines.classifier_template"]
    assert "baselines.classifier_template" not in saved["meta"]["missing"]
    # the scores are those of the template reports the thresholds give on the test scans
    test = report_studies(runs.data, "test", {"views": ["PA", "AP"], "one_image_per_study": True})
    texts = template_reports(classifier_probabilities(classifier[0], test), meta["thresholds"])
    sentences = set(TEMPLATE_SENTENCES.values())
    for t in texts:
        assert t == NORMAL_SENTENCE or all(x + "." in sentences for x in t.removesuffix(".").split(". ")), t
    refs = [str(r) for r in test.index["report"]]
    expected = ce_metrics(label_reports(refs), label_reports(texts))["ce.micro.f1"]
    assert saved[prefix + "ce.micro.f1"] == pytest.approx(expected)


def test_reports_are_decoded_on_cuda_when_available_unless_named(runs, tmp_path, monkeypatch):
    """``evaluate report`` decodes (the model and its ablations) on CUDA when there is one, as generate-report
    does; ``device`` names another."""
    import medvl.eval.report as report_eval

    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    seen = []
    real = report_eval.ReportGenerator.load

    def recording(run, device="cpu"):
        seen.append(str(device))
        return real(run, device="cpu")  # no GPU here: the models load on the CPU whatever was asked

    monkeypatch.setattr(report_eval.ReportGenerator, "load", staticmethod(recording))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    evaluate("report", run=runs.report, data=runs.data, split="test", out=tmp_path / "a.json")
    assert seen == ["cuda", "cuda"]  # the model, then its no_memory ablation
    seen.clear()
    evaluate("report", run=runs.report, data=runs.data, split="test", out=tmp_path / "b.json", device="cpu")
    assert seen == ["cpu", "cpu"]


def test_evaluate_refuses_a_device_this_machine_lacks_before_any_work(runs, tmp_path, monkeypatch, capsys):
    from medvl.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report.json"
    for kind in ("report", "adamatch"):
        run = runs.report if kind == "report" else runs.adamatch
        argv = ["evaluate", kind, "--run", str(run), "--data", str(runs.data), "--out", str(out)]
        assert main([*argv, "--device", "cuda"]) == 2
        assert "this machine has no CUDA device (use cpu)" in capsys.readouterr().err
        assert main([*argv, "--device", "tpu0"]) == 2
        assert "is not a device: use cpu, cuda or cuda:N" in capsys.readouterr().err
        assert not out.exists()

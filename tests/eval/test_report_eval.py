"""``evaluate report`` on a tiny run: the metric keys of docs/design.md section 4, baselines, ablations,
predictions CSV, provenance."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medvl.eval import evaluate, nlg
from medvl.eval.report import most_frequent_report, predictions_path
from medvl.text.chexpert import CHEXPERT_LABELS
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
        assert f"{prefix}nlg.meteor" not in saved
        assert "java" in saved["meta"]["missing"][prefix + "nlg.meteor"]
    meta = saved["meta"]
    assert meta["split"] == "test" and meta["num_samples"] == 10
    assert {"nlg", "ce", "decoding"} <= set(meta["conventions"]) and meta["config_hash"]
    assert meta["ablations"] == ["no_memory"]
    # The most-frequent baseline says the same thing for every study.
    pred = pd.read_csv(predictions_path(out), dtype=str, keep_default_na=False)
    assert list(pred.columns) == ["study_id", "reference", "generated"] and len(pred) == 10
    assert set(pred["study_id"]) == set(
        pd.read_csv(runs.data / "index.csv", dtype=str).query("split == 'test'")["study_id"]
    )
    assert set(CHEXPERT_LABELS) >= {k.split(".")[2] for k in saved if k.startswith("ce.per_label.")}

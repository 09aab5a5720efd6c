"""The NLG wrapper gives pycocoevalcap's own numbers on fixed strings, with the stated tokenisation."""

from __future__ import annotations

import math

import pytest

from medvl.eval import nlg
from medvl.eval.nlg import java_problem, nlg_metrics, tokenize_report

REFS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Small left pleural effusion. Heart size is normal.",
    "Cardiomegaly. No focal consolidation, effusion, or pneumothorax.",
    "Right lower lobe opacity concerning for pneumonia.",
]
HYPS = [
    "The heart is normal in size. The lungs are clear.",
    "Small right pleural effusion. Heart size is normal.",
    "Cardiomegaly. No focal consolidation.",
    "",
]


def test_tokenisation_is_the_stated_one():
    assert (
        tokenize_report("Heart size is NORMAL... XXXX-year-old, 3.5 cm!")
        == "heart size is normal . xxxx year old 3.5 cm"
    )
    assert tokenize_report("  ") == ""


def _coco(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "nlg.bleu1": bleu[0],
        "nlg.bleu2": bleu[1],
        "nlg.bleu3": bleu[2],
        "nlg.bleu4": bleu[3],
        "nlg.rouge_l": rouge,
        "nlg.cider": cider,
    }


def test_parity_with_pycocoevalcap_on_fixed_strings():
    ours = nlg_metrics(REFS, HYPS, meteor=False)
    gts = {i: [tokenize_report(r)] for i, r in enumerate(REFS)}
    res = {i: [tokenize_report(h)] for i, h in enumerate(HYPS)}
    theirs = _coco(gts, res)
    for key, value in theirs.items():
        assert ours.scores[key] == pytest.approx(value, abs=1e-12), key
    # Sanity of the fixed numbers themselves: partly right reports score strictly between 0 and 1.
    assert 0.2 < ours.scores["nlg.bleu1"] < 1.0
    assert 0.0 < ours.scores["nlg.bleu4"] < ours.scores["nlg.bleu1"]
    assert ours.missing == {"nlg.meteor": "not requested"}
    assert "nlg.meteor" not in ours.scores


def test_identical_reports_score_one_and_cider_ten():
    result = nlg_metrics(REFS, REFS, meteor=False)
    for n in range(1, 5):
        assert result.scores[f"nlg.bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["nlg.rouge_l"] == pytest.approx(1.0)
    assert result.scores["nlg.cider"] == pytest.approx(10.0)


@pytest.mark.skipif(java_problem() is not None, reason=f"no Java: {java_problem()}")
def test_meteor_parity_through_java():
    from pycocoevalcap.meteor.meteor import Meteor

    ours = nlg_metrics(REFS, HYPS)
    gts = {i: [tokenize_report(r)] for i, r in enumerate(REFS)}
    res = {i: [tokenize_report(h)] for i, h in enumerate(HYPS)}
    scorer = Meteor()
    theirs, _ = scorer.compute_score(gts, res)
    del scorer
    assert "nlg.meteor" not in ours.missing
    assert ours.scores["nlg.meteor"] == pytest.approx(theirs, abs=1e-9)
    assert 0.0 < ours.scores["nlg.meteor"] < 1.0


def test_meteor_missing_without_java_is_reported_not_zero(monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    result = nlg_metrics(REFS, HYPS)
    assert "nlg.meteor" not in result.scores
    assert "java not found" in result.missing["nlg.meteor"]
    assert math.isfinite(result.scores["nlg.bleu4"])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="references"):
        nlg_metrics(["a"], ["a", "b"])

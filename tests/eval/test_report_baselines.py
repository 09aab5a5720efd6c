"""Known answers for the report evaluation's baselines and scores: template sentences read back as their label,
the validation threshold of highest F1, repeated sentences, a retrieval candidate that wins, and bootstrap
intervals of CE F1 (a constant metric has zero width)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medvl.eval import nlg
from medvl.eval.bootstrap import StudyResampler
from medvl.eval.ce_intervals import ce_intervals, micro_f1_gap, micro_f1_interval
from medvl.eval.clinical import ce_metrics, label_reports, positives
from medvl.eval.nlg import NLGScorer
from medvl.eval.report import repeated_sentence_share, repeats_a_sentence, retrieve_reports, score_reports
from medvl.eval.template_reports import (
    FINDINGS,
    NORMAL_SENTENCE,
    TEMPLATE_SENTENCES,
    choose_thresholds,
    max_f1_threshold,
    template_report,
    template_reports,
)
from medvl.text.chexpert import CHEXPERT_5, CHEXPERT_LABELS


def _positive_names(text: str) -> set[str]:
    row = positives(label_reports([text]))[0]
    return {CHEXPERT_LABELS[k] for k in np.flatnonzero(row)}


@pytest.mark.parametrize("name", FINDINGS)
def test_each_template_sentence_reads_back_as_its_label_only(name):
    expected = {name}
    if name == "Support Devices":  # CheXpert: No Finding stays positive beside a device alone
        expected.add("No Finding")
    assert _positive_names(TEMPLATE_SENTENCES[name]) == expected


def test_the_normal_sentence_and_combined_templates():
    assert set(FINDINGS) == set(CHEXPERT_LABELS) - {"No Finding"}
    assert _positive_names(NORMAL_SENTENCE) == {"No Finding"}
    assert template_report([]) == NORMAL_SENTENCE
    text = template_report(["Pleural Effusion", "Cardiomegaly"])
    assert text == "There is cardiomegaly. There is a pleural effusion."  # CheXpert's order
    assert _positive_names(text) == {"Cardiomegaly", "Pleural Effusion"}
    with pytest.raises(ValueError, match="No Finding"):
        template_report(["No Finding"])


def test_max_f1_threshold_known_answers():
    # positives score 0.9 and 0.7, a negative 0.8: cutting at 0.7 gives F1 2*2/(3+2) = 0.8, at 0.9 2/3.
    t, f1 = max_f1_threshold(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    assert t == pytest.approx(0.7) and f1 == pytest.approx(0.8)
    # separable: the lowest positive score, F1 1
    assert max_f1_threshold(np.array([0.2, 0.6, 0.4]), np.array([0, 1, 1])) == (pytest.approx(0.4), 1.0)
    # tied scores are cut together (never between two equal scores)
    t, f1 = max_f1_threshold(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0]))
    assert t == pytest.approx(0.5) and f1 == pytest.approx(2 / 3)
    assert max_f1_threshold(np.array([0.3, 0.2]), np.array([0, 0])) == (None, None)


def test_thresholds_from_validation_make_the_template_reports():
    reports = ["There is cardiomegaly.", "There is cardiomegaly.", "The lungs are clear.", "Normal chest."]
    probs = np.full((4, 14), 0.05)
    card = CHEXPERT_LABELS.index("Cardiomegaly")
    probs[:, card] = [0.8, 0.6, 0.3, 0.7]  # the best cut on validation is 0.6 (F1 0.8)
    thresholds = choose_thresholds(probs, reports)
    assert thresholds["Cardiomegaly"]["threshold"] == pytest.approx(0.6)
    assert thresholds["Cardiomegaly"]["validation_positives"] == 2
    assert thresholds["Edema"] == {"threshold": None, "validation_f1": None, "validation_positives": 0}
    test = np.full((2, 14), 0.99)  # a label without a validation threshold is never called
    test[1, card] = 0.5
    assert template_reports(test, thresholds) == ["There is cardiomegaly.", NORMAL_SENTENCE]


def test_repeated_sentences():
    assert repeats_a_sentence("No effusion. Heart is normal.  no   EFFUSION!")
    assert not repeats_a_sentence("No effusion. Heart is normal. No effusion seen.")
    assert not repeats_a_sentence("")
    assert repeated_sentence_share(["a b. a b.", "a b.", "c. d. c", "x"]) == 0.5
    assert math.isnan(repeated_sentence_share([]))


class _StandInAdaMatch:
    """Retrieval stand-in: image i (a constant scan of value i) and candidate j score 1 when j is i's fixed
    candidate, else 0 (the shapes of AdaMatch's encode_images / encode_reports / model.scores)."""

    def __init__(self, candidates, wanted):
        self.candidates, self.wanted = list(candidates), wanted
        self.model = SimpleNamespace(scores=self._scores)

    def encode_images(self, images):
        return images[:, 0, 0, 0].long()

    def encode_reports(self, texts):
        return [self.candidates.index(t) for t in texts]

    def _scores(self, image_ids, report_ids):
        s = torch.zeros(len(image_ids), len(report_ids))
        for a, i in enumerate(image_ids.tolist()):
            for b, j in enumerate(report_ids):
                s[a, b] = float(self.wanted[i] == j)
        return s, s.clone()


def test_a_fixed_retrieval_candidate_wins_and_scores_one(monkeypatch):
    references = [
        "There is cardiomegaly.",
        "Small left pleural effusion.",
        "There is cardiomegaly. Bibasilar atelectasis.",
        "No acute cardiopulmonary abnormality.",
        "Right lower lobe consolidation and edema.",
    ]
    pool = sorted({*references, "Left upper lobe nodule.", "There is a pneumothorax."})
    dataset = [{"image": torch.full((1, 8, 8), float(i))} for i in range(len(references))]
    run = _StandInAdaMatch(pool, {i: pool.index(r) for i, r in enumerate(references)})
    chosen = retrieve_reports(run, dataset, pool, image_batch=2, report_batch=3)
    assert chosen == references  # each image's own report, found across report batches
    # the test reports in the pool: clinical efficacy 1, its bootstrap interval of zero width
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    ref_labels = label_reports(references)
    with NLGScorer() as scorer:
        metrics, missing = score_reports(
            scorer, references, ref_labels, chosen, resampler=StudyResampler(list(range(len(references))))
        )
    for key in ("ce.micro.f1", "ce.micro5.f1", "ce.macro.f1"):
        assert metrics[key] == 1.0 and metrics[key + "_ci"] == [1.0, 1.0], key
    assert metrics["ce.per_label.Cardiomegaly.f1_ci"] == [1.0, 1.0]
    assert metrics["nlg.bleu4"] == pytest.approx(1.0) and metrics["report.repeated_sentences"] == 0.0
    assert "nlg.meteor" in missing


def test_ce_intervals_match_the_point_values_and_cluster_by_study():
    rng = np.random.default_rng(0)
    ref = (rng.random((60, 14)) < 0.3).astype(float)
    gen = np.where(rng.random((60, 14)) < 0.8, ref, 1 - ref)
    point = ce_metrics(ref, gen)
    cis = ce_intervals(StudyResampler(np.arange(60) // 2, resamples=300), ref, gen, prefix="baselines.x.")
    expected = {"ce.micro.f1", "ce.micro5.f1", "ce.macro.f1", *(f"ce.per_label.{n}.f1" for n in CHEXPERT_5)}
    assert set(cis) == {f"baselines.x.{k}_ci" for k in expected}
    for key in expected:
        low, high = cis[f"baselines.x.{key}_ci"]
        assert low < point[key] < high, key
    # on the full sample (the identity "resample") the statistics are ce_metrics' own values
    whole = StudyResampler(np.arange(60), resamples=1)
    whole.indices = lambda: iter([np.arange(60)])
    assert micro_f1_interval(whole, ref, gen) == [pytest.approx(point["ce.micro.f1"])] * 2
    five = [CHEXPERT_LABELS.index(n) for n in CHEXPERT_5]
    assert micro_f1_interval(whole, ref, gen, five)[0] == pytest.approx(point["ce.micro5.f1"])
    assert ce_intervals(whole, ref, gen)["ce.macro.f1_ci"][0] == pytest.approx(point["ce.macro.f1"])


def test_paired_gap_of_model_and_baseline():
    rng = np.random.default_rng(1)
    ref = (rng.random((40, 14)) < 0.3).astype(float)
    ref[0, 0] = 1.0
    resampler = StudyResampler(np.arange(40), resamples=200)
    # a model that copies the reference beside a baseline that never says a finding: gap exactly 1, interval [1, 1]
    gap, ci = micro_f1_gap(resampler, ref, ref, np.zeros_like(ref))
    assert gap == 1.0 and ci == [1.0, 1.0]
    # the same system on both sides: gap 0 on every resample (paired), not just on average
    noisy = np.where(rng.random(ref.shape) < 0.7, ref, 1 - ref)
    assert micro_f1_gap(resampler, ref, noisy, noisy) == (0.0, [0.0, 0.0])
    gap, ci = micro_f1_gap(resampler, ref, ref, noisy, columns=[1, 2])
    assert gap == pytest.approx(1.0 - ce_metrics(ref[:, [1, 2]], noisy[:, [1, 2]], ["a", "b"])["ce.micro.f1"])
    assert ci[0] <= gap <= ci[1]

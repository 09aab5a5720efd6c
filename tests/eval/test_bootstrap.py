"""Bootstrap intervals over studies (medvl.eval.bootstrap): known answers."""

from __future__ import annotations

import numpy as np

from medvl.eval.bootstrap import StudyResampler, binary_auroc


def test_constant_metric_has_zero_width():
    studies = np.repeat(np.arange(50), 3)
    low, high = StudyResampler(studies).mean_interval(np.full(150, 0.7))
    assert low == high and abs(low - 0.7) < 1e-12


def test_resamples_keep_a_study_together_and_repeat_with_the_seed():
    studies = np.array(["a", "a", "b", "c", "c", "c"])
    r = StudyResampler(studies, resamples=20, seed=3)
    for idx in r.indices():
        drawn = studies[idx]
        for s in set(drawn):
            # a study drawn k times brings all of its records k times
            assert (drawn == s).sum() % (studies == s).sum() == 0
        assert sum(1 for _ in set(drawn)) <= 3
    again = StudyResampler(studies, resamples=20, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(r.indices(), again.indices(), strict=True))


def test_interval_covers_the_point_and_narrows_with_more_studies():
    rng = np.random.default_rng(0)
    small = rng.random(40) < 0.5
    large = rng.random(4000) < 0.5
    lo_s, hi_s = StudyResampler(np.arange(40)).mean_interval(small)
    lo_l, hi_l = StudyResampler(np.arange(4000)).mean_interval(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4


def test_ratio_interval_of_micro_f1():
    tp = np.array([1, 0, 1, 1])
    den = np.array([2, 1, 2, 2])  # 2TP + FP + FN per record
    assert StudyResampler(np.arange(4)).ratio_interval(2 * tp, den)[1] <= 1.0


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    s = np.round(rng.random(300), 1)
    y = rng.random(300) < 0.3
    p, n = s[y], s[~y]
    pairwise = ((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (len(p) * len(n))
    assert abs(binary_auroc(s, y) - pairwise) < 1e-12
    assert binary_auroc(s, np.zeros(300, bool)) is None

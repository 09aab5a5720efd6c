"""Bootstrap intervals over studies for the headline metrics.

Every headline metric ``<key>`` gets ``<key>_ci`` = ``[low, high]``: the 2.5th and 97.5th percentiles of the
metric recomputed on 1,000 resamples of the evaluated *studies* (drawn with replacement, all records of a drawn
study kept together, so that several images or finding words of one study do not count as independent), with a
fixed seed so that the interval is the same on every rerun. A metric that cannot be computed on a resample (an
AUROC whose resample holds one class only) leaves that resample out; an interval from fewer than half of the
resamples is not given (``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95

CONVENTION = (
    "<key>_ci: 95% percentile bootstrap interval, 1,000 resamples of the evaluated studies with replacement "
    "(records of one study kept together), seed 0"
)


class StudyResampler:
    """Draws bootstrap resamples of record indices, clustered by study.

    ``studies`` (N,) gives each record's study; :meth:`indices` yields ``resamples`` index arrays, each the
    concatenated records of ``n_studies`` studies drawn with replacement. The draws depend only on ``seed`` and
    the study grouping, so two metrics of one evaluation are resampled identically.
    """

    def __init__(self, studies: Sequence, *, resamples: int = RESAMPLES, seed: int = SEED):
        codes, uniques = _factorize(studies)
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes, minlength=len(uniques))
        self.order = order
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.resamples = resamples
        self.seed = seed
        self.n_records = len(codes)

    @property
    def n_studies(self) -> int:
        return len(self.counts)

    def indices(self):
        rng = np.random.default_rng(self.seed)
        n = self.n_studies
        for _ in range(self.resamples):
            pick = rng.integers(0, n, n)
            lens = self.counts[pick]
            total = int(lens.sum())
            # Positions 0..total-1, shifted per drawn study to that study's block in ``order``.
            offsets = np.repeat(self.starts[pick] - (np.cumsum(lens) - lens), lens)
            yield self.order[np.arange(total) + offsets]

    def interval(self, stat: Callable[[np.ndarray], float], level: float = LEVEL) -> list[float] | None:
        """``[low, high]`` of ``stat(record_indices)`` over the resamples (None when too few are defined)."""
        if self.n_records == 0:
            return None
        values = []
        for idx in self.indices():
            v = stat(idx)
            if v is not None and np.isfinite(v):
                values.append(float(v))
        if len(values) < self.resamples / 2:
            return None
        tail = (1.0 - level) / 2 * 100
        low, high = np.percentile(np.asarray(values), [tail, 100 - tail])
        return [float(low), float(high)]

    def mean_interval(self, values: np.ndarray, level: float = LEVEL) -> list[float] | None:
        """Interval of the mean of per-record ``values`` (N,)."""
        values = np.asarray(values, dtype=np.float64)
        return self.interval(lambda idx: values[idx].mean() if len(idx) else None, level)

    def ratio_interval(self, num: np.ndarray, den: np.ndarray, level: float = LEVEL) -> list[float] | None:
        """Interval of ``sum(num) / sum(den)`` over the records (micro F1 as 2TP / (2TP + FP + FN), ...)."""
        num = np.asarray(num, dtype=np.float64)
        den = np.asarray(den, dtype=np.float64)

        def stat(idx: np.ndarray) -> float | None:
            d = den[idx].sum()
            return num[idx].sum() / d if d > 0 else None

        return self.interval(stat, level)


def _factorize(values: Sequence) -> tuple[np.ndarray, list]:
    lookup: dict = {}
    codes = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        codes[i] = lookup.setdefault(v, len(lookup))
    return codes, list(lookup)


def binary_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties share ranks); None with one class."""
    labels = np.asarray(labels).astype(bool)
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    r = rankdata(np.asarray(scores, dtype=np.float64))
    return float((r[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))

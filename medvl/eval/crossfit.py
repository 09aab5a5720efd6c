"""Cross-fitted thresholds: scoring a split whose own labels chose the thresholds.

Two things in medvl turn probabilities into findings with per-label thresholds chosen for F1 on the validation
split: the report head's finding states (``model.label_states``, thresholds saved with the head) and the
classifier-template baseline. Scored on the test split, that is honest. Scored on the validation split itself, the
thresholds have seen the labels they are scored against and the score is optimistic: on IU-Phantom a report head
with finding states read about 0.1 ce.micro5 F1 higher on validation that way than on test (docs/results.md).

So on the split the thresholds come from, every study is written with thresholds chosen on the *other* studies:
the studies are split at random into :data:`FOLDS` folds (seed :data:`SEED`) and each fold gets thresholds fitted
on the rest. The report trainer's validation (which selects checkpoints) and ``medvl evaluate report --split
validate`` both do this; the thresholds saved with a head are still fitted on the whole validation split.

The estimate leans the other way a little: thresholds fitted on part of the split are noisier than the whole
split's. Five folds rather than two keep that small (IU-Phantom's classifier templates, validation ce.micro5 F1:
0.72 with two folds, 0.77 with five, 0.84 with the scored split's own thresholds; 0.84 on test).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

FOLDS = 5
SEED = 0
CONVENTION = (
    f"on the split the thresholds are chosen on (validation), thresholds are cross-fitted: the studies are split "
    f"at random into {FOLDS} folds (seed {SEED}) and each fold is written with thresholds chosen on the others"
)

T = TypeVar("T")


def crossfit_folds(n: int, folds: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """The fold (0 .. folds - 1) of each of ``n`` rows: a seeded random permutation dealt out in turn, so the
    folds differ in size by at most one."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


def crossfit(
    fit: Callable[[np.ndarray], T], n: int, folds: int = FOLDS, seed: int = SEED
) -> list[tuple[np.ndarray, T]]:
    """``[(rows of fold k, fit(rows of every other fold)), ...]`` over the folds of :func:`crossfit_folds`; the
    rows are sorted, and together the folds' rows are ``0 .. n - 1`` once each."""
    fold = crossfit_folds(n, folds, seed)
    return [(np.flatnonzero(fold == k), fit(np.flatnonzero(fold != k))) for k in range(folds)]


__all__ = ["CONVENTION", "FOLDS", "SEED", "crossfit", "crossfit_folds"]

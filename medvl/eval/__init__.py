"""Evaluation of each stage; every result lands in a ``metrics.json``-style file (docs/design.md section 4).

The evaluations and their functions are listed in :data:`medvl.registry.EVALUATIONS`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import medvl.registry as registry
from medvl.errors import RunError
from medvl.runs import describe_data, find_runs, is_finished, record_evaluation

logger = logging.getLogger(__name__)


def check_runs(kind: str, run: str | Path) -> None:
    """:class:`RunError` unless ``run`` leads to every run the evaluation ``kind`` needs (checked before any
    work, such as training the evaluation classifier, is spent on it)."""
    spec = registry.evaluation(kind)
    if spec.needs:
        reachable = find_runs(run)
        missing = [stage for stage in spec.needs if stage not in reachable]
        if missing:
            raise RunError(
                f"{kind} evaluation needs a {' and a '.join(missing)} run; {run} leads to "
                f"{sorted(reachable)} only (pass a run built from the others, or a demo directory)"
            )
    elif spec.run not in find_runs(run):
        raise RunError(f"{run} holds no {spec.run} run; train one with `medvl train {spec.run}`")


def evaluate(
    kind: str, run: Path, data: Path, split: str = "test", out: Path | None = None, **options
) -> dict:
    """Score ``run`` on ``split`` of the prepared dataset ``data``; write the metrics to ``out``.

    ``options`` go to the evaluation function (e.g. ``classifier``, ``max_studies``). A copy of the
    metrics is kept in the run evaluated (``RUN/eval/<kind>-<split>.json``, see :mod:`medvl.runs`)."""
    spec = registry.evaluation(kind)
    run, data = Path(run), Path(data)
    check_runs(kind, run)
    metrics = registry.evaluator(kind)(
        run=run, data=data, split=split, out=Path(out) if out else None, **options
    )
    holder = run if is_finished(run) else find_runs(run).get(spec.run)
    if holder is not None:
        try:
            record_evaluation(holder, kind, split, metrics, data=describe_data(data, with_path=False))
        except OSError as exc:  # a run on a read-only disk: the metrics file is what was asked for
            logger.warning("the metrics are not kept in %s: %s", holder, exc)
    return metrics

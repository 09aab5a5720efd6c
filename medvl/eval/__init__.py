"""Evaluation of each stage; every result lands in a ``metrics.json``-style file (DESIGN.md section 4)."""

from __future__ import annotations

from pathlib import Path


def evaluate(kind: str, run: Path, data: Path, split: str = "test", out: Path | None = None, **options) -> dict:
    """Score ``run`` on ``split`` of the prepared dataset ``data``; write the metrics to ``out``.

    ``options`` go to the stage's evaluation function (e.g. ``classifier_config``, ``max_studies``)."""
    if kind == "adamatch":
        from medvl.eval.alignment import evaluate_adamatch as fn
    elif kind == "report":
        from medvl.eval.report import evaluate_report as fn
    elif kind == "diffusion":
        from medvl.eval.image import evaluate_diffusion as fn
    elif kind == "cyclic":
        from medvl.eval.cyclic import evaluate_cyclic as fn
    else:
        raise ValueError(f"unknown evaluation {kind!r}; use adamatch, report, diffusion or cyclic")
    return fn(run=Path(run), data=Path(data), split=split, out=Path(out) if out else None, **options)

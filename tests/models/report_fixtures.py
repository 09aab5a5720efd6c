"""Helpers for the report head's tests: a tiny (untrained) AdaMatch run and a tiny report run.

The AdaMatch run is the real run format (``AdaMatchRun.save_pretrained``) with random weights, a WordPiece
tokenizer and a keyword vocabulary / keypatch bank mined from the tiny prepared dataset; it is for
plumbing, not quality. The report run is trained for a few steps through ``run_stage`` (the shared loop), with a
``use_memory=false`` ablation under ``RUN/ablations/no_memory/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.conftest import one_thread

__all__ = ["make_tiny_adamatch_run", "train_tiny_report_run", "TinyRuns", "tiny_runs"]

TINY_REPORT_OVERRIDES: list[str] = []  # configs/report/tiny.yaml is already tiny


def make_tiny_adamatch_run(data: Path, out: Path, seed: int = 0) -> Path:
    from medvl.data.prepared import PreparedDataset
    from medvl.models.adamatch import (
        AdaMatchConfig,
        AdaMatchRun,
        MiningConfig,
        build_adamatch,
        build_keywords_and_bank,
    )
    from medvl.models.adamatch.encoders import BackboneConfig, TextEncoderConfig
    from medvl.models.adamatch.patches import AdaPatchConfig
    from medvl.text.tokenizer import ReportTokenizer, train_wordpiece

    ds = PreparedDataset(data, "train")
    tok = ReportTokenizer(
        train_wordpiece(ds.index["report"], vocab_size=200, min_frequency=1), max_tokens=48, max_words=24
    )
    cfg = AdaMatchConfig(
        image_size=64,
        embed_dim=32,
        backbone=BackboneConfig(channels=[8, 16]),
        patches=AdaPatchConfig(grid=4, points=2),
        text=TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    )
    torch.manual_seed(seed)
    model = build_adamatch(cfg, tok)
    vocab, bank = build_keywords_and_bank(
        model, tok, ds, MiningConfig(min_count=1, bank_per_word=4), progress=False
    )
    AdaMatchRun(model, tok, vocab, bank).save_pretrained(out / AdaMatchRun.DIRNAME)
    (out / "stage.json").write_text(json.dumps({"stage": "adamatch"}))
    return out


def train_tiny_report_run(
    data: Path, adamatch: Path, out: Path, *, overrides: list[str] | None = None
) -> Path:
    """A tiny report run through the real entry point (``run_stage`` -> ``fit``)."""
    from medvl.train.stages import run_stage

    run_stage(
        "report",
        config="tiny",
        data=data,
        out=out,
        from_runs=[adamatch],
        overrides=TINY_REPORT_OVERRIDES + list(overrides or []),
    )
    return out


@dataclass
class TinyRuns:
    data: Path
    adamatch: Path
    report: Path  # with RUN/ablations/no_memory/ (a use_memory=false run)


_CACHE: dict[Path, TinyRuns] = {}


def tiny_runs(root: Path, data: Path) -> TinyRuns:
    """The tiny AdaMatch and report runs, built once per test session (shared by several test files)."""
    if data not in _CACHE:
        with one_thread():
            adamatch = make_tiny_adamatch_run(data, root / "adamatch")
            report = train_tiny_report_run(data, adamatch, root / "report")
            train_tiny_report_run(
                data,
                adamatch,
                report / "ablations" / "no_memory",
                overrides=["model.use_memory=false", "train.steps=6"],
            )
        _CACHE[data] = TinyRuns(data, adamatch, report)
    return _CACHE[data]

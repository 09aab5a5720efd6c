"""A tiny trained AdaMatch run for tests that need one (trained in a plain loop: ~2 s)."""

from __future__ import annotations

from pathlib import Path

import torch

from medvl.config import CONFIG_ROOT


def train_tiny_run(data: Path, out: Path, steps: int = 8, overrides: list[str] | None = None) -> Path:
    """Build the tiny AdaMatch stage on ``data``, take ``steps`` optimiser steps, save the run to ``out``."""
    from medvl.train.adamatch_stage import build_stage

    torch.manual_seed(0)
    stage = build_stage(config_path=CONFIG_ROOT / "adamatch" / "tiny.yaml", overrides=overrides or [], data=data)
    model = stage.build_model()
    opt = torch.optim.AdamW(stage.param_groups(model), lr=stage.train.lr)
    ds = stage.train_dataset()
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(ds), generator=g)[: stage.train.batch_size].tolist()
        loss, _ = stage.training_step(model, stage.collate([ds[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        stage.save_run(model, out)
    return out

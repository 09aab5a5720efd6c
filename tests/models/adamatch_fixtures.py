"""Helpers for the AdaMatch tests: a tiny trained run (plain loop, ~2 s; ``tiny_adamatch_run`` in tests/conftest.py
shares one per test session) and the two-process gather worker (kept in this light module so spawned processes do
not import the test modules)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from medvl.config import CONFIG_ROOT


def train_tiny_run(data: Path, out: Path, steps: int = 8, overrides: list[str] | None = None) -> Path:
    """Build the tiny AdaMatch stage on ``data``, take ``steps`` optimiser steps, save the run to ``out``."""
    from medvl.train.stages.adamatch import build_stage

    torch.manual_seed(0)
    stage = build_stage(
        config_path=CONFIG_ROOT / "adamatch" / "tiny.yaml", overrides=overrides or [], data=data
    )
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


def gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from medvl.models.adamatch.losses import pair_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    img, txt, i2t, t2i, groups = gather_inputs()
    b = img.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    # ranks hold different word counts: the gather pads them
    w = int(i2t[sl].sum(1).max())
    x = img[sl].clone().requires_grad_(True)
    li, lt = pair_loss(
        x, txt[sl, :w], i2t[sl, :w], t2i[sl, :w], torch.tensor(10.0), groups[sl], chunk=2, gather=True
    )
    loss = 0.5 * (li + lt)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": x.grad}, f"{out_dir}/rank{rank}.pt")
    from medvl.train.distributed import finish_distributed_process

    finish_distributed_process(0)


def gather_inputs():
    g = torch.Generator().manual_seed(3)
    n, p, w, d = 6, 4, 5, 8
    img = F.normalize(torch.randn(n, p, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, w, d, generator=g), dim=-1)
    i2t = torch.ones(n, w, dtype=torch.bool)
    i2t[:3, 3:] = False  # rank 0's reports are shorter
    t2i = i2t.clone()
    t2i[:, 0] = False
    groups = torch.tensor([5, 1, 2, 5, 4, 6])  # reports 0 and 3 identical, across ranks
    return img, txt, i2t, t2i, groups

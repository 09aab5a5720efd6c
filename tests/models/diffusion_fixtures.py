"""Helpers for the diffusion head's tests: tiny real AdaMatch, report (its shared memory), autoencoder and
diffusion runs, and a plain training loop through the Stage protocol.

The AdaMatch run is the tiny preset trained a few steps (:func:`tests.models.adamatch_fixtures.train_tiny_run`);
the report run holds only what the diffusion stage reads from it, a saved shared memory (``RUN/memory/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medvl.models.memory import MemoryConfig, SharedMemory
from tests.models.adamatch_fixtures import train_tiny_run

__all__ = ["make_adamatch_run", "make_report_run", "train_plain", "finish_run", "build_tiny_runs"]

DIM = 32  # the tiny AdaMatch preset's embedding width


def make_adamatch_run(root: Path, data: Path) -> Path:
    """The tiny AdaMatch preset trained a few steps, as a finished run."""
    train_tiny_run(data, root)
    (root / "stage.json").write_text(json.dumps({"stage": "adamatch"}))
    return root


def make_report_run(root: Path, dim: int = DIM) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    memory = SharedMemory(MemoryConfig(num_slots=16, dim=dim, num_heads=4, topk=4, dropout=0.1))
    memory.save_pretrained(root / SharedMemory.DIRNAME)
    (root / "stage.json").write_text(json.dumps({"stage": "report"}))
    return root


def train_plain(stage, steps: int, batch_size: int = 8, lr: float = 2e-3, seed: int = 0):
    """A few optimiser steps through the Stage protocol without the shared loop."""
    torch.manual_seed(seed)
    model = stage.build_model()
    groups = stage.param_groups(model) if hasattr(stage, "param_groups") else [{"params": model.parameters()}]
    opt = torch.optim.AdamW(groups, lr=lr)
    ds = stage.train_dataset()
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(ds), (batch_size,), generator=g).tolist()
        loss, _ = stage.training_step(model, stage.collate([ds[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(stage, "on_step_end"):
            stage.on_step_end(model, step + 1)
        losses.append(float(loss.detach()))
    model.eval()
    return model, losses


def finish_run(stage, model, run_dir: Path) -> Path:
    """What the loop does at the end: save_run from the model, then stage.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        stage.save_run(model, run_dir)
    (run_dir / "stage.json").write_text(json.dumps({"stage": stage.name}))
    return run_dir


def build_tiny_runs(root: Path, data: Path, diffusion_steps: int = 6) -> dict[str, Path]:
    """Tiny autoencoder, AdaMatch and report runs, and a diffusion run trained a few steps on them."""
    from medvl.train.stages.autoencoder import build_autoencoder_stage
    from medvl.train.stages.diffusion import build_diffusion_stage

    root.mkdir(parents=True, exist_ok=True)
    ae_stage = build_autoencoder_stage(config_path="tiny", overrides=[], data=data)
    model, _ = train_plain(ae_stage, 4)
    ae = finish_run(ae_stage, model, root / "ae")
    ada, rep = make_adamatch_run(root / "ada", data), make_report_run(root / "rep")
    stage = build_diffusion_stage(config_path="tiny", overrides=[], data=data, from_runs=[ada, rep, ae])
    model, _ = train_plain(stage, diffusion_steps)
    diff = finish_run(stage, model, root / "diff")
    return {"ae": ae, "ada": ada, "rep": rep, "diff": diff}

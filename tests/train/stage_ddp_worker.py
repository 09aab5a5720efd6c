"""Run by tests/train/test_distributed_stages.py, alone or under ``python -m torch.distributed.run
--nproc_per_node 2``: trains a real stage (report or diffusion, tiny preset) through :func:`medvl.train.loop.fit`
and, after the last optimiser step, writes each rank's weights to ``DUMP/rank_<r>.pt``.

``--tied-noise`` (diffusion): the stage's random draws (latent sample, noise, timestep, condition drop) come from a
generator seeded by each sample's own latent instead of the process's generator, so a sample gets the same draws
whichever rank trains it; the stock stage draws them per process (statistically the same, not bitwise).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from medvl import registry  # noqa: E402
from medvl.config import resolve_config_path  # noqa: E402
from medvl.train.distributed import finish_distributed_process  # noqa: E402
from medvl.train.loop import fit  # noqa: E402


def tied_noise_step(stage):
    """The diffusion stage's training step with per-sample random draws (see the module docstring)."""

    def training_step(model, batch):
        mu = batch["latent_mu"]
        device = mu.device
        noise, steps = [], []
        for row in mu.detach().cpu():
            g = torch.Generator().manual_seed(zlib.crc32(row.numpy().tobytes()))
            noise.append(torch.randn(row.shape, generator=g))
            steps.append(torch.randint(0, stage.config.noise.num_train_timesteps, (1,), generator=g))
        out = model(
            latent_mu=mu,
            latent_sigma=None,
            noise=torch.stack(noise).to(device),
            timesteps=torch.cat(steps).to(device),
            drop=torch.zeros(mu.shape[0], dtype=torch.bool, device=device),
            **stage._features_kwargs(batch, device),
        )
        return out["loss"], {}

    return training_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", required=True, choices=["report", "diffusion"])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--from", dest="from_runs", type=Path, nargs="*", default=[])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dump", type=Path, required=True)
    p.add_argument("--set", dest="overrides", nargs="*", default=[])
    p.add_argument("--tied-noise", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    stage = registry.builder(args.stage)(
        config_path=resolve_config_path(args.stage, "tiny"),
        overrides=args.overrides,
        data=args.data,
        from_runs=args.from_runs,
    )
    if args.tied_noise:
        stage.training_step = tied_noise_step(stage)
    steps = stage.train.steps
    end_hook = getattr(stage, "on_step_end", None)

    def on_step_end(model, step):
        if end_hook is not None:
            end_hook(model, step)
        if step == steps:
            rank = int(os.environ.get("RANK", "0"))
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(
                {k.removeprefix("module."): v for k, v in state.items()}, args.dump / f"rank_{rank}.pt"
            )

    stage.on_step_end = on_step_end
    fit(stage, args.out, from_runs=args.from_runs)
    finish_distributed_process(0)


if __name__ == "__main__":
    main()

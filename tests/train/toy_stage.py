"""A toy stage for the training-loop tests: an MLP with dropout regressing random tensors.

Importable by the two-process worker too, so it holds no pytest fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from medvl.config import load_config
from medvl.train.distributed import unwrap
from medvl.train.loop import TrainConfig

DIM = 8


class Interrupt(Exception):
    """Raised by the toy stage to simulate a crash in the middle of a run."""


@dataclass
class ToyModelConfig:
    hidden: int = 32
    dropout: float = 0.2
    samples: int = 64
    augment: float = 0.0  # std of noise added to inputs in __getitem__ (uses the global RNG)


@dataclass
class ToyConfig:
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=6, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=3, eval_every=2, log_every=1
        )
    )


class ToyData(Dataset):
    """``x`` (DIM,) ~ N(0, 1), ``y = x @ w + 0.1 noise``, plus a string field the loop must pass through."""

    def __init__(self, n: int, seed: int, augment: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        w = torch.linspace(-1, 1, DIM)
        self.y = self.x @ w + 0.1 * torch.randn(n, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.x[i]
        if self.augment:
            x = x + self.augment * torch.randn(DIM)
        return {"x": x, "y": self.y[i], "id": f"s{i}"}


class ToyNet(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, DIM), y (B,) -> {"pred": (B,), "loss": () when y is given}."""
        self.autocast_seen = torch.is_autocast_enabled(x.device.type)
        pred = self.net(self.norm(x)).squeeze(-1)
        outs = {"pred": pred}
        if y is not None:
            outs["loss"] = ((pred.float() - y) ** 2).mean()
        return outs


class ToyStage:
    name = "toy"

    def __init__(
        self, config: ToyConfig, *, interrupt_at: int | None = None, validate_metrics: list | None = None
    ):
        self.config = config
        self.train = config.train
        self.interrupt_at = interrupt_at
        self.saved: dict[str, torch.Tensor] | None = None
        self.validations: list[tuple[int, dict[str, float]]] = []
        self.steps_seen: list[int] = []
        self.scripted_metrics = validate_metrics  # if given, validate() returns these in turn
        self.val = ToyData(32, seed=123)

    def build_model(self) -> nn.Module:
        return ToyNet(self.config.model.hidden, self.config.model.dropout)

    def train_dataset(self) -> Dataset:
        return ToyData(self.config.model.samples, seed=7, augment=self.config.model.augment)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "x": torch.stack([it["x"] for it in items]),
            "y": torch.stack([it["y"] for it in items]),
            "id": [it["id"] for it in items],
        }

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        assert all(isinstance(i, str) for i in batch["id"])
        out = model(x=batch["x"], y=batch["y"])
        return out["loss"], {"pred_std": float(out["pred"].detach().float().std())}

    def validate(self, model: nn.Module) -> dict[str, float]:
        assert not model.training
        assert not torch.is_grad_enabled()
        device = next(model.parameters()).device
        pred = model(x=self.val.x.to(device))["pred"].float().cpu()
        metrics = {"val_loss": float(((pred - self.val.y) ** 2).mean())}
        if self.scripted_metrics is not None:
            metrics["scripted"] = self.scripted_metrics[len(self.validations)]
        self.validations.append((len(self.steps_seen), metrics))
        return metrics

    def on_step_end(self, model: nn.Module, step: int) -> None:
        assert model is unwrap(model)
        self.steps_seen.append(step)
        if self.interrupt_at is not None and step == self.interrupt_at:
            raise Interrupt(f"simulated crash at step {step}")

    def save_run(self, model: nn.Module, run_dir: Path) -> None:
        self.saved = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        save_file(self.saved, str(run_dir / "model.safetensors"))


def build_stage(
    *, config_path: Path | None, overrides: list[str], data: Path, from_runs: list[Path]
) -> ToyStage:
    """The registry entry point (tests point ``STAGE_BUILDERS`` here)."""
    return ToyStage(load_config(ToyConfig, config_path, overrides))

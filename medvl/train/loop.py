"""The one training loop every stage shares.

A stage (AdaMatch, report head, autoencoder, diffusion) supplies its model, datasets, one
training step and a validation pass through the :class:`Stage` protocol; this module owns
everything else: Accelerate (bf16 autocast, DDP/FSDP under ``torchrun`` / ``accelerate launch``),
gradient accumulation, AdamW with cosine schedule and warmup, atomic full-state checkpoints
(model, optimiser, scheduler, RNG, data position), exact ``--resume``, validation-only model
selection, TensorBoard logs and a progress bar.

Run directory written by :func:`fit`::

    RUN/config.yaml            resolved config of the stage
    RUN/stage.json             {"stage": name, "medvl_version": ..., "from": [...], "best": {...}}
    RUN/checkpoints/step_N/    full training state (kept: the latest ``keep_checkpoints``)
    RUN/logs/                  TensorBoard event files
    RUN/...                    inference artifacts written by ``Stage.save_run`` from the best weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (the ``train:`` section of a stage config)."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 200
    keep_checkpoints: int = 1
    eval_every: int = 200  # 0: validate only at the end
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    select_metric: str = "val_loss"  # a key returned by Stage.validate
    select_mode: Literal["min", "max"] = "min"


@runtime_checkable
class Stage(Protocol):
    """What a stage gives the loop.

    ``training_step`` returns ``(loss, logs)``: a scalar tensor to backpropagate and floats
    to log. ``validate`` runs on the validation split with the model in eval mode under
    ``torch.no_grad`` and returns metrics, one of which is ``train.select_metric``.
    ``save_run`` writes the self-contained inference artifacts (weights as safetensors,
    config, tokenizer, ...) of the given (best) model into the run directory.
    """

    name: str
    train: TrainConfig

    def build_model(self) -> nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def collate(self, items: list[Any]) -> Any: ...

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def validate(self, model: nn.Module) -> dict[str, float]: ...

    def save_run(self, model: nn.Module, run_dir: Path) -> None: ...


@dataclass
class FitResult:
    run_dir: Path
    steps: int
    best_step: int
    best_metrics: dict[str, float]
    seconds: float
    images_per_second: float
    peak_memory_mb: float


def fit(stage: Stage, out: Path, *, resume: bool = False, config_dump: dict | None = None,
        from_runs: list[Path] | None = None) -> FitResult:
    """Train ``stage`` into the run directory ``out``; see the module docstring."""
    raise NotImplementedError("the shared training loop is being written (issue 4)")

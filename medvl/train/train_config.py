"""``train.*``: the settings of the one training loop (:mod:`medvl.train.loop`), shared by every stage's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import medvl.train.distributed as distributed
from medvl.errors import ConfigError

__all__ = ["TrainConfig"]


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
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 200  # 0: no checkpoints (the run cannot be resumed)
    keep_checkpoints: int = 1
    eval_every: int = 200  # 0: validate only at the end
    log_every: int = 10
    log_images: bool = False  # Stage.log_images into TensorBoard (pictures of validation scans)
    num_workers: int = 0
    seed: int = 0
    select_metric: str = "val_loss"  # a key returned by Stage.validate
    select_mode: Literal["min", "max"] = "min"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    # Stop after this many seconds of this launch (0: no limit), checked every log_every steps; the run then
    # validates and saves as at its last step. The schedule still spans train.steps, and how far a run gets
    # depends on the machine: a time-limited run is not reproducible step for step.
    max_seconds: float = 0.0
    speed: distributed.SpeedConfig = field(default_factory=distributed.SpeedConfig)  # GPU speed options

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible value."""
        positive = ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'train.{name}' must be at least 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "checkpoint_every",
            "eval_every",
            "num_workers",
            "weight_decay",
            "max_grad_norm",
            "max_seconds",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"config key 'train.{name}' must not be negative, got {getattr(self, name)}"
                )
        if not self.lr > 0:
            raise ConfigError(f"config key 'train.lr' must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key 'train.min_lr_ratio' must lie in [0, 1], got {self.min_lr_ratio}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(
                f"config key 'train.adam_betas' must be two numbers in [0, 1), got {self.adam_betas}"
            )
        if not self.select_metric:
            raise ConfigError("config key 'train.select_metric' must name a validation metric")
        self.speed.validate()

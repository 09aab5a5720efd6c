"""Few-step students of a trained diffusion head: ``medvl train distill --from DIFFUSION_RUN``.

The teacher samples with classifier-free guidance, two network passes per step, in 20 (DPM-Solver++) or 50 (DDIM,
MONAI's recipe) steps. A student starts as a copy of the teacher and learns to do the same in a few passes:

* ``method: consistency`` (default) - latent consistency distillation (Song et al. 2023, "Consistency Models";
  Luo et al. 2023, "Latent Consistency Models"). From a training latent noised to a timestep ``t`` of a 50-point
  grid, the teacher takes one guided DDIM step down ``skip`` timesteps; the student's clean estimate
  ``f(x_t, t)`` must match a slowly moving copy of itself (the target, EMA ``consistency.target_decay``) at the
  teacher's point. The guidance scale is built in (one pass per step), and the student samples with the
  consistency sampler in 1-8 steps (4 by default).
* ``method: guidance`` - guidance distillation (the first stage of Meng et al. 2023, "On Distillation of Guided
  Diffusion Models"): the student's conditional velocity regresses the teacher's guided one, so any of the
  ordinary samplers runs it at guidance 1 with one pass per step (``sampler.steps`` DPM-Solver++ steps).

Either way a fraction ``condition_dropout`` of samples trains the null context toward the teacher's unguided
velocity, so the student still draws unconditional scans (guidance 0). Training latents and report features come
from ``--data`` as in the diffusion stage (posterior samples of the training scans, their reports).

Validation (``val_ode_mse``, the selection metric): the mean squared distance, in latent space, between the
student's scan and the teacher's (its own default sampler) from the same starting noise, for the first
``data.val_images`` validation reports. For a consistency student it is measured after one step (its estimate of
the ODE's end point from pure noise); for a guidance student after its ``sampler.steps`` DPM-Solver++ steps.

The run is a diffusion run (``medvl synthesize`` / ``medvl evaluate diffusion`` take it) whose
``diffusion/scheduler_config.json`` names the student's sampler as the default and records, under
``distilled``, the method, the teacher run and the guidance scale built in::

    RUN/diffusion/      the student (target / EMA weights), scheduler_config.json (its sampler, ``distilled``)
    RUN/autoencoder/ adamatch/ memory/    copied from the teacher run
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medvl.config import load_config, resolve_config_path, to_dict
from medvl.errors import ConfigError, RunError
from medvl.models.diffusion import (
    AutoencoderBundle,
    Denoiser,
    DiffusionBundle,
    NoiseScheduleConfig,
    SamplerConfig,
    SamplerName,
    build_sampler,
    build_train_scheduler,
    clean_estimate,
    consistency_boundary,
    consistency_grid,
    guided_velocity,
    initial_noise,
    sample_latents,
)
from medvl.models.diffusion.denoiser import drop_hint, ema_update, training_latent
from medvl.models.memory import SharedMemory
from medvl.models.pretrained import copy_component
from medvl.runs import find_from_run
from medvl.train.distributed import unwrap
from medvl.train.loop import TrainConfig
from medvl.train.stages.diffusion import (
    ADAMATCH_DIR,
    AUTOENCODER_DIR,
    MEMORY_DIR,
    DiffusionDataConfig,
    DiffusionStage,
    DiffusionStageConfig,
    EmaConfig,
    SourceRuns,
)

logger = logging.getLogger(__name__)

FEATURE_KEYS = ("words", "word_mask", "word_kind", "keypatches", "keypatch_boxes", "keypatch_mask")


@dataclass
class ConsistencyConfig:
    skip: int = 20  # the teacher's DDIM step, in training timesteps (LCM's k; 50 grid points for T = 1000)
    huber_c: float = 0.001  # pseudo-Huber loss sqrt(d^2 + c^2) - c per latent element
    target_decay: float = 0.95  # EMA of the student that supplies the targets (and is saved)


@dataclass
class DistillStageConfig:
    method: Literal["consistency", "guidance"] = "consistency"
    guidance: float = 0.0  # the guidance scale built into the student; 0: the teacher run's sampler guidance
    condition_dropout: float = 0.1  # samples trained on the null context (the unguided teacher velocity)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    # the student's default sampler: name "consistency" for method consistency, any other for method guidance
    # (guidance is always 1 there: the scale is built in)
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(name=SamplerName.CONSISTENCY, steps=4, guidance=1.0)
    )
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(decay=0.995))  # guidance method: the saved EMA
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-4, select_metric="val_ode_mse", select_mode="min")
    )

    def validate(self) -> None:
        consistent = self.sampler.name == SamplerName.CONSISTENCY
        if (self.method == "consistency") != consistent:
            raise ConfigError(
                f"distill method '{self.method}' samples with "
                + (
                    "sampler.name consistency"
                    if self.method == "consistency"
                    else "an ordinary sampler (ddim, plms, dpm_solver_2m), not consistency"
                )
            )
        if self.sampler.guidance != 1.0:
            raise ConfigError(
                "sampler.guidance of a student must be 1 (the scale is built in; set `guidance` to choose it)"
            )
        if self.guidance < 0:
            raise ConfigError("guidance must be >= 0 (0: the teacher run's)")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError("condition_dropout must be in [0, 1)")
        if not 0.0 < self.consistency.target_decay < 1.0:
            raise ConfigError("consistency.target_decay must be in (0, 1)")
        if self.consistency.huber_c <= 0:
            raise ConfigError("consistency.huber_c must be > 0")
        if self.sampler.name == SamplerName.CONSISTENCY:
            self.sampler.consistency_skip = self.consistency.skip


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class Distillation(nn.Module):
    """Training module: the student, its EMA copy (the consistency target; the weights saved) and the frozen teacher.

    ``forward`` computes the whole loss (the loop may wrap it in DDP); only ``denoiser`` (the student) trains.
    """

    def __init__(
        self,
        teacher: Denoiser,
        noise: NoiseScheduleConfig,
        scale_factor: float,
        *,
        method: str,
        guidance: float,
        condition_dropout: float,
        consistency: ConsistencyConfig,
    ):
        super().__init__()
        self.denoiser = copy.deepcopy(teacher).requires_grad_(True)
        cond = self.denoiser.conditioner
        if cond.memory is not None and not cond.cfg.memory_trainable:
            cond.memory.requires_grad_(False)
        self.ema = _frozen(copy.deepcopy(teacher))
        self.teacher = _frozen(teacher)
        self.method, self.guidance, self.dropout = method, float(guidance), float(condition_dropout)
        self.cc = consistency
        self.noise_cfg = noise
        self.scheduler = build_train_scheduler(noise)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)), persistent=True)
        self.register_buffer(
            "grid", consistency_grid(noise.num_train_timesteps, consistency.skip), persistent=False
        )

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.ema.eval()
        self.teacher.eval()
        return self

    # -- the parameterisation ------------------------------------------------------------------------
    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acp = self.scheduler.alphas_cumprod.to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))
        return acp.sqrt(), (1 - acp).sqrt()

    def clean_estimate(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 from a network output (velocity, or noise for an epsilon model)."""
        return clean_estimate(out, x, *self._alpha_sigma(t, x), self.noise_cfg.prediction_type)

    def consistency_fn(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0(x, t)."""
        c_skip, c_out = (c.view(-1, *([1] * (x.dim() - 1))) for c in consistency_boundary(t))
        return c_skip * x + c_out * self.clean_estimate(x, t, out)

    @torch.no_grad()
    def teacher_velocity(
        self, x: torch.Tensor, t: torch.Tensor, feats: dict[str, torch.Tensor], sides, drop: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's guided velocity (unguided for dropped samples: both halves see the null context)."""
        teacher = self.teacher
        context = teacher.conditioner(**feats, drop=drop)
        null = teacher.conditioner.null_context(x.shape[0]).to(context.dtype)
        return guided_velocity(teacher, x, t, context, null, self.guidance, sides=sides)

    def forward(
        self,
        latent_mu: torch.Tensor,
        latent_sigma: torch.Tensor | None,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        word_kind: torch.Tensor,
        keypatches: torch.Tensor,
        keypatch_boxes: torch.Tensor,
        keypatch_mask: torch.Tensor,
        sides: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        b = latent_mu.shape[0]
        z = training_latent(latent_mu, latent_sigma, self.scale_factor, self.training)
        noise = torch.randn_like(z) if noise is None else noise
        if drop is None:
            p = self.dropout if self.training else 0.0
            drop = torch.rand(b, device=z.device) < p
        feats = dict(
            words=words,
            word_mask=word_mask,
            word_kind=word_kind,
            keypatches=keypatches,
            keypatch_boxes=keypatch_boxes,
            keypatch_mask=keypatch_mask,
        )
        sides = drop_hint(sides, drop)
        if index is None:
            index = torch.randint(0, len(self.grid), (b,), device=z.device)
        if self.method == "consistency":
            t = self.grid.to(z.device)[index]
        else:  # guidance: any training timestep
            t = torch.randint(0, self.noise_cfg.num_train_timesteps, (b,), device=z.device)
        x = self.scheduler.add_noise(z, noise, t)
        student = self.denoiser
        out = student(x, t, student.conditioner(**feats, drop=drop), sides).float()
        v_teacher = self.teacher_velocity(x, t, feats, sides, drop)
        if self.method == "guidance":
            loss = F.mse_loss(out, v_teacher)
            return {"loss": loss, "dropped": drop.float().mean()}
        with torch.no_grad():
            # one guided DDIM step of the teacher, skip timesteps down (to 0 from the lowest grid point)
            t_prev = (t - self.cc.skip).clamp(min=0)
            x0 = self.clean_estimate(x, t, v_teacher)
            a, s = self._alpha_sigma(t, x)
            eps = (x - a * x0) / s
            a_prev, s_prev = self._alpha_sigma(t_prev, x)
            x_prev = a_prev * x0 + s_prev * eps
            target_net = self.ema
            target_out = target_net(x_prev, t_prev, target_net.conditioner(**feats, drop=drop), sides).float()
            target = self.consistency_fn(x_prev, t_prev, target_out)
        pred = self.consistency_fn(x, t, out)
        c = self.cc.huber_c
        loss = (((pred - target) ** 2 + c * c).sqrt() - c).mean()
        return {"loss": loss, "dropped": drop.float().mean()}

    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * student (buffers copied)."""
        ema_update(self.ema, self.denoiser, decay)


class DistillStage:
    """The :class:`medvl.train.loop.Stage` of ``medvl train distill``: data and caches as the diffusion stage's
    (built from the teacher run's own configs), a :class:`Distillation` model."""

    name = "distill"
    shardable = False  # the EMA target is updated from the full student weights every step

    def __init__(self, cfg: DistillStageConfig, data: Path, teacher_run: Path, device: str | None = None):
        cfg.validate()
        self.config = cfg
        self.train = cfg.train
        self.teacher_run = Path(teacher_run)
        memory_dir = self.teacher_run / MEMORY_DIR
        self.memory = SharedMemory.from_pretrained(memory_dir) if memory_dir.is_dir() else None
        self.bundle = DiffusionBundle.from_pretrained(self.teacher_run, "cpu", memory=self.memory)
        if self.bundle.distilled is not None:
            raise RunError(
                f"{teacher_run} is already a distilled student; distil from the diffusion run it came from "
                f"({self.bundle.distilled.get('teacher', 'its teacher')})"
            )
        den = self.bundle.denoiser
        self.guidance = float(cfg.guidance or self.bundle.sampler.guidance)
        # the diffusion stage's data, caches and report encoder, with the teacher's own configs
        diffusion_cfg = DiffusionStageConfig(
            unet=den.unet_cfg,
            condition=den.conditioner.cfg,
            noise=self.bundle.noise,
            sampler=self.bundle.sampler,
            data=cfg.data,
            train=cfg.train,
        )
        # the data stage builds no model: the memory loaded above is the only copy it needs
        sources = SourceRuns(
            autoencoder=self.teacher_run / AUTOENCODER_DIR, adamatch=self.teacher_run, memory=None
        )
        self.data_stage = DiffusionStage(diffusion_cfg, Path(data), sources, device=device)
        self.device = self.data_stage.device
        self._reference: torch.Tensor | None = None

    @property
    def unused_parameters(self) -> bool:
        cond = self.bundle.denoiser.conditioner.cfg
        return cond.use_memory and not cond.memory_trainable

    def build_model(self) -> Distillation:
        teacher = copy.deepcopy(self.bundle.denoiser)
        return Distillation(
            teacher,
            self.bundle.noise,
            self.data_stage.autoencoder.latent.scale_factor,
            method=self.config.method,
            guidance=self.guidance,
            condition_dropout=self.config.condition_dropout,
            consistency=self.config.consistency,
        )

    def train_dataset(self) -> Dataset:
        return self.data_stage.train_dataset()

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return self.data_stage.collate(items)

    def training_step(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = batch["latent_mu"].device
        out = model(
            latent_mu=batch["latent_mu"],
            latent_sigma=batch["latent_sigma"],
            **self.data_stage._features_kwargs(batch, device),
        )
        return out["loss"], {"dropped": out["dropped"].detach()}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The student's trainable weights only (the diffusion stage's decay groups)."""
        return self.data_stage.param_groups(model)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        if self.config.method == "consistency":
            decay = self.config.consistency.target_decay
        else:
            decay = self.config.ema.decay
            if self.config.ema.warmup:
                decay = min(decay, (1 + step) / (10 + step))
        unwrap(model).update_ema(decay)

    # -- validation -----------------------------------------------------------------------------
    def _validation_inputs(self, device: torch.device):
        val = self.data_stage.cached("validate")
        feats = val.features.to(device, torch.float32)
        shape = tuple(val.mu.shape[1:])
        noise = initial_noise(shape, list(range(len(val))), device)
        return feats, noise

    def _sample(self, net: Denoiser, feats, noise, sampler: SamplerName, steps: int, guidance: float):
        scheduler = build_sampler(self.bundle.noise, sampler, consistency_skip=self.config.consistency.skip)
        kwargs = {k: v for k, v in feats.as_kwargs().items() if k in FEATURE_KEYS}
        context = net.conditioner(**kwargs)
        seeds = list(range(noise.shape[0]))
        return sample_latents(
            net, context, noise, scheduler, steps, guidance, "fp32", sides=feats.sides, seeds=seeds
        )

    def teacher_reference(self, device: torch.device) -> torch.Tensor:
        """The teacher's latents (its default sampler) for the validation reports; computed once."""
        if self._reference is None:
            feats, noise = self._validation_inputs(device)
            teacher = self.bundle.denoiser.to(device)
            s = self.bundle.sampler
            self._reference = self._sample(teacher, feats, noise, s.name, s.steps, s.guidance).cpu()
            self.bundle.denoiser.to("cpu")
        return self._reference

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """``val_ode_mse``: the student (EMA / target weights) against the teacher from the same noise (see the
        module docstring); ``val_loss``: the training loss on validation scans at fixed noise and timesteps."""
        net = unwrap(model)
        device = net.scale_factor.device
        reference = self.teacher_reference(device).to(device)
        feats, noise = self._validation_inputs(device)
        cfg = self.config
        steps = 1 if cfg.method == "consistency" else cfg.sampler.steps
        student = self._sample(net.ema, feats, noise, cfg.sampler.name, steps, 1.0)
        val = self.data_stage.cached("validate")
        g = torch.Generator().manual_seed(1234)
        n = len(val)
        mu = val.mu.float().to(device)
        out = net(
            latent_mu=mu,
            latent_sigma=None,
            **feats.as_kwargs(),
            noise=torch.randn(mu.shape, generator=g).to(device),
            index=torch.randint(0, len(net.grid), (n,), generator=g).to(device),
            drop=torch.zeros(n, dtype=torch.bool, device=device),
        )
        return {
            "val_ode_mse": float(F.mse_loss(student, reference)),
            "val_loss": float(out["loss"]),
        }

    def save_run(self, model: nn.Module, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        cfg = self.config
        teacher_sampler = self.bundle.sampler
        distilled = {
            "method": cfg.method,
            "teacher": self.teacher_run.name,  # the folder's name (stage.json's "from" holds the link)
            "guidance": self.guidance,
            "teacher_sampler": to_dict(teacher_sampler),
        }
        if cfg.method == "consistency":
            distilled["skip"] = cfg.consistency.skip
        student = unwrap(model).ema
        DiffusionBundle(student, self.bundle.noise, cfg.sampler, distilled).save_pretrained(
            run_dir / DiffusionBundle.DIRNAME
        )
        copy_component(self.teacher_run / AUTOENCODER_DIR, run_dir / AUTOENCODER_DIR)
        copy_component(self.teacher_run / ADAMATCH_DIR, run_dir / ADAMATCH_DIR)
        if student.conditioner.memory is not None:
            student.conditioner.memory.save_pretrained(run_dir / MEMORY_DIR)


def build_distill_stage(
    *, config_path: str | Path, overrides: list[str] | None, data: str | Path, from_runs: list[Path] | None
) -> DistillStage:
    """``medvl train distill --from DIFFUSION_RUN``."""
    cfg = load_config(DistillStageConfig, resolve_config_path("distill", config_path), overrides)
    cfg.validate()
    teacher = find_from_run(from_runs, "diffusion")
    if not (teacher / AutoencoderBundle.DIRNAME).is_dir():
        raise RunError(f"{teacher} has no {AutoencoderBundle.DIRNAME}/; it is not a complete diffusion run")
    return DistillStage(cfg, Path(data), teacher)

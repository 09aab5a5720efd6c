"""Noise schedules and samplers of the diffusion head, all on MONAI's noise schedules.

* :func:`build_train_scheduler` - MONAI's DDPM schedule used for training (``clip_sample=False``).
* :func:`build_sampler` / :func:`sample_latents` - DDIM and PLMS (MONAI) or DPM-Solver++(2M) (here), classifier-free
  guidance with the conditional and unconditional halves in one batched forward, ``clip_sample=False``, bf16
  autocast where the device supports it; multistep consistency sampling (:class:`ConsistencyScheduler`) for a
  student distilled by ``medvl train distill``.
* :func:`save_scheduler_config` / :func:`load_scheduler_config` - ``scheduler_config.json`` in the diffusion
  component: the training noise schedule and the default sampler, read back at sampling so that samples are drawn
  with the schedule the model was trained on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, Scheduler

from medvl.config import from_dict, to_dict
from medvl.models.diffusion.graphs import CUDA_GRAPHS, graphed
from medvl.models.pretrained import SCHEDULER_CONFIG_FILE, read_config, write_config

if TYPE_CHECKING:
    from medvl.models.diffusion.denoiser import Denoiser

__all__ = [
    "SamplerName",
    "Precision",
    "NoiseScheduleConfig",
    "SamplerConfig",
    "build_train_scheduler",
    "DPMSolverMultistepScheduler",
    "ConsistencyScheduler",
    "clean_estimate",
    "consistency_boundary",
    "consistency_grid",
    "build_sampler",
    "SCHEDULER_FORMAT",
    "save_scheduler_config",
    "load_scheduler_config",
    "load_distillation",
    "autocast_context",
    "initial_noise",
    "guided_velocity",
    "sample_latents",
]

SCHEDULER_FORMAT = "medvl.scheduler"


class SamplerName(str, Enum):
    """Samplers for the trained (v-prediction) model. ``ddim`` and ``plms`` are MONAI's schedulers."""

    DDIM = "ddim"
    PLMS = "plms"  # MONAI PNDMScheduler with skip_prk_steps (pseudo linear multistep)
    DPM_SOLVER_2M = "dpm_solver_2m"  # DPM-Solver++(2M), Lu et al. 2022, on MONAI's noise schedules
    # multistep consistency sampling (Song et al. 2023; Luo et al. 2023): only for a consistency-distilled student
    CONSISTENCY = "consistency"


class Precision(str, Enum):
    AUTO = "auto"  # bf16 autocast on a CUDA device that supports it, fp32 elsewhere
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class NoiseScheduleConfig:
    """The training noise schedule (MONAI's MIMIC recipe by default); samplers are built from the same numbers."""

    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"
    # Loss weight per timestep: "uniform" (MONAI recipe) or "min_snr" (Hang et al. 2023: min(SNR, gamma) / (SNR + 1)
    # for v-prediction, which converges faster by not over-weighting nearly clean timesteps).
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = 5.0


@dataclass
class SamplerConfig:
    """Sampling defaults saved with the run; ``medvl synthesize --steps/--guidance`` override them."""

    name: SamplerName = SamplerName.DPM_SOLVER_2M
    steps: int = 20
    guidance: float = 3.0  # v = v_uncond + guidance * (v_cond - v_uncond); 0 = unconditional, 1 = conditional
    precision: Precision = Precision.AUTO
    # the consistency sampler's timestep grid: every consistency_skip-th training timestep (a distilled student's
    # training skip; :func:`consistency_grid`)
    consistency_skip: int = 20


def build_train_scheduler(cfg: NoiseScheduleConfig) -> DDPMScheduler:
    """MONAI DDPM schedule used for training (``clip_sample=False``: latents are not in [-1, 1])."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def clean_estimate(model_output, sample, alpha, sigma, prediction_type: str):
    """x0 from a model's output at a point ``sample = alpha x0 + sigma eps`` of the schedule: a velocity
    (``v = alpha eps - sigma x0``) or the noise (epsilon models). alpha and sigma are floats or broadcastable
    tensors."""
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return (sample - sigma * model_output) / alpha


class _CleanEstimateScheduler(Scheduler):
    """MONAI's ``Scheduler`` for the samplers written here: a v- or epsilon-prediction model's clean estimate at a
    timestep of the training schedule (t < 0: the clean end, alpha 1, sigma 0), never ``clip_sample``."""

    def __init__(
        self, num_train_timesteps: int, schedule: str, prediction_type: str, **schedule_args
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type must be v_prediction or epsilon, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.clip_sample = False

    def _alpha_sigma(self, t: int) -> tuple[float, float]:
        if t < 0:
            return 1.0, 0.0
        acp = float(self.alphas_cumprod[t])
        return math.sqrt(acp), math.sqrt(1.0 - acp)

    def _clean(self, model_output: torch.Tensor, sample: torch.Tensor, t: int) -> torch.Tensor:
        return clean_estimate(model_output, sample, *self._alpha_sigma(t), self.prediction_type)


class DPMSolverMultistepScheduler(_CleanEstimateScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling"), deterministic.

    MONAI 1.6.1 ships DDPM, DDIM, PNDM/PLMS and rectified flow but no DPM-Solver; this class adds the
    second-order multistep data-prediction update on MONAI's ``Scheduler`` base (same noise schedules,
    same ``set_timesteps`` / ``step(model_output, timestep, sample) -> (prev_sample, x0)`` interface).
    Timesteps: ``linspace(T - 1, 0, N)`` rounded; the last step jumps to the clean sample (sigma = 0);
    the first step and the last are first order (the stable choice at few steps).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "v_prediction",
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, prediction_type, **schedule_args)
        self.set_timesteps(20)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in 1..{self.num_train_timesteps}, got {num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps
        ts = np.linspace(self.num_train_timesteps - 1, 0, num_inference_steps).round().astype(np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)
        self._index = 0
        self._prev_x0: torch.Tensor | None = None
        self._prev_h: float | None = None

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index
        t = int(timestep)
        s = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t, s_t = self._alpha_sigma(t)
        x0 = self._clean(model_output, sample, t)
        a_s, s_s = self._alpha_sigma(s)
        if s_s == 0.0:
            prev, h = x0, None
        else:
            h = math.log(a_s / s_s) - math.log(a_t / s_t)
            if self._prev_x0 is None or self._prev_h is None or i + 2 >= len(self.timesteps):
                d = x0
            else:
                r = self._prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._prev_x0
            prev = (s_s / s_t) * sample - a_s * math.expm1(-h) * d
        self._prev_x0, self._prev_h = x0, h
        self._index += 1
        return prev, x0


CONSISTENCY_SIGMA_DATA = 0.5
CONSISTENCY_TIME_SCALE = 10.0


def consistency_boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency parameterisation f(x, t) = c_skip x + c_out x0(x, t) at training
    timesteps ``t`` (LCM's choice: sigma_data 0.5, timesteps scaled by 10): f is the identity at t = 0, the
    network's clean estimate elsewhere."""
    ts = t.float() * CONSISTENCY_TIME_SCALE
    sd2 = CONSISTENCY_SIGMA_DATA**2
    return sd2 / (ts**2 + sd2), ts / (ts**2 + sd2).sqrt()


def consistency_grid(num_train_timesteps: int, skip: int) -> torch.Tensor:
    """The timesteps a consistency student is trained on, ascending: ``skip - 1, 2 skip - 1, ..., T - 1`` (LCM's
    50-point grid for T = 1000, skip 20). Training maps each to the one ``skip`` below it (or to 0)."""
    if not 1 <= skip <= num_train_timesteps:
        raise ValueError(f"skip must be in 1..{num_train_timesteps}, got {skip}")
    return torch.arange(1, num_train_timesteps // skip + 1) * skip - 1


class ConsistencyScheduler(_CleanEstimateScheduler):
    """Multistep consistency sampling for a student trained by consistency distillation (``medvl train distill``).

    Each step maps the sample to its clean estimate ``f(x, t)`` (:func:`consistency_boundary`); every step but the
    last noises that estimate again to the next timestep with fresh noise, which :func:`sample_latents` draws from
    per-sample seeds (so a scan does not depend on its batch). Timesteps: ``N`` points of the student's training
    grid (:func:`consistency_grid`), evenly spaced from ``T - 1`` down (LCM's schedule: 4 steps are 999, 759,
    519, 279 for T = 1000, skip 20). The model's output is read as a velocity (or noise, for epsilon models).
    """

    needs_noise = True

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "v_prediction",
        skip: int = 20,
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, prediction_type, **schedule_args)
        self.grid = consistency_grid(num_train_timesteps, skip)
        self.set_timesteps(4)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        n = len(self.grid)
        if not 1 <= num_inference_steps <= n:
            raise ValueError(f"a consistency student samples in 1..{n} steps, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        descending = self.grid.flip(0)
        self.timesteps = descending[:: n // num_inference_steps][:num_inference_steps].to(device)
        self._index = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(next sample, clean estimate f(x, t)); ``noise`` (like ``sample``) re-noises all but the last step."""
        i = self._index
        t = int(timestep)
        x0 = self._clean(model_output, sample, t)
        c_skip, c_out = consistency_boundary(torch.tensor(t))
        denoised = float(c_skip) * sample + float(c_out) * x0
        self._index += 1
        if i + 1 >= len(self.timesteps):
            return denoised, denoised
        if noise is None:
            raise ValueError("consistency sampling draws fresh noise at every step but the last: pass noise")
        a_s, s_s = self._alpha_sigma(int(self.timesteps[i + 1]))
        return a_s * denoised + s_s * noise, denoised


def build_sampler(
    noise: NoiseScheduleConfig, name: SamplerName | str, consistency_skip: int = 20
) -> Scheduler:
    """A sampling scheduler with exactly the training noise schedule (never ``clip_sample``)."""
    name = SamplerName(name)
    common = {
        "num_train_timesteps": noise.num_train_timesteps,
        "schedule": noise.schedule,
        "beta_start": noise.beta_start,
        "beta_end": noise.beta_end,
    }
    if name is SamplerName.DDIM:
        return DDIMScheduler(**common, clip_sample=False, prediction_type=noise.prediction_type)
    if name is SamplerName.PLMS:
        return PNDMScheduler(**common, skip_prk_steps=True, prediction_type=noise.prediction_type)
    if name is SamplerName.CONSISTENCY:
        return ConsistencyScheduler(**common, prediction_type=noise.prediction_type, skip=consistency_skip)
    return DPMSolverMultistepScheduler(**common, prediction_type=noise.prediction_type)


def save_scheduler_config(
    directory: str | Path,
    noise: NoiseScheduleConfig,
    sampler: SamplerConfig,
    distilled: dict | None = None,
) -> Path:
    """``directory/scheduler_config.json`` (the diffusion component): the training noise schedule and the default
    sampler, read back by inference, and for a distilled student what it was distilled from (``distilled``:
    method, teacher run, teacher sampler and the guidance scale built into the student). Returns the file."""
    extra = {"distilled": distilled} if distilled else {}
    return write_config(
        directory,
        SCHEDULER_FORMAT,
        filename=SCHEDULER_CONFIG_FILE,
        train={"class": "DDPMScheduler", "clip_sample": False, **to_dict(noise)},
        sampler=to_dict(sampler),
        **extra,
    )


def load_distillation(directory: str | Path) -> dict | None:
    """The ``distilled`` record of a diffusion component's scheduler config (None: not a distilled student)."""
    data = read_config(directory, SCHEDULER_FORMAT, filename=SCHEDULER_CONFIG_FILE, what="scheduler config")
    return data.get("distilled")


def load_scheduler_config(directory: str | Path) -> tuple[NoiseScheduleConfig, SamplerConfig]:
    """(noise schedule, default sampler) from ``directory/scheduler_config.json`` (see :func:`save_scheduler_config`)."""
    data = read_config(
        directory,
        SCHEDULER_FORMAT,
        filename=SCHEDULER_CONFIG_FILE,
        what="scheduler config",
        hint="not a diffusion run, or an incomplete one",
    )
    train = {k: v for k, v in data["train"].items() if k not in ("class", "clip_sample")}
    return from_dict(NoiseScheduleConfig, train, "train."), from_dict(
        SamplerConfig, data["sampler"], "sampler."
    )


def autocast_context(device: torch.device, precision: Precision | str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16`` (any device) and for ``auto`` on a CUDA device with bf16; else nothing."""
    precision = Precision(precision)
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    if precision is Precision.AUTO:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal; sample i comes from its own CPU generator seeded ``seeds[i]``, so one
    report's image does not depend on the batch it was drawn in."""
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(*shape, generator=torch.Generator().manual_seed(int(s)))
    return out.to(device)


@torch.no_grad()
def guided_velocity(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    null: torch.Tensor,
    guidance: float,
    batched: bool = True,
    sides: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classifier-free guidance: v_u + g (v_c - v_u); one forward over [cond; uncond] (2B).

    The unconditional half gets the learned null context and no side hint. g = 0 runs only the unconditional
    pass (the output *is* the unconditional model), g = 1 only the conditional one.
    """
    if guidance == 0.0:
        return denoiser(x, t, null).float()
    if guidance == 1.0:
        return denoiser(x, t, context, sides).float()
    if batched:
        both = None if sides is None else torch.cat([sides, torch.zeros_like(sides)])
        v = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]), both).float()
        v_c, v_u = v.chunk(2)
    else:
        v_c, v_u = denoiser(x, t, context, sides).float(), denoiser(x, t, null).float()
    return v_u + guidance * (v_c - v_u)


@torch.no_grad()
def sample_latents(
    denoiser: Denoiser,
    context: torch.Tensor,
    noise: torch.Tensor,
    scheduler: Scheduler,
    steps: int,
    guidance: float,
    precision: Precision | str = Precision.AUTO,
    sides: torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (B, C, h, w) to scaled latents with ``scheduler`` in ``steps`` model calls.

    context (B, L, Cc) is the conditional context; the null context comes from the denoiser's conditioner.
    A sampler that draws fresh noise along the way (``needs_noise``: consistency sampling) draws sample i's
    from ``seeds[i]`` (the seed of its initial noise), so a scan does not depend on its batch; without seeds
    it draws from torch's global generator.
    """
    device = noise.device
    scheduler.set_timesteps(steps)
    null = denoiser.conditioner.null_context(noise.shape[0]).to(device, context.dtype)
    x = noise.float()
    fresh = getattr(scheduler, "needs_noise", False)
    # on a GPU (with graphs.CUDA_GRAPHS) every network pass is one replay of a captured CUDA graph
    net = graphed(denoiser) if CUDA_GRAPHS["sample"] and device.type == "cuda" else denoiser
    with autocast_context(device, precision):
        for i, t in enumerate(scheduler.timesteps):
            tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            v = guided_velocity(net, x, tt, context, null, guidance, sides=sides)
            if fresh:
                z = (
                    torch.randn(x.shape, device=device)
                    if seeds is None
                    else initial_noise(x.shape[1:], [_step_seed(s, i) for s in seeds], device)
                )
                x, _ = scheduler.step(v.float(), int(t), x, noise=z)
            else:
                x, _ = scheduler.step(v.float(), int(t), x)
            x = x.float()
    return x


def _step_seed(seed: int, step: int) -> int:
    """The seed of the fresh noise a sample draws at sampler step ``step`` (distinct from its initial noise's)."""
    return (int(seed) * 1_000_003 + 7919 * (step + 1)) % (2**63 - 1)

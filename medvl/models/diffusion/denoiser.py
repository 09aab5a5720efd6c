"""The diffusion head's denoiser: MONAI's ``DiffusionModelUNet`` with the report conditioner, its training module
(v-prediction loss, condition dropout, an EMA copy) and the saved ``diffusion/`` component (:class:`DiffusionBundle`)::

    diffusion/config.json             format medvl.diffusion: UNet and condition configs, the input widths
    diffusion/model.safetensors       the denoiser's (EMA) weights without the shared memory (``RUN/memory/``)
    diffusion/scheduler_config.json   the training noise schedule and the default sampler
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from medvl.config import from_dict, to_dict
from medvl.errors import ConfigError, RunError
from medvl.models.diffusion.conditioning import ConditionConfig, ReportConditioner
from medvl.models.diffusion.samplers import (
    NoiseScheduleConfig,
    SamplerConfig,
    build_train_scheduler,
    load_distillation,
    load_scheduler_config,
    save_scheduler_config,
)
from medvl.models.memory import SharedMemory
from medvl.models.pretrained import component_dir, load_weights, read_config, save_weights, write_config

__all__ = [
    "UNetConfig",
    "Denoiser",
    "LatentDiffusion",
    "DiffusionBundle",
    "training_latent",
    "drop_hint",
    "ema_update",
]


def training_latent(
    latent_mu: torch.Tensor, latent_sigma: torch.Tensor | None, scale_factor: torch.Tensor, sample: bool
) -> torch.Tensor:
    """The scaled latent a training step starts from: a draw from the cached posterior (``mu + sigma * eps``) when
    ``sample`` (training), else its mean, times the latent scale factor."""
    z = latent_mu.float()
    if latent_sigma is not None and sample:
        z = z + latent_sigma.float() * torch.randn_like(z)
    return z * scale_factor


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net (buffers copied); same architecture.

    One multi-tensor lerp over all parameters (as ``torch.optim.swa_utils``' EMA does): on a GPU a few kernel
    launches instead of one per parameter tensor; the values are those of ``lerp_`` tensor by tensor."""
    params = list(ema.parameters())
    sources = [p.detach() for p in net.parameters()]
    if len(params) != len(sources):
        raise ValueError(f"EMA and model differ: {len(params)} against {len(sources)} parameter tensors")
    torch._foreach_lerp_(params, sources, 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers(), strict=True):
        e.copy_(b)


def drop_hint(sides: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor | None:
    """The layout hint with dropped samples' zeroed: the null condition has no hint."""
    if sides is None:
        return None
    return torch.where(drop.view(-1, *([1] * (sides.dim() - 1))), torch.zeros_like(sides), sides)


@dataclass
class UNetConfig:
    """``monai.networks.nets.DiffusionModelUNet`` sizes (cross-attention always on)."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    num_res_blocks: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    num_head_channels: int | list[int] = (
        32  # per level (MONAI); a list like [0, 512, 768] = one head per level
    )
    transformer_num_layers: int = 1
    cross_attention_dim: int = 128
    norm_num_groups: int = 32
    use_flash_attention: bool = False
    # Imagen-style global conditioning: the context's summary token (pooled report words), through an MLP, is
    # added to the timestep embedding (MONAI's class-embedding slot), so every ResBlock sees the whole report.
    global_condition: bool = True
    # Two constant input channels holding the x and y coordinate (CoordConv): a chest film is nearly
    # mirror-symmetric and convolutions are translation-equivariant, so without them the UNet can hardly tell
    # the image's left half from its right, i.e. cannot learn where "left effusion" goes.
    coordinate_channels: bool = True
    # A layout hint read from the report: two more input channels, one for the patient's right and one for the
    # left. With ``condition.layout: halves`` (:func:`report_sides`) each lights its whole image half when the
    # report states a positive finding on that side; with ``zones`` (:func:`report_layout`) it holds soft boxes
    # where those findings sit. Zero for the null condition. Off in the MONAI recipe; on (zones) in the demo.
    side_maps: bool = False

    def validate(self) -> None:
        if len(self.channels) != len(self.attention_levels):
            raise ConfigError("unet.channels and unet.attention_levels need the same length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError(
                f"every unet.channels entry must be divisible by norm_num_groups ({self.norm_num_groups})"
            )


class Denoiser(nn.Module):
    """The conditioned UNet: ``forward(x (B, C, h, w), t (B,), context (B, L, Cc)) -> v (B, C, h, w)``."""

    def __init__(self, unet_cfg: UNetConfig, latent_channels: int, conditioner: ReportConditioner):
        super().__init__()
        unet_cfg.validate()
        self.unet_cfg = unet_cfg
        self.latent_channels = latent_channels
        #: ``monai.networks.nets.DiffusionModelUNet``'s keyword arguments (JSON types; saved in config.json).
        self.unet_kwargs = dict(
            spatial_dims=2,
            in_channels=latent_channels + 2 * int(unet_cfg.coordinate_channels) + 2 * int(unet_cfg.side_maps),
            out_channels=latent_channels,
            num_res_blocks=unet_cfg.num_res_blocks,
            channels=list(unet_cfg.channels),
            attention_levels=list(unet_cfg.attention_levels),
            norm_num_groups=unet_cfg.norm_num_groups,
            num_head_channels=(
                unet_cfg.num_head_channels
                if isinstance(unet_cfg.num_head_channels, int)
                else list(unet_cfg.num_head_channels)
            ),
            with_conditioning=True,
            transformer_num_layers=unet_cfg.transformer_num_layers,
            cross_attention_dim=conditioner.context_dim,
            use_flash_attention=unet_cfg.use_flash_attention,
        )
        self.unet = DiffusionModelUNet(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in self.unet_kwargs.items()}
        )
        self.conditioner = conditioner
        if unet_cfg.global_condition:
            # MONAI adds ``class_embedding(class_labels)`` to the timestep embedding; a continuous map from the
            # summary token takes the place of its lookup table. Zero-initialised: training starts as without it.
            time_dim = self.unet.time_embed[-1].out_features
            pooled = nn.Sequential(
                nn.Linear(conditioner.context_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
            )
            nn.init.zeros_(pooled[-1].weight)
            nn.init.zeros_(pooled[-1].bias)
            self.unet.class_embedding = pooled
            self.unet.num_class_embeds = 1

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        sides: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, h, w), timesteps (B,), context (B, L, Cc), sides (B, 2) halves or (B, 2, g, g) layout maps, or
        None (no hint) -> v (B, C, h, w)."""
        pooled = context[:, 0] if self.unet_cfg.global_condition else None  # the summary token
        b, _, h, w = x.shape
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        extra = []
        if self.unet_cfg.coordinate_channels:
            ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
            extra += [xs, ys]  # x grows toward the image's right (the patient's left on a PA film)
        if self.unet_cfg.side_maps:
            s = x.new_zeros(b, 2) if sides is None else sides.to(x.dtype)
            if s.dim() == 4:  # zone layout maps (condition.layout "zones")
                extra.append(
                    F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
                    if s.shape[-2:] != (h, w)
                    else s
                )
            else:  # halves
                extra += [s[:, 0].view(b, 1, 1, 1) * (xs < 0), s[:, 1].view(b, 1, 1, 1) * (xs > 0)]
        if extra:
            x = torch.cat([x, *extra], 1)
        return self.unet(x, timesteps, context=context, class_labels=pooled)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights without the shared memory (saved separately under ``RUN/memory/``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("conditioner.memory.")}


class LatentDiffusion(nn.Module):
    """Training module. ``forward`` computes the whole loss so the loop may wrap it in DDP.

    forward(latent_mu, latent_sigma (B, C, h, w) unscaled autoencoder posteriors, report features...) ->
    ``{"loss", "loss_cond", "dropped"}``. The latent is drawn from the posterior at every step
    (``mu + sigma * eps``) and scaled by ``scale_factor``; timesteps are uniform; a sample's context is the
    learned null context with probability ``condition.dropout``.
    """

    def __init__(self, denoiser: Denoiser, noise: NoiseScheduleConfig, scale_factor: float):
        super().__init__()
        self.denoiser = denoiser
        self.ema = copy.deepcopy(denoiser).requires_grad_(False)
        self.noise_cfg = noise
        self.scheduler = build_train_scheduler(noise)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)), persistent=True)
        self.ema.eval()

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.ema.eval()
        return self

    def forward(
        self,
        latent_mu: torch.Tensor,
        latent_sigma: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        word_kind: torch.Tensor,
        keypatches: torch.Tensor,
        keypatch_boxes: torch.Tensor,
        keypatch_mask: torch.Tensor,
        sides: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        use_ema: bool = False,
    ) -> dict[str, torch.Tensor]:
        net = self.ema if use_ema else self.denoiser
        b = latent_mu.shape[0]
        z = training_latent(latent_mu, latent_sigma, self.scale_factor, self.training)
        noise = torch.randn_like(z) if noise is None else noise
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_cfg.num_train_timesteps, (b,), device=z.device)
        if drop is None:
            p = net.conditioner.cfg.dropout if self.training else 0.0
            drop = torch.rand(b, device=z.device) < p
        noisy = self.scheduler.add_noise(z, noise, timesteps)
        if self.noise_cfg.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(z, noise, timesteps)
        else:
            target = noise
        context = net.conditioner(
            words, word_mask, word_kind, keypatches, keypatch_boxes, keypatch_mask, drop=drop
        )
        pred = net(noisy, timesteps, context, drop_hint(sides, drop))
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        if self.noise_cfg.loss_weighting == "min_snr":
            acp = self.scheduler.alphas_cumprod.to(z.device)[timesteps].float()
            snr = acp / (1 - acp)
            gamma = self.noise_cfg.min_snr_gamma
            weight = (
                snr.clamp(max=gamma) / (snr + 1)
                if self.noise_cfg.prediction_type == "v_prediction"
                else snr.clamp(max=gamma) / snr
            )
            per_sample = per_sample * weight
        keep = (~drop).float()
        loss_cond = (per_sample * keep).sum() / keep.sum().clamp(min=1.0)
        return {"loss": per_sample.mean(), "loss_cond": loss_cond.detach(), "dropped": drop.float().mean()}

    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights (buffers copied)."""
        ema_update(self.ema, self.denoiser, decay)


class DiffusionBundle:
    """A trained diffusion head: the denoiser (EMA weights) with the noise schedule it was trained on and its default
    sampler, as stored under ``RUN/diffusion/``. The shared memory is not part of it: pass the run's own.
    ``distilled`` describes a few-step student (``medvl train distill``): method, teacher, built-in guidance."""

    FORMAT: ClassVar[str] = "medvl.diffusion"
    DIRNAME: ClassVar[str] = "diffusion"

    def __init__(
        self,
        denoiser: Denoiser,
        noise: NoiseScheduleConfig,
        sampler: SamplerConfig,
        distilled: dict | None = None,
    ):
        self.denoiser, self.noise, self.sampler, self.distilled = denoiser, noise, sampler, distilled

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json``, ``model.safetensors`` (without the memory) and ``scheduler_config.json``; returns the
        folder."""
        directory = Path(directory)
        den = self.denoiser
        cond = den.conditioner
        save_weights(directory, den.inference_state_dict())
        write_config(
            directory,
            self.FORMAT,
            {"unet": to_dict(den.unet_cfg), "condition": to_dict(cond.cfg)},
            word_dim=cond.word_dim,
            keypatch_dim=cond.keypatch_dim,
            latent_channels=den.latent_channels,
            context_dim=cond.context_dim,
            monai={
                "class": "monai.networks.nets.DiffusionModelUNet",
                "kwargs": den.unet_kwargs,
                "state_dict_prefix": "unet.",
                # with unet.global_condition the class embedding is Linear(context_dim, T) - SiLU - Linear(T, T),
                # T the timestep embedding's width, fed the report's summary token (the context's first row)
                "class_embedding": "mlp" if den.unet_cfg.global_condition else None,
            },
        )
        save_scheduler_config(directory, self.noise, self.sampler, self.distilled)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", *, memory: SharedMemory | None = None
    ) -> DiffusionBundle:
        """Load ``directory`` (or ``directory/diffusion/`` when ``directory`` is a run); ``memory`` is the shared
        memory the head was trained with (``RUN/memory/``), needed when its ``condition.use_memory`` is on."""
        directory = component_dir(directory, cls.DIRNAME)
        spec = read_config(
            directory, cls.FORMAT, what="diffusion head", hint="train one with `medvl train diffusion`"
        )
        unet_cfg = from_dict(UNetConfig, spec["config"]["unet"], "unet.")
        cond_cfg = from_dict(ConditionConfig, spec["config"]["condition"], "condition.")
        conditioner = ReportConditioner(
            cond_cfg, spec["word_dim"], spec["keypatch_dim"], spec["context_dim"], memory=memory
        )
        denoiser = Denoiser(unet_cfg, spec["latent_channels"], conditioner)
        missing, unexpected = denoiser.load_state_dict(load_weights(directory), strict=False)
        missing = [k for k in missing if not k.startswith("conditioner.memory.")]
        if missing or unexpected:
            raise RunError(
                f"{directory}: weights do not match the saved head config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        noise, sampler = load_scheduler_config(directory)
        return cls(denoiser.to(device).eval(), noise, sampler, load_distillation(directory))

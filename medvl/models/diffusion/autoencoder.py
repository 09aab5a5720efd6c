"""The diffusion head's autoencoder: MONAI's ``AutoencoderKL`` between scans and latents, saved with its latent
scale factor as the ``autoencoder/`` component of a run (:class:`AutoencoderBundle`)::

    autoencoder/config.json         format medvl.autoencoder: the model config, the latent info (scale factor) and
                                    ``monai``: the class and keyword arguments that rebuild it without medvl
    autoencoder/model.safetensors   the AutoencoderKL weights
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL

from medvl.config import from_dict, to_dict
from medvl.errors import ConfigError
from medvl.models.pretrained import component_dir, load_weights, read_config, save_weights, write_config

__all__ = [
    "XRAY_RANGE",
    "AutoencoderConfig",
    "autoencoder_kwargs",
    "build_autoencoder",
    "to_model_range",
    "from_model_range",
    "LatentInfo",
    "AutoencoderBundle",
]

#: Scans are stored in torchxrayvision's convention; the networks see [-1, 1].
XRAY_RANGE = 1024.0
#: scans per decoder call on the CPU (:meth:`AutoencoderBundle.decode`)
CPU_DECODE_CHUNK = 8


@dataclass
class AutoencoderConfig:
    """``monai.networks.nets.AutoencoderKL`` sizes. Latent: (latent_channels, S / 2**(levels-1), same)."""

    image_size: int = 64
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    num_res_blocks: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, False])
    latent_channels: int = 3
    norm_num_groups: int = 16
    with_nonlocal_attn: bool = False

    def validate(self) -> None:
        if len(self.channels) != len(self.attention_levels):
            raise ConfigError("model.channels and model.attention_levels need the same length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError(
                f"every model.channels entry must be divisible by norm_num_groups ({self.norm_num_groups})"
            )
        if self.image_size % self.downsampling:
            raise ConfigError(f"model.image_size {self.image_size} must be divisible by {self.downsampling}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.downsampling
        return (self.latent_channels, s, s)


def autoencoder_kwargs(cfg: AutoencoderConfig) -> dict:
    """The keyword arguments of ``monai.networks.nets.AutoencoderKL`` for ``cfg`` (JSON types)."""
    return dict(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        num_res_blocks=cfg.num_res_blocks,
        channels=list(cfg.channels),
        attention_levels=list(cfg.attention_levels),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.with_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_nonlocal_attn,
    )


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """MONAI's KL autoencoder: (B, 1, S, S) in [-1, 1] -> z_mu, z_sigma (B, C, S/f, S/f) -> (B, 1, S, S)."""
    cfg.validate()
    kwargs = autoencoder_kwargs(cfg)
    kwargs.update(channels=tuple(cfg.channels), attention_levels=tuple(cfg.attention_levels))
    return AutoencoderKL(**kwargs)


def to_model_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S) in [-1024, 1024] -> (B, 1, size, size) in [-1, 1] (area downsampling, no flips)."""
    x = images.float() / XRAY_RANGE
    if x.shape[-1] != size or x.shape[-2] != size:
        mode = "area" if x.shape[-1] > size else "bilinear"
        x = F.interpolate(
            x, size=(size, size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
        )
    return x.clamp(-1.0, 1.0)


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, s, s) in about [-1, 1] -> float32 in [-1024, 1024]."""
    return (x.float().clamp(-1.0, 1.0) * XRAY_RANGE).contiguous()


@dataclass
class LatentInfo:
    """What the autoencoder run saves beside its weights (``autoencoder/latent.json``)."""

    scale_factor: float
    latent_shape: list[int]
    image_size: int
    num_images: int  # training images the scale factor was computed from


class AutoencoderBundle:
    """A trained autoencoder with its latent scale factor, as stored under ``RUN/autoencoder/``."""

    FORMAT: ClassVar[str] = "medvl.autoencoder"
    DIRNAME: ClassVar[str] = "autoencoder"

    def __init__(self, model: AutoencoderKL, cfg: AutoencoderConfig, latent: LatentInfo):
        self.model, self.cfg, self.latent = model, cfg, latent

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` (model config, latent info) and ``model.safetensors``; returns the folder."""
        directory = Path(directory)
        save_weights(directory, self.model.state_dict())
        write_config(
            directory,
            self.FORMAT,
            to_dict(self.cfg),
            latent=asdict(self.latent),
            monai={"class": "monai.networks.nets.AutoencoderKL", "kwargs": autoencoder_kwargs(self.cfg)},
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> AutoencoderBundle:
        """Load ``directory`` (or ``directory/autoencoder/`` when ``directory`` is a run)."""
        directory = component_dir(directory, cls.DIRNAME)
        meta = read_config(
            directory, cls.FORMAT, what="trained autoencoder", hint="train one with `medvl train autoencoder`"
        )
        cfg = from_dict(AutoencoderConfig, meta["config"], "model.")
        model = build_autoencoder(cfg)
        model.load_state_dict(load_weights(directory))
        latent = LatentInfo(**meta["latent"])
        return cls(model.to(device).eval(), cfg, latent)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, S, S) in [-1024, 1024] -> unscaled (z_mu, z_sigma), each (B, C, h, w)."""
        device = next(self.model.parameters()).device
        return self.model.encode(to_model_range(images.to(device), self.cfg.image_size))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) (what the UNet sees) -> images (B, 1, S, S) in [-1024, 1024].

        On the CPU the batch is decoded :data:`CPU_DECODE_CHUNK` scans at a time: the decoder's full-resolution
        activations of a large batch overflow the caches (64 demo scans decode 2.6x faster in chunks of 8)."""
        z = latents / self.latent.scale_factor
        step = CPU_DECODE_CHUNK if z.device.type == "cpu" else max(len(z), 1)
        return from_model_range(
            torch.cat([self.model.decode(z[i : i + step]) for i in range(0, len(z), step)])
        )

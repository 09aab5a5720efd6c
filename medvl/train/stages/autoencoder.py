"""Training stage of the diffusion head's autoencoder: ``medvl train autoencoder``.

Autoencoder run (``RUN/autoencoder/``): MONAI ``AutoencoderKL`` trained with L1 + KL, optionally a
patch-adversarial term (``PatchDiscriminator``) and a perceptual term from local weights only; the latent
scale factor (1 / std of training latents) is computed from training scans when the run is saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from medvl.config import load_config, resolve_config_path
from medvl.errors import ConfigError, RunError
from medvl.models.diffusion import AutoencoderBundle, AutoencoderConfig, LatentInfo, build_autoencoder
from medvl.train.distributed import unwrap
from medvl.train.loop import TrainConfig
from medvl.train.stages.scans import RandomCrop, ScanDataConfig, open_split

AUTOENCODER_DIR = AutoencoderBundle.DIRNAME


@dataclass
class AutoencoderLossConfig:
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0  # 0: no discriminator
    adversarial_start: int = 0  # optimiser step from which the adversarial terms count
    discriminator_channels: int = 32
    discriminator_layers: int = 3
    perceptual_weight: float = 0.0  # needs perceptual_weights
    perceptual_weights: str | None = (
        None  # local torchvision ResNet-50 state dict; nothing is ever downloaded
    )

    def validate(self) -> None:
        if self.perceptual_weight > 0:
            if not self.perceptual_weights:
                raise ConfigError(
                    "loss.perceptual_weight > 0 needs loss.perceptual_weights: a local ResNet-50 "
                    "state dict (MONAI's PerceptualLoss would download weights otherwise)"
                )
            if not Path(self.perceptual_weights).is_file():
                raise ConfigError(f"loss.perceptual_weights: {self.perceptual_weights} does not exist")


@dataclass
class AutoencoderStageConfig:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: ScanDataConfig = field(default_factory=ScanDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(select_metric="val_l1"))
    scale_images: int = 256  # training scans the latent scale factor is computed from


class AutoencoderTrainer(nn.Module):
    """``forward(images (B, 1, s, s) in [-1, 1]) -> {"loss", "l1", "kl", ...}``, the whole step's loss.

    With a discriminator the generator and discriminator terms are summed into one loss for the loop's
    single optimiser: the generator's adversarial term sees the discriminator through detached parameters
    (``torch.func.functional_call``) and the discriminator's own term sees a detached reconstruction, so
    each network only gets the gradient of its own objective.
    """

    def __init__(self, cfg: AutoencoderStageConfig):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = build_autoencoder(cfg.model)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.discriminator: nn.Module | None = None
        self.perceptual: nn.Module | None = None
        if cfg.loss.adversarial_weight > 0:
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            self.discriminator = PatchDiscriminator(
                spatial_dims=2,
                num_layers_d=cfg.loss.discriminator_layers,
                channels=cfg.loss.discriminator_channels,
                in_channels=1,
                out_channels=1,
                norm="INSTANCE",
            )
            self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        if cfg.loss.perceptual_weight > 0:
            from monai.losses import PerceptualLoss

            cfg.loss.validate()
            self.perceptual = PerceptualLoss(
                spatial_dims=2,
                network_type="resnet50",
                pretrained=True,
                pretrained_path=cfg.loss.perceptual_weights,
            )
            self.perceptual.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        recon, mu, sigma = self.autoencoder(images)
        l1 = F.l1_loss(recon.float(), images.float())
        kl = 0.5 * (mu.float().pow(2) + sigma.float().pow(2) - torch.log(sigma.float().pow(2) + 1e-12) - 1)
        kl = kl.flatten(1).sum(1).mean()
        loss = l1 + self.cfg.loss.kl_weight * kl
        out = {"l1": l1.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            p = self.perceptual((recon.float() + 1) / 2, (images.float() + 1) / 2)
            loss = loss + self.cfg.loss.perceptual_weight * p
            out["perceptual"] = p.detach()
        if self.discriminator is not None:
            on = float(self.training and int(self.step) >= self.cfg.loss.adversarial_start)
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fake_logits = torch.func.functional_call(self.discriminator, frozen, (recon.float(),))[-1]
            g_adv = self.adversarial(fake_logits, target_is_real=True, for_discriminator=False)
            d_fake = self.adversarial(
                self.discriminator(recon.detach().float())[-1], target_is_real=False, for_discriminator=True
            )
            d_real = self.adversarial(
                self.discriminator(images.float())[-1], target_is_real=True, for_discriminator=True
            )
            d_loss = 0.5 * (d_fake + d_real)
            loss = loss + on * self.cfg.loss.adversarial_weight * (g_adv + d_loss)
            out.update(adv_g=g_adv.detach(), adv_d=d_loss.detach())
        if self.training:
            self.step += 1
        out["loss"] = loss
        return out


class AutoencoderStage:
    """The :class:`medvl.train.loop.Stage` of ``medvl train autoencoder``."""

    name = "autoencoder"

    def __init__(self, cfg: AutoencoderStageConfig, data: Path):
        self.config = cfg
        self.train = cfg.train
        self.data = Path(data)
        size = cfg.model.image_size
        self._train = open_split(self.data, "train", cfg.data, size, cfg.data.max_train_images)
        self._val = open_split(self.data, "validate", cfg.data, size, cfg.data.val_images)

    def build_model(self) -> AutoencoderTrainer:
        return AutoencoderTrainer(self.config)

    def train_dataset(self) -> Dataset:
        crop = self.config.data.crop_size
        if crop:
            if crop % self.config.model.downsampling:
                raise ConfigError(
                    f"data.crop_size {crop} must be divisible by {self.config.model.downsampling}"
                )
            return RandomCrop(self._train, crop)
        return self._train

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"images": torch.stack(items)}

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        out = model(images=batch["images"])
        return out["loss"], {k: v.detach() for k, v in out.items() if k != "loss"}

    def validate(self, model: nn.Module) -> dict[str, float]:
        ae = unwrap(model).autoencoder
        device = next(ae.parameters()).device
        l1 = mse = 0.0
        n = 0
        for i in range(0, len(self._val), 32):
            x = torch.stack([self._val[j] for j in range(i, min(i + 32, len(self._val)))]).to(device)
            recon = ae.reconstruct(x).float().clamp(-1, 1)
            l1 += F.l1_loss(recon, x, reduction="sum").item() / x[0].numel()
            mse += F.mse_loss(recon, x, reduction="none").flatten(1).mean(1).sum().item()
            n += x.shape[0]
        mse /= n
        return {"val_l1": l1 / n, "val_psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}  # range [-1, 1]: peak 2

    def log_images(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        ae = unwrap(model).autoencoder
        device = next(ae.parameters()).device
        x = torch.stack([self._val[j] for j in range(min(4, len(self._val)))]).to(device)
        recon = ae.reconstruct(x).float().clamp(-1, 1)
        return {"val/real_vs_reconstruction": (torch.cat([x, recon]) + 1) / 2}

    def save_run(self, model: nn.Module, run_dir: Path) -> None:
        ae = unwrap(model).autoencoder.eval()
        latent = compute_latent_info(
            ae, self._train, self.config.model, self.config.scale_images, seed=self.train.seed
        )
        AutoencoderBundle(ae, self.config.model, latent).save_pretrained(Path(run_dir) / AUTOENCODER_DIR)


@torch.no_grad()
def compute_latent_info(
    ae: nn.Module, scans: Dataset, cfg: AutoencoderConfig, n: int, seed: int = 0
) -> LatentInfo:
    """Scale factor 1 / std of posterior samples of up to ``n`` training scans (MONAI's LDM recipe)."""
    device = next(ae.parameters()).device
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(scans), generator=g)[:n].tolist()
    zs = []
    for i in range(0, len(pick), 32):
        x = torch.stack([scans[j] for j in pick[i : i + 32]]).to(device)
        mu, sigma = ae.encode(x)
        eps = torch.randn(mu.shape, generator=g).to(device)
        zs.append((mu + sigma * eps).float().cpu())
    z = torch.cat(zs)
    std = float(z.std())
    if not math.isfinite(std) or std <= 0:
        raise RunError(f"autoencoder latents have std {std}; training failed")
    return LatentInfo(
        scale_factor=1.0 / std,
        latent_shape=list(cfg.latent_shape),
        image_size=cfg.image_size,
        num_images=len(pick),
    )


def build_autoencoder_stage(
    *,
    config_path: str | Path,
    overrides: list[str] | None,
    data: str | Path,
    from_runs: list[Path] | None = None,
) -> AutoencoderStage:
    """``medvl train autoencoder``: no ``--from`` runs are used."""
    cfg = load_config(AutoencoderStageConfig, resolve_config_path("autoencoder", config_path), overrides)
    cfg.loss.validate()
    return AutoencoderStage(cfg, Path(data))

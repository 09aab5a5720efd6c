"""Training stages of the diffusion head: ``medvl train autoencoder`` and ``medvl train diffusion``.

Autoencoder run (``RUN/autoencoder/``): MONAI ``AutoencoderKL`` trained with L1 + KL, optionally a
patch-adversarial term (``PatchDiscriminator``) and a perceptual term from local weights only; the latent
scale factor (1 / std of training latents) is computed from training scans when the run is saved.

Diffusion run: ``--from`` the AdaMatch run (frozen text encoder and keypatch bank), the report run (its
``memory/``, frozen by default) and the autoencoder run. Training latents and report features are computed
once and cached; every step draws a latent from the cached posterior, a timestep and noise, and regresses the
velocity (v-prediction). EMA weights are validated and saved. The run is self-contained (each folder a saved
component, :mod:`medvl.models.pretrained`)::

    RUN/diffusion/      config.json, model.safetensors (EMA weights), scheduler_config.json (noise schedule +
                        default sampler)
    RUN/autoencoder/    copied from the autoencoder run
    RUN/adamatch/       copied from the AdaMatch run (tokenizer, weights, keywords, keypatch bank)
    RUN/memory/         the shared memory the head was trained with
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from medvl.config import load_config, resolve_config_path
from medvl.data.prepared import PreparedDataset
from medvl.errors import ConfigError, DataError, RunError
from medvl.models.adamatch import AdaMatchRun
from medvl.models.diffusion import (
    AutoencoderBundle,
    AutoencoderConfig,
    ConditionConfig,
    Denoiser,
    DiffusionBundle,
    LatentDiffusion,
    LatentInfo,
    NoiseScheduleConfig,
    ReportConditioner,
    ReportEncoder,
    ReportFeatures,
    SamplerConfig,
    UNetConfig,
    build_autoencoder,
    layout_prior_from_regions,
    to_model_range,
)
from medvl.models.memory import SharedMemory
from medvl.models.pretrained import copy_component
from medvl.runs import stages_of
from medvl.train.distributed import unwrap
from medvl.train.loop import TrainConfig

logger = logging.getLogger(__name__)

AUTOENCODER_DIR = AutoencoderBundle.DIRNAME
ADAMATCH_DIR = AdaMatchRun.DIRNAME
MEMORY_DIR = SharedMemory.DIRNAME


@dataclass
class ScanDataConfig:
    """Which scans of the prepared dataset a stage uses."""

    views: list[str] = field(default_factory=lambda: ["PA", "AP"])  # frontal only; blank views are kept
    max_train_images: int = 0  # 0: all
    val_images: int = 128  # validation scans per evaluation (fixed subset)
    crop_size: int = (
        0  # autoencoder only: train on random crops of this size (it is fully convolutional); 0: whole
    )


class RandomCrop(Dataset):
    """Random ``size`` x ``size`` crops of another dataset's (1, s, s) items (no flips: sides stay put)."""

    def __init__(self, base: Dataset, size: int):
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.base[i]
        s = x.shape[-1]
        if self.size >= s:
            return x
        y0, x0 = torch.randint(0, s - self.size + 1, (2,)).tolist()
        return x[..., y0 : y0 + self.size, x0 : x0 + self.size]


def select_scans(ds: PreparedDataset, views: list[str], limit: int = 0) -> list[int]:
    """Indices of ``ds`` whose view is one of ``views`` (blank view kept), at most ``limit`` (0: all)."""
    return ds.positions(views=views, keep_blank_view=True, limit=limit).tolist()


class ScanSubset(Dataset):
    """Images of a prepared split, resized to the model's size: item = (1, s, s) in [-1, 1]."""

    def __init__(self, ds: PreparedDataset, indices: list[int], size: int):
        self.ds, self.indices, self.size = ds, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = torch.from_numpy(self.ds.image(self.indices[i]))[None, None]
        return to_model_range(image, self.size)[0]


def _open_split(data: Path, split: str, cfg: ScanDataConfig, size: int, limit: int = 0) -> ScanSubset:
    ds = PreparedDataset(data, split)
    idx = select_scans(ds, cfg.views, limit)
    if not idx:
        raise DataError(f"{data} has no {split} scans with views {cfg.views}")
    return ScanSubset(ds, idx, size)


# ============================================================================ autoencoder stage


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
        self._train = _open_split(self.data, "train", cfg.data, size, cfg.data.max_train_images)
        self._val = _open_split(self.data, "validate", cfg.data, size, cfg.data.val_images)

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
        return out["loss"], {k: float(v) for k, v in out.items() if k != "loss"}

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


# ============================================================================== diffusion stage


@dataclass
class EmaConfig:
    decay: float = 0.999
    warmup: bool = True  # decay min(decay, (1 + step) / (10 + step)): early EMA follows the weights


@dataclass
class DiffusionDataConfig(ScanDataConfig):
    cache_text: bool = True  # encode every training report once (False: per batch, for very large sets)
    encode_batch_size: int = 64
    # Scans whose report has a positive finding are seen this many times per epoch (1: uniform). Repeating
    # reports changes p(report), not p(scan | report): conditional samples are unbiased, while rare findings
    # get more of a short CPU schedule.
    abnormal_repeat: int = 1


@dataclass
class DiffusionStageConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    noise: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(select_metric="val_loss"))


@dataclass
class SourceRuns:
    """The runs a diffusion stage builds on (``--from``)."""

    autoencoder: Path
    adamatch: Path
    memory: Path | None


def _default_device() -> str:
    """This process's GPU under torchrun / accelerate (``LOCAL_RANK``), else the first GPU, else CPU."""
    import os

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def resolve_source_runs(from_runs: list[Path] | None, need_memory: bool) -> SourceRuns:
    """Sort ``--from`` runs by their ``stage.json``: autoencoder, adamatch, report (for ``memory/``).

    A report run also holds a copy of its AdaMatch run (``RUN/adamatch/``), used when no AdaMatch run is
    given; a diffusion run can stand in for all three (fine-tuning).
    """
    ae = adamatch = memory = report_run = None
    for stage, run in stages_of(from_runs):
        if stage == "autoencoder":
            ae = run / AUTOENCODER_DIR
        elif stage == "adamatch":
            adamatch = run
        elif stage == "report":
            memory = run / MEMORY_DIR
            report_run = run
        elif stage == "diffusion":
            ae, adamatch = ae or run / AUTOENCODER_DIR, adamatch or run
            memory = memory or (run / MEMORY_DIR if (run / MEMORY_DIR).is_dir() else None)
        else:
            raise RunError(
                f"{run} is a '{stage}' run; diffusion builds on autoencoder, adamatch and report runs"
            )
    if adamatch is None and report_run is not None and (report_run / ADAMATCH_DIR).is_dir():
        adamatch = report_run  # its adamatch/ copy
    if ae is None:
        raise RunError(
            "diffusion needs the autoencoder run: add --from RUN_AE (made by `medvl train autoencoder`)"
        )
    if adamatch is None:
        raise RunError(
            "diffusion needs the AdaMatch run (its text encoder and keypatch bank): add --from RUN_ADAMATCH"
        )
    if need_memory and (memory is None or not memory.is_dir()):
        raise RunError(
            "condition.use_memory is true but no report run with memory/ was given: add --from "
            "RUN_REPORT, or --set condition.use_memory=false"
        )
    return SourceRuns(autoencoder=ae, adamatch=adamatch, memory=memory if need_memory else None)


class _CachedSet(Dataset):
    """Item i: latent posterior (mu, sigma) and either cached report features or the report text."""

    def __init__(
        self, mu: torch.Tensor, sigma: torch.Tensor, features: ReportFeatures | None, texts: list[str]
    ):
        self.mu, self.sigma, self.features, self.texts = mu, sigma, features, texts

    def __len__(self) -> int:
        return self.mu.shape[0]

    def repeat(self, positions: list[int]) -> _CachedSet:
        """The items at ``positions`` (repeats allowed), sharing nothing mutable with this set."""
        pos = torch.tensor(positions, dtype=torch.long)
        feats = self.features.select(pos) if self.features is not None else None
        return _CachedSet(self.mu[pos], self.sigma[pos], feats, [self.texts[p] for p in positions])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"latent_mu": self.mu[i].float(), "latent_sigma": self.sigma[i].float()}
        if self.features is not None:
            item.update(
                {
                    k: (v[i].float() if v.is_floating_point() else v[i])
                    for k, v in self.features.as_kwargs().items()
                }
            )
        else:
            item["report"] = self.texts[i]
        return item


def estimate_layout_prior(data: Path, views: list[str]) -> dict[str, list[float]]:
    """``condition.layout_prior`` from the training split's region boxes (``regions.csv``: IU-Phantom, or any
    prepared dataset with boxes); {} without them (the built-in prior is used). Stored in the run's config, so
    sampling draws the same maps."""
    ds = PreparedDataset(data, "train")
    regions = ds.regions()
    if regions is None:
        logger.info("condition.layout zones: %s has no region boxes; using the built-in layout prior", data)
        return {}
    ids = [str(ds.index.at[j, "dicom_id"]) for j in select_scans(ds, views, 0)]
    prior = layout_prior_from_regions(regions, ids)
    logger.info(
        "condition.layout zones: prior of %d finding/side/zone boxes from %d training scans' regions",
        len(prior),
        len(ids),
    )
    return prior


class DiffusionStage:
    """The :class:`medvl.train.loop.Stage` of ``medvl train diffusion``."""

    name = "diffusion"

    def __init__(
        self,
        cfg: DiffusionStageConfig,
        data: Path,
        sources: SourceRuns,
        device: str | torch.device | None = None,
    ):
        self.config = cfg
        self.train = cfg.train
        self.data = Path(data)
        self.sources = sources
        self.device = torch.device(device or _default_device())
        self.autoencoder = AutoencoderBundle.from_pretrained(sources.autoencoder, device=self.device)
        self.adamatch = AdaMatchRun.from_pretrained(sources.adamatch, device=self.device)
        if cfg.condition.layout == "zones" and not cfg.condition.layout_prior:
            cfg.condition.layout_prior = estimate_layout_prior(self.data, cfg.data.views)
        self.encoder = ReportEncoder(self.adamatch, cfg.condition, device=self.device)
        self.memory = None
        if sources.memory is not None:
            self.memory = SharedMemory.from_pretrained(sources.memory)
        self._cache: dict[str, _CachedSet] = {}
        self._keypatch_dim: int | None = None

    # -- caches ---------------------------------------------------------------------------------
    def cached(self, split: str) -> _CachedSet:
        """Latent posteriors (and report features) of a split, computed once."""
        if split not in self._cache:
            dcfg = self.config.data
            limit = dcfg.max_train_images if split == "train" else dcfg.val_images
            ds = PreparedDataset(self.data, split)
            idx = select_scans(ds, dcfg.views, limit)
            if not idx:
                raise DataError(f"{self.data} has no {split} scans with views {dcfg.views}")
            mus, sigmas = [], []
            bs = dcfg.encode_batch_size
            for i in tqdm(range(0, len(idx), bs), desc=f"encode {split} latents", unit="batch", leave=False):
                images = torch.stack([torch.from_numpy(ds.image(j)) for j in idx[i : i + bs]])[:, None]
                mu, sigma = self.autoencoder.encode(images)
                mus.append(mu.half().cpu())
                sigmas.append(sigma.half().cpu())
            texts = [ds.index.at[j, "report"] for j in idx]
            features = None
            if dcfg.cache_text or split != "train":
                features = self.encode_reports(texts)
            cached = _CachedSet(torch.cat(mus), torch.cat(sigmas), features, texts)
            if split == "train" and dcfg.abnormal_repeat > 1:
                labels = np.nan_to_num(ds.labels.numpy()[idx][:, 1:]) == 1  # any finding but No Finding
                pos = [
                    p for p, a in enumerate(labels.any(1)) for _ in range(dcfg.abnormal_repeat if a else 1)
                ]
                logger.info(
                    "training set: %d scans, %d with findings seen %d times -> %d items per epoch",
                    len(idx),
                    int(labels.any(1).sum()),
                    dcfg.abnormal_repeat,
                    len(pos),
                )
                cached = cached.repeat(pos)
            self._cache[split] = cached
        return self._cache[split]

    def encode_reports(self, texts: list[str]) -> ReportFeatures:
        feats = self.encoder.encode(texts, batch_size=self.config.data.encode_batch_size)
        self._keypatch_dim = (
            feats.keypatches.shape[-1] if feats.keypatches.shape[1] else self.encoder.word_dim
        )
        return ReportFeatures(
            feats.words.half(),
            feats.word_mask,
            feats.word_kind,
            feats.keypatches.half(),
            feats.keypatch_boxes,
            feats.keypatch_mask,
            feats.sides,
        )

    @property
    def keypatch_dim(self) -> int:
        if self._keypatch_dim is None:
            self.encode_reports(["no acute cardiopulmonary process."])
        return int(self._keypatch_dim)

    # -- Stage protocol -------------------------------------------------------------------------
    def build_model(self) -> LatentDiffusion:
        cfg = self.config
        memory = None
        if cfg.condition.use_memory:
            memory = SharedMemory(self.memory.cfg)
            memory.load_state_dict(self.memory.state_dict())
        conditioner = ReportConditioner(
            cfg.condition,
            self.encoder.word_dim,
            self.keypatch_dim,
            cfg.unet.cross_attention_dim,
            memory=memory,
        )
        denoiser = Denoiser(cfg.unet, self.autoencoder.cfg.latent_channels, conditioner)
        return LatentDiffusion(denoiser, cfg.noise, self.autoencoder.latent.scale_factor)

    def train_dataset(self) -> Dataset:
        return self.cached("train")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in items[0]:
            values = [it[key] for it in items]
            batch[key] = values if isinstance(values[0], str) else torch.stack(values)
        return batch

    def _features_kwargs(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        if "report" in batch:  # cache_text: false
            return self.encode_reports(list(batch["report"])).to(device, torch.float32).as_kwargs()
        return {
            k: batch[k]
            for k in (
                "words",
                "word_mask",
                "word_kind",
                "keypatches",
                "keypatch_boxes",
                "keypatch_mask",
                "sides",
            )
        }

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        device = batch["latent_mu"].device
        out = model(
            latent_mu=batch["latent_mu"],
            latent_sigma=batch["latent_sigma"],
            **self._features_kwargs(batch, device),
        )
        return out["loss"], {"loss_cond": float(out["loss_cond"]), "dropped": float(out["dropped"])}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Only the trained denoiser (never the EMA copy); no weight decay on norms, biases, embeddings."""
        decay, no_decay = [], []
        for name, p in unwrap(model).denoiser.named_parameters():
            if not p.requires_grad:
                continue
            embedding = name.split(".")[-1] in ("position", "kind", "pad", "null")
            (no_decay if p.ndim < 2 or embedding else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def on_step_end(self, model: nn.Module, step: int) -> None:
        decay = self.config.ema.decay
        if self.config.ema.warmup:
            decay = min(decay, (1 + step) / (10 + step))
        unwrap(model).update_ema(decay)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """v-prediction MSE of the EMA weights on validation scans at fixed noise and timesteps, with the
        report (``val_loss``) and with the null context (``val_loss_uncond``): their gap shows how much the
        model uses the report."""
        net = unwrap(model)
        device = net.scale_factor.device
        val = self.cached("validate")
        g = torch.Generator().manual_seed(1234)
        total = {"cond": 0.0, "uncond": 0.0}
        n = len(val)
        T = self.config.noise.num_train_timesteps
        for i in range(0, n, 64):
            sl = slice(i, min(i + 64, n))
            b = sl.stop - sl.start
            mu = val.mu[sl].float().to(device)
            noise = torch.randn(mu.shape, generator=g).to(device)
            t = torch.randint(0, T, (b,), generator=g).to(device)
            feats = val.features.select(sl).to(device, torch.float32).as_kwargs()
            for kind, drop in (("cond", False), ("uncond", True)):
                out = net(
                    latent_mu=mu,
                    latent_sigma=None,
                    **feats,
                    noise=noise,
                    timesteps=t,
                    drop=torch.full((b,), drop, device=device),
                    use_ema=True,
                )
                total[kind] += float(out["loss"]) * b
        return {
            "val_loss": total["cond"] / n,
            "val_loss_uncond": total["uncond"] / n,
            "val_condition_gain": (total["uncond"] - total["cond"]) / n,
        }

    def save_run(self, model: nn.Module, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        ema = unwrap(model).ema
        DiffusionBundle(ema, self.config.noise, self.config.sampler).save_pretrained(
            run_dir / DiffusionBundle.DIRNAME
        )
        copy_component(self.sources.autoencoder, run_dir / AUTOENCODER_DIR)
        copy_component(self.sources.adamatch, run_dir / ADAMATCH_DIR)
        if ema.conditioner.memory is not None:
            ema.conditioner.memory.save_pretrained(run_dir / MEMORY_DIR)


def build_diffusion_stage(
    *, config_path: str | Path, overrides: list[str] | None, data: str | Path, from_runs: list[Path] | None
) -> DiffusionStage:
    """``medvl train diffusion --from RUN_ADAMATCH RUN_REPORT RUN_AE``."""
    cfg = load_config(DiffusionStageConfig, resolve_config_path("diffusion", config_path), overrides)
    sources = resolve_source_runs(from_runs, need_memory=cfg.condition.use_memory)
    return DiffusionStage(cfg, Path(data), sources)

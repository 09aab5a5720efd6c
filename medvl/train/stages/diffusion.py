"""Training stage of the diffusion head: ``medvl train diffusion`` (its autoencoder:
:mod:`medvl.train.stages.autoencoder`).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from medvl.config import load_config, resolve_config_path
from medvl.data.prepared import PreparedDataset
from medvl.errors import ConfigError, DataError, RunError
from medvl.models.adamatch import AdaMatchRun
from medvl.models.diffusion import (
    AutoencoderBundle,
    ConditionConfig,
    Denoiser,
    DiffusionBundle,
    LatentDiffusion,
    NoiseScheduleConfig,
    ReportConditioner,
    ReportEncoder,
    ReportFeatures,
    SamplerConfig,
    UNetConfig,
    layout_prior_from_regions,
)
from medvl.models.memory import SharedMemory
from medvl.models.pretrained import copy_component
from medvl.runs import stages_of
from medvl.train.distributed import stage_device, unwrap
from medvl.train.loop import TrainConfig
from medvl.train.stages.scans import ScanDataConfig, select_scans

logger = logging.getLogger(__name__)

AUTOENCODER_DIR = AutoencoderBundle.DIRNAME
ADAMATCH_DIR = AdaMatchRun.DIRNAME
MEMORY_DIR = SharedMemory.DIRNAME


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

    def validate(self) -> None:
        if self.condition.layout == "none" and self.unet.side_maps:
            raise ConfigError(
                "condition.layout 'none' (the report text alone, no layout hint) needs unet.side_maps false; "
                "set both, e.g. --set unet.side_maps=false --set condition.layout=none"
            )


@dataclass
class SourceRuns:
    """The runs a diffusion stage builds on (``--from``)."""

    autoencoder: Path
    adamatch: Path
    memory: Path | None


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
    # The EMA copy is updated from the full weights every step; FSDP would hand it shards (see check_sharding).
    shardable = False

    @property
    def unused_parameters(self) -> bool:
        """A frozen shared memory is queried without gradients, so its query projection gets none: DDP must be
        told (``find_unused_parameters``) or it stops at the first step."""
        cond = self.config.condition
        return cond.use_memory and not cond.memory_trainable

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
        self.device = torch.device(device) if device else stage_device()
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

    def encode_reports(self, texts: list[str], on_device: bool = False) -> ReportFeatures:
        """Report features as the cache holds them (words and keypatches rounded to float16): on the CPU, or with
        ``on_device`` left on the stage's device (``cache_text: false``, per training batch)."""
        feats = self.encoder.encode(texts, batch_size=self.config.data.encode_batch_size, on_device=on_device)
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
            # encoded where the step runs, with the cache's rounding: the host does not wait for the device
            feats = self.encode_reports(list(batch["report"]), on_device=True)
            return feats.to(device, torch.float32).as_kwargs()
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

    def training_step(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = batch["latent_mu"].device
        out = model(
            latent_mu=batch["latent_mu"],
            latent_sigma=batch["latent_sigma"],
            **self._features_kwargs(batch, device),
        )
        return out["loss"], {"loss_cond": out["loss_cond"].detach(), "dropped": out["dropped"].detach()}

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

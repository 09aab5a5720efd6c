"""The report-to-X-ray diffusion head: MONAI latent diffusion guided by report words, memory and keypatches.

Only glue lives here; the networks, noise schedules and DDIM / PLMS samplers are MONAI's:

* :func:`build_autoencoder` - ``monai.networks.nets.AutoencoderKL`` (image (B, 1, S, S) in [-1, 1] <-> latent
  (B, C, S/f, S/f)); the latent scale factor is computed from training data by the autoencoder stage.
* :class:`ReportEncoder` - the frozen AdaMatch text side: report -> :class:`ReportFeatures` (word features
  (B, T, D), their mask, the report's top keypatches (B, K, D) with boxes).
* :class:`ReportConditioner` - features -> the cross-attention context (B, L, C): projected word features, the
  shared memory's responses to them, keypatch features plus box embeddings; a learned null context replaces it
  for condition dropout and for the unconditional half of classifier-free guidance.
* :class:`Denoiser` - ``monai.networks.nets.DiffusionModelUNet`` (``with_conditioning=True``) + the conditioner.
* :class:`LatentDiffusion` - the training module: v-prediction loss through ``forward`` (DDP-safe), condition
  dropout, an EMA copy of the denoiser.
* :func:`build_sampler` / :func:`sample_latents` - DDIM and PLMS (MONAI) or DPM-Solver++(2M) (here, on MONAI's
  noise schedules), classifier-free guidance with the conditional and unconditional halves in one batched
  forward, ``clip_sample=False``, bf16 autocast where the device supports it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, Scheduler
from torch import nn

from medvl.errors import ConfigError, RunError

#: Scans are stored in torchxrayvision's convention; the networks see [-1, 1].
XRAY_RANGE = 1024.0


class SamplerName(str, Enum):
    """Samplers for the trained (v-prediction) model. ``ddim`` and ``plms`` are MONAI's schedulers."""

    DDIM = "ddim"
    PLMS = "plms"  # MONAI PNDMScheduler with skip_prk_steps (pseudo linear multistep)
    DPM_SOLVER_2M = "dpm_solver_2m"  # DPM-Solver++(2M), Lu et al. 2022, on MONAI's noise schedules


class Precision(str, Enum):
    AUTO = "auto"  # bf16 autocast on a CUDA device that supports it, fp32 elsewhere
    FP32 = "fp32"
    BF16 = "bf16"


# --------------------------------------------------------------------------------------------- configs


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
            raise ConfigError(f"every model.channels entry must be divisible by norm_num_groups ({self.norm_num_groups})")
        if self.image_size % self.downsampling:
            raise ConfigError(f"model.image_size {self.image_size} must be divisible by {self.downsampling}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.downsampling
        return (self.latent_channels, s, s)


@dataclass
class UNetConfig:
    """``monai.networks.nets.DiffusionModelUNet`` sizes (cross-attention always on)."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    num_res_blocks: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    num_head_channels: int | list[int] = 32  # per level (MONAI); a list like [0, 512, 768] = one head per level
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
            raise ConfigError(f"every unet.channels entry must be divisible by norm_num_groups ({self.norm_num_groups})")


@dataclass
class ConditionConfig:
    """What the UNet cross-attends to (DESIGN.md section 6)."""

    max_tokens: int = 64  # report tokens (AdaMatch tokenizer pieces) kept; longer reports are cut
    keypatches: int = 8  # top keypatches of the report (0: none)
    use_memory: bool = True  # add the shared memory's response to every word as its own token
    memory_trainable: bool = False  # the memory comes from the report run and stays frozen by default
    token_mask: Literal["attention", "word"] = "attention"  # which AdaMatch mask marks a real token
    dropout: float = 0.1  # probability that a training sample sees the learned null context
    # The layout hint behind ``unet.side_maps``: "halves" lights the image half of each side the report states a
    # positive finding on (:func:`report_sides`); "zones" draws a soft box per stated (finding, side, zone) where
    # such findings sit (:func:`report_layout`), from ``layout_prior``: "finding/side/zone" -> [cx, cy, w, h]
    # (normalised image coordinates; zone "any" where the report gives none). An empty prior is estimated from
    # the training split's region boxes when the dataset has them (IU-Phantom), else DEFAULT_LAYOUT_PRIOR.
    layout: Literal["halves", "zones"] = "halves"
    layout_prior: dict[str, list[float]] = field(default_factory=dict)
    layout_grid: int = 16  # the maps are drawn at this size and resized to the latent grid

    def validate(self) -> None:
        if self.layout_grid < 2:
            raise ConfigError("condition.layout_grid must be at least 2")
        if self.max_tokens < 1:
            raise ConfigError("condition.max_tokens must be at least 1")
        if self.keypatches < 0:
            raise ConfigError("condition.keypatches must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("condition.dropout must be in [0, 1)")


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


# ------------------------------------------------------------------------------------------ autoencoder


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """MONAI's KL autoencoder: (B, 1, S, S) in [-1, 1] -> z_mu, z_sigma (B, C, S/f, S/f) -> (B, 1, S, S)."""
    cfg.validate()
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        num_res_blocks=cfg.num_res_blocks,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.with_nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.with_nonlocal_attn,
    )


def to_model_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S) in [-1024, 1024] -> (B, 1, size, size) in [-1, 1] (area downsampling, no flips)."""
    x = images.float() / XRAY_RANGE
    if x.shape[-1] != size or x.shape[-2] != size:
        mode = "area" if x.shape[-1] > size else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
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

    WEIGHTS = "autoencoder.safetensors"
    CONFIG = "autoencoder.yaml"
    LATENT = "latent.json"

    def __init__(self, model: AutoencoderKL, cfg: AutoencoderConfig, latent: LatentInfo):
        self.model, self.cfg, self.latent = model, cfg, latent

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        from medvl.config import save_config

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(directory / self.WEIGHTS))
        save_config(self.cfg, directory / self.CONFIG)
        (directory / self.LATENT).write_text(json.dumps(asdict(self.latent), indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> AutoencoderBundle:
        from safetensors.torch import load_file

        from medvl.config import load_config

        directory = Path(directory)
        for name in (cls.WEIGHTS, cls.CONFIG, cls.LATENT):
            if not (directory / name).exists():
                raise RunError(f"{directory} is not a trained autoencoder (missing {name}); "
                               "train one with `medvl train autoencoder`")
        cfg = load_config(AutoencoderConfig, directory / cls.CONFIG)
        model = build_autoencoder(cfg)
        model.load_state_dict(load_file(str(directory / cls.WEIGHTS), device="cpu"))
        latent = LatentInfo(**json.loads((directory / cls.LATENT).read_text()))
        return cls(model.to(device).eval(), cfg, latent)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, S, S) in [-1024, 1024] -> unscaled (z_mu, z_sigma), each (B, C, h, w)."""
        device = next(self.model.parameters()).device
        return self.model.encode(to_model_range(images.to(device), self.cfg.image_size))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) (what the UNet sees) -> images (B, 1, S, S) in [-1024, 1024]."""
        return from_model_range(self.model.decode(latents / self.latent.scale_factor))


# ------------------------------------------------------------------------------------- conditioning


@dataclass
class ReportFeatures:
    """The frozen text side of one batch of reports.

    words (B, T, Dw) float; word_mask (B, T) bool (True: a real token); word_kind (B, T) int8: 0 other token
    (special, stop word, punctuation, padding), 1 negated content word, 2 affirmed content word (the AdaMatch
    tokenizer's ``word_mask`` / ``match_mask``, from its negation scopes); keypatches (B, K, Dk) float;
    keypatch_boxes (B, K, 4) x0, y0, x1, y1 normalised; keypatch_mask (B, K) bool. K may be 0.
    sides (B, 2) float: a positive finding stated on the patient's right / left (:func:`report_sides`), or with
    ``condition.layout: zones`` (B, 2, g, g) maps of where (:func:`report_layout`).
    """

    words: torch.Tensor
    word_mask: torch.Tensor
    word_kind: torch.Tensor
    keypatches: torch.Tensor
    keypatch_boxes: torch.Tensor
    keypatch_mask: torch.Tensor
    sides: torch.Tensor

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ReportFeatures:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype=dtype) if (dtype is not None and t.is_floating_point()) else t.to(device)

        return ReportFeatures(*(move(getattr(self, f.name)) for f in fields(self)))

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> ReportFeatures:
        return ReportFeatures(*(getattr(self, f.name)[index] for f in fields(self)))

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def cat(parts: Sequence[ReportFeatures]) -> ReportFeatures:
        return ReportFeatures(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ReportFeatures)))

    def __len__(self) -> int:
        return self.words.shape[0]


def report_sides(texts: Sequence[str]) -> torch.Tensor:
    """(B, 2) float {0, 1}: does the report state a positive finding on the patient's right / left?

    Read with medvl's labeler (:func:`medvl.text.labeler.extract_mentions`): positive mentions only (negated
    and uncertain ones are left out), "bilateral" counts on both sides; sideless findings (cardiomegaly) on
    neither. On IU-Phantom this is also how the drawing program reads the report, so this hint is close to the
    truth there; on real reports it is as good as the labeler.
    """
    from medvl.text.labeler import extract_mentions

    out = torch.zeros(len(texts), 2)
    for i, text in enumerate(texts):
        for m in extract_mentions(text):
            if m.value != 1.0 or m.side is None:
                continue
            side = str(getattr(m.side, "value", m.side))
            if side in ("right", "bilateral"):
                out[i, 0] = 1.0
            if side in ("left", "bilateral"):
                out[i, 1] = 1.0
    return out


#: Where one-sided findings sit on a PA film by zone, patient right (image left); the patient's left mirrors x.
#: [cx, cy, w, h] in normalised image coordinates, rough adult PA framing (lungs from about 10% to 75% of the
#: height). Used when the training data has no region boxes to estimate a prior from.
_RIGHT_ZONES = {"apex": [0.30, 0.15, 0.16, 0.12], "upper": [0.31, 0.27, 0.20, 0.15], "mid": [0.30, 0.42, 0.20, 0.15],
                "lower": [0.30, 0.56, 0.22, 0.15], "base": [0.27, 0.67, 0.26, 0.12],
                "perihilar": [0.40, 0.42, 0.14, 0.25], "any": [0.30, 0.45, 0.28, 0.50]}
DEFAULT_LAYOUT_PRIOR: dict[str, list[float]] = {
    **{f"*/right/{z}": v for z, v in _RIGHT_ZONES.items()},
    **{f"*/left/{z}": [1 - v[0], *v[1:]] for z, v in _RIGHT_ZONES.items()},
    "*/left/retrocardiac": [0.58, 0.58, 0.14, 0.16],
    "effusion/right/any": _RIGHT_ZONES["base"], "effusion/left/any": [1 - _RIGHT_ZONES["base"][0], 0.67, 0.26, 0.12],
}


def layout_prior_from_regions(regions, dicom_ids: Sequence[str], min_count: int = 5) -> dict[str, list[float]]:
    """Mean box [cx, cy, w, h] per "finding/side/zone", "finding/side/any", "*/side/zone" and "*/side/any" over
    the one-sided region boxes of ``dicom_ids`` (a ``regions.csv`` frame); keys with fewer than ``min_count``
    boxes are left out (:func:`report_layout` falls back to coarser keys, then to DEFAULT_LAYOUT_PRIOR)."""
    import pandas as pd

    r = regions[regions["dicom_id"].astype(str).isin(set(map(str, dicom_ids)))]
    r = r[r["side"].astype(str).str.lower().isin(["left", "right"])]
    if not len(r):
        return {}
    r = pd.DataFrame({"finding": r["finding"].astype(str), "side": r["side"].astype(str).str.lower(),
                      "zone": r["zone"].astype(str).replace({"": "any", "nan": "any"}),
                      "cx": (r["x0"] + r["x1"]) / 2, "cy": (r["y0"] + r["y1"]) / 2,
                      "w": r["x1"] - r["x0"], "h": r["y1"] - r["y0"]})
    out: dict[str, list[float]] = {}
    for finding_key, zone_key in (("finding", "zone"), ("finding", None), (None, "zone"), (None, None)):
        keys = [k for k in (finding_key, "side", zone_key) if k]
        for key, g in r.groupby(keys):
            if len(g) < min_count:
                continue
            key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
            name = f"{key.get('finding', '*')}/{key['side']}/{key.get('zone', 'any')}"
            out.setdefault(name, [round(float(g[c].mean()), 4) for c in ("cx", "cy", "w", "h")])
    return out


def report_layout(texts: Sequence[str], prior: dict[str, list[float]] | None = None, grid: int = 16) -> torch.Tensor:
    """(B, 2, grid, grid) float in [0, 1]: where the report puts its one-sided positive findings, channel 0 for
    the patient's right, 1 for the left (the order of :func:`report_sides`).

    Each finding whose side the report states (:func:`medvl.text.layout.stated_layout`: medvl's labeler, sides
    and zones as written, "bilateral" on both sides, retrocardiac on the left) draws a Gaussian bump with the
    prior's box for its finding, side and zone (falling back to the zone "any", then to any finding), standard
    deviations half the box's width and height; bumps on one side combine by maximum. Sideless findings draw
    nothing: the report does not say where they are.
    """
    from medvl.text.labeler import extract_mentions
    from medvl.text.layout import stated_layout

    table = {**DEFAULT_LAYOUT_PRIOR, **(prior or {})}
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    out = torch.zeros(len(texts), 2, grid, grid)
    for i, text in enumerate(texts):
        for finding, side, zone in stated_layout(extract_mentions(text)):
            z = zone or "any"
            box = next(table[k] for k in (f"{finding}/{side}/{z}", f"{finding}/{side}/any", f"*/{side}/{z}",
                                          f"*/{side}/any") if k in table)
            cx, cy, w, h = box
            gx = torch.exp(-0.5 * ((centres - cx) / max(w / 2, 0.5 / grid)) ** 2)
            gy = torch.exp(-0.5 * ((centres - cy) / max(h / 2, 0.5 / grid)) ** 2)
            c = 0 if side == "right" else 1
            out[i, c] = torch.maximum(out[i, c], gy[:, None] * gx[None, :])
    return out


class ReportEncoder:
    """Reports -> :class:`ReportFeatures` with a frozen AdaMatch run (``medvl.models.adamatch.AdaMatchRun``).

    Uses ``run.tokenize``, ``run.model.encode_text`` and ``run.report_keypatches`` only (the shared AdaMatch
    run API), so any object with those members works (tests use a small stand-in).
    """

    def __init__(self, run: Any, cfg: ConditionConfig, device: str | torch.device = "cpu"):
        self.run, self.cfg, self.device = run, cfg, torch.device(device)

    @property
    def word_dim(self) -> int:
        return int(self.run.embed_dim)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> ReportFeatures:
        """Texts (B,) -> features on CPU, float32, padded / cut to ``max_tokens`` tokens."""
        parts = [self._encode_batch(list(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return ReportFeatures.cat(parts)

    def _encode_batch(self, texts: list[str]) -> ReportFeatures:
        model = self.run.model
        tokens = {k: v.to(self.device) for k, v in self.run.tokenize(texts).items()}
        attention = tokens["attention_mask"]
        out = model.encode_text(**tokens)  # input_ids, attention_mask (+ word_ids, masks: word pooling)
        words = out.features.float()
        mask = (attention.bool() if self.cfg.token_mask == "attention" else out.word_mask.bool()).to(words.device)
        # The tokenizer's own masks (before AdaMatch's fallbacks, which call every word affirmed in a report
        # without any affirmed word); a run without them treats every real token as an affirmed word.
        content = tokens.get("word_mask", getattr(out, "word_mask", attention)).bool()
        affirmed = tokens.get("match_mask", getattr(out, "match_mask", content)).bool() & content
        kind = (content.to(torch.int8) + affirmed.to(torch.int8)) * mask
        b, t, d = words.shape
        T = self.cfg.max_tokens
        if t >= T:
            words, mask, kind = words[:, :T], mask[:, :T], kind[:, :T]
        else:
            words = torch.cat([words, words.new_zeros(b, T - t, d)], 1)
            mask = torch.cat([mask, mask.new_zeros(b, T - t)], 1)
            kind = torch.cat([kind, kind.new_zeros(b, T - t)], 1)
        words = words * mask.unsqueeze(-1)
        K = self.cfg.keypatches
        if K > 0:
            kp = self.run.report_keypatches(texts, K)
            feats, boxes = kp.features.float(), kp.boxes.float()
            kmask = torch.isfinite(kp.scores) if getattr(kp, "scores", None) is not None else \
                torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            k = feats.shape[1]
            if k < K:  # a small bank can return fewer
                feats = torch.cat([feats, feats.new_zeros(b, K - k, feats.shape[-1])], 1)
                boxes = torch.cat([boxes, boxes.new_zeros(b, K - k, 4)], 1)
                kmask = torch.cat([kmask, kmask.new_zeros(b, K - k)], 1)
            feats, boxes, kmask = feats[:, :K], boxes[:, :K], kmask[:, :K].bool()
        else:
            feats, boxes = words.new_zeros(b, 0, d), words.new_zeros(b, 0, 4)
            kmask = torch.zeros(b, 0, dtype=torch.bool)
        hint = (report_layout(texts, self.cfg.layout_prior, self.cfg.layout_grid) if self.cfg.layout == "zones"
                else report_sides(texts))
        return ReportFeatures(words.cpu(), mask.cpu(), kind.cpu(), feats.cpu(), boxes.cpu(), kmask.cpu(), hint)


class ReportConditioner(nn.Module):
    """:class:`ReportFeatures` -> cross-attention context (B, L, C), L = 1 + max_tokens * (1 + use_memory) + keypatches.

    Token blocks: [summary | words | memory responses to the words | keypatches]. Words carry an embedding of
    their kind (other / negated / affirmed content word), so "no effusion" and "left effusion" differ even
    when the frozen text encoder barely separates them. The summary token is the mean of the projected
    *affirmed* words (a learned "nothing affirmed" vector for a normal report): the report's positive findings
    in one vector, which the denoiser also adds to its timestep embedding. Each source is layer-normed and
    projected to C; words and their memory responses share a learned position embedding; keypatches add an
    embedding of their box (where in a training scan that patch came from); a learned type embedding marks the
    block. MONAI's cross-attention has no key mask, so padded slots hold a learned ``pad`` vector. ``drop``
    (B,) bool swaps a sample's whole context for the learned null context (condition dropout / the
    unconditional half of guidance).
    """

    def __init__(self, cfg: ConditionConfig, word_dim: int, keypatch_dim: int, context_dim: int,
                 memory: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, T = context_dim, cfg.max_tokens
        self.word_norm = nn.LayerNorm(word_dim)
        self.word_proj = nn.Linear(word_dim, C)
        self.memory = memory if cfg.use_memory else None
        if cfg.use_memory:
            if memory is None:
                raise ConfigError("condition.use_memory is true but no shared memory was given (a report run)")
            mem_dim = int(memory.cfg.dim)
            # The memory space is the report head's (it queries through its own learned maps), not AdaMatch's:
            # the diffusion head learns its own query map into it; the memory matrix itself stays frozen.
            self.memory_query = nn.Linear(word_dim, mem_dim)
            self.memory_norm = nn.LayerNorm(mem_dim)
            self.memory_proj = nn.Linear(mem_dim, C)
            if not cfg.memory_trainable:
                memory.requires_grad_(False)
        if cfg.keypatches > 0:
            self.keypatch_norm = nn.LayerNorm(keypatch_dim)
            self.keypatch_proj = nn.Linear(keypatch_dim, C)
            self.box_proj = nn.Linear(4, C)
        self.position = nn.Parameter(torch.randn(T, C) * 0.02)
        self.kind = nn.Parameter(torch.randn(4, C) * 0.02)  # words, memory, keypatches, summary
        self.word_kind = nn.Parameter(torch.randn(3, C) * 0.02)  # other token, negated word, affirmed word
        self.nothing_affirmed = nn.Parameter(torch.randn(C) * 0.02)
        self.pad = nn.Parameter(torch.randn(C) * 0.02)
        self.null = nn.Parameter(torch.randn(self.context_length, C) * 0.02)
        self.out_norm = nn.LayerNorm(C)

    @property
    def context_length(self) -> int:
        return 1 + self.cfg.max_tokens * (2 if self.cfg.use_memory else 1) + self.cfg.keypatches

    @property
    def context_dim(self) -> int:
        return self.pad.shape[0]

    def train(self, mode: bool = True) -> ReportConditioner:
        super().train(mode)
        if self.memory is not None and not self.cfg.memory_trainable:
            self.memory.eval()  # frozen: no dropout either
        return self

    def null_context(self, batch: int) -> torch.Tensor:
        """(B, L, C) learned unconditional context."""
        return self.null.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor, word_kind: torch.Tensor,
                keypatches: torch.Tensor, keypatch_boxes: torch.Tensor, keypatch_mask: torch.Tensor,
                sides: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The context (B, L, C); ``sides`` is not part of it (the denoiser takes it as image maps)."""
        b = words.shape[0]
        mask = word_mask.bool().unsqueeze(-1)
        kinds = self.word_kind[word_kind.long().clamp(0, 2)]  # (B, T, C)
        projected = self.word_proj(self.word_norm(words))
        affirmed = (word_kind == 2).unsqueeze(-1) & mask
        count = affirmed.sum(1)  # (B, 1)
        summary = (projected * affirmed).sum(1) / count.clamp(min=1)
        summary = torch.where(count > 0, summary, self.nothing_affirmed.to(summary.dtype)).unsqueeze(1)
        blocks = [summary + self.kind[3],
                  torch.where(mask, projected + kinds + self.position + self.kind[0], self.pad)]
        if self.memory is not None:
            grad = torch.enable_grad() if self.cfg.memory_trainable else torch.no_grad()
            with grad:
                response = self.memory.respond(self.memory_query(words))
            mem = self.memory_proj(self.memory_norm(response)) + kinds + self.position + self.kind[1]
            blocks.append(torch.where(mask, mem, self.pad))
        if self.cfg.keypatches > 0:
            kp = self.keypatch_proj(self.keypatch_norm(keypatches)) + self.box_proj(keypatch_boxes * 2 - 1) + self.kind[2]
            blocks.append(torch.where(keypatch_mask.bool().unsqueeze(-1), kp, self.pad))
        context = self.out_norm(torch.cat(blocks, 1))
        if drop is not None:
            context = torch.where(drop.view(b, 1, 1), self.null_context(b).to(context.dtype), context)
        return context


class Denoiser(nn.Module):
    """The conditioned UNet: ``forward(x (B, C, h, w), t (B,), context (B, L, Cc)) -> v (B, C, h, w)``."""

    def __init__(self, unet_cfg: UNetConfig, latent_channels: int, conditioner: ReportConditioner):
        super().__init__()
        unet_cfg.validate()
        self.unet_cfg = unet_cfg
        self.latent_channels = latent_channels
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=latent_channels + 2 * int(unet_cfg.coordinate_channels) + 2 * int(unet_cfg.side_maps),
            out_channels=latent_channels,
            num_res_blocks=unet_cfg.num_res_blocks,
            channels=tuple(unet_cfg.channels),
            attention_levels=tuple(unet_cfg.attention_levels),
            norm_num_groups=unet_cfg.norm_num_groups,
            num_head_channels=(unet_cfg.num_head_channels if isinstance(unet_cfg.num_head_channels, int)
                               else tuple(unet_cfg.num_head_channels)),
            with_conditioning=True,
            transformer_num_layers=unet_cfg.transformer_num_layers,
            cross_attention_dim=conditioner.context_dim,
            use_flash_attention=unet_cfg.use_flash_attention,
        )
        self.conditioner = conditioner
        if unet_cfg.global_condition:
            # MONAI adds ``class_embedding(class_labels)`` to the timestep embedding; a continuous map from the
            # summary token takes the place of its lookup table. Zero-initialised: training starts as without it.
            time_dim = self.unet.time_embed[-1].out_features
            pooled = nn.Sequential(nn.Linear(conditioner.context_dim, time_dim), nn.SiLU(),
                                   nn.Linear(time_dim, time_dim))
            nn.init.zeros_(pooled[-1].weight)
            nn.init.zeros_(pooled[-1].bias)
            self.unet.class_embedding = pooled
            self.unet.num_class_embeds = 1

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                sides: torch.Tensor | None = None) -> torch.Tensor:
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
                extra.append(F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)
                             if s.shape[-2:] != (h, w) else s)
            else:  # halves
                extra += [s[:, 0].view(b, 1, 1, 1) * (xs < 0), s[:, 1].view(b, 1, 1, 1) * (xs > 0)]
        if extra:
            x = torch.cat([x, *extra], 1)
        return self.unet(x, timesteps, context=context, class_labels=pooled)

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights without the shared memory (saved separately under ``RUN/memory/``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("conditioner.memory.")}


def build_train_scheduler(cfg: NoiseScheduleConfig) -> DDPMScheduler:
    """MONAI DDPM schedule used for training (``clip_sample=False``: latents are not in [-1, 1])."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         prediction_type=cfg.prediction_type, clip_sample=False)


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

    def forward(self, latent_mu: torch.Tensor, latent_sigma: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor, word_kind: torch.Tensor, keypatches: torch.Tensor,
                keypatch_boxes: torch.Tensor, keypatch_mask: torch.Tensor, sides: torch.Tensor | None = None,
                *, noise: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                use_ema: bool = False) -> dict[str, torch.Tensor]:
        net = self.ema if use_ema else self.denoiser
        b = latent_mu.shape[0]
        z = latent_mu.float()
        if latent_sigma is not None and self.training:
            z = z + latent_sigma.float() * torch.randn_like(z)
        z = z * self.scale_factor
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
        context = net.conditioner(words, word_mask, word_kind, keypatches, keypatch_boxes, keypatch_mask,
                                  drop=drop)
        if sides is not None:
            drop_view = drop.view(b, *([1] * (sides.dim() - 1)))
            sides = torch.where(drop_view, torch.zeros_like(sides), sides)  # the null condition: no hint
        pred = net(noisy, timesteps, context, sides)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        if self.noise_cfg.loss_weighting == "min_snr":
            acp = self.scheduler.alphas_cumprod.to(z.device)[timesteps].float()
            snr = acp / (1 - acp)
            gamma = self.noise_cfg.min_snr_gamma
            weight = snr.clamp(max=gamma) / (snr + 1) if self.noise_cfg.prediction_type == "v_prediction" \
                else snr.clamp(max=gamma) / snr
            per_sample = per_sample * weight
        keep = (~drop).float()
        loss_cond = (per_sample * keep).sum() / keep.sum().clamp(min=1.0)
        return {"loss": per_sample.mean(), "loss_cond": loss_cond.detach(), "dropped": drop.float().mean()}

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights (buffers copied)."""
        for e, p in zip(self.ema.parameters(), self.denoiser.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.denoiser.buffers(), strict=True):
            e.copy_(b)


# ------------------------------------------------------------------------------------------ sampling


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling"), deterministic.

    MONAI 1.6.1 ships DDPM, DDIM, PNDM/PLMS and rectified flow but no DPM-Solver; this class adds the
    second-order multistep data-prediction update on MONAI's ``Scheduler`` base (same noise schedules,
    same ``set_timesteps`` / ``step(model_output, timestep, sample) -> (prev_sample, x0)`` interface).
    Timesteps: ``linspace(T - 1, 0, N)`` rounded; the last step jumps to the clean sample (sigma = 0);
    the first step and the last are first order (the stable choice at few steps).
    """

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear_beta",
                 prediction_type: str = "v_prediction", **schedule_args) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type must be v_prediction or epsilon, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.clip_sample = False
        self.set_timesteps(20)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in 1..{self.num_train_timesteps}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        ts = np.linspace(self.num_train_timesteps - 1, 0, num_inference_steps).round().astype(np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)
        self._index = 0
        self._prev_x0: torch.Tensor | None = None
        self._prev_h: float | None = None

    def _alpha_sigma(self, t: int) -> tuple[float, float]:
        if t < 0:
            return 1.0, 0.0
        acp = float(self.alphas_cumprod[t])
        return math.sqrt(acp), math.sqrt(1.0 - acp)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index
        t = int(timestep)
        s = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t, s_t = self._alpha_sigma(t)
        if self.prediction_type == "v_prediction":
            x0 = a_t * sample - s_t * model_output
        else:
            x0 = (sample - s_t * model_output) / a_t
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


def build_sampler(noise: NoiseScheduleConfig, name: SamplerName | str) -> Scheduler:
    """A sampling scheduler with exactly the training noise schedule (never ``clip_sample``)."""
    name = SamplerName(name)
    common = {"num_train_timesteps": noise.num_train_timesteps, "schedule": noise.schedule,
              "beta_start": noise.beta_start, "beta_end": noise.beta_end}
    if name is SamplerName.DDIM:
        return DDIMScheduler(**common, clip_sample=False, prediction_type=noise.prediction_type)
    if name is SamplerName.PLMS:
        return PNDMScheduler(**common, skip_prk_steps=True, prediction_type=noise.prediction_type)
    return DPMSolverMultistepScheduler(**common, prediction_type=noise.prediction_type)


SCHEDULER_FILE = "scheduler.json"


def save_scheduler_config(path: str | Path, noise: NoiseScheduleConfig, sampler: SamplerConfig) -> None:
    """``RUN/scheduler.json``: the training noise schedule and the default sampler, read back by inference."""
    from medvl.config import to_dict

    payload = {"format": "medvl-scheduler/1", "train": {"class": "DDPMScheduler", "clip_sample": False,
                                                        **to_dict(noise)},
               "sampler": to_dict(sampler)}
    Path(path).write_text(json.dumps(payload, indent=2))


def load_scheduler_config(path: str | Path) -> tuple[NoiseScheduleConfig, SamplerConfig]:
    from medvl.config import from_dict

    path = Path(path)
    if not path.exists():
        raise RunError(f"{path.parent} has no {path.name}: not a diffusion run, or an incomplete one")
    data = json.loads(path.read_text())
    if data.get("format") != "medvl-scheduler/1":
        raise RunError(f"{path}: unknown scheduler format {data.get('format')!r}")
    train = {k: v for k, v in data["train"].items() if k not in ("class", "clip_sample")}
    return from_dict(NoiseScheduleConfig, train, "train."), from_dict(SamplerConfig, data["sampler"], "sampler.")


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
def guided_velocity(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    null: torch.Tensor, guidance: float, batched: bool = True,
                    sides: torch.Tensor | None = None) -> torch.Tensor:
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
def sample_latents(denoiser: Denoiser, context: torch.Tensor, noise: torch.Tensor, scheduler: Scheduler,
                   steps: int, guidance: float, precision: Precision | str = Precision.AUTO,
                   sides: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate from ``noise`` (B, C, h, w) to scaled latents with ``scheduler`` in ``steps`` model calls.

    context (B, L, Cc) is the conditional context; the null context comes from the denoiser's conditioner.
    """
    device = noise.device
    scheduler.set_timesteps(steps)
    null = denoiser.conditioner.null_context(noise.shape[0]).to(device, context.dtype)
    x = noise.float()
    with autocast_context(device, precision):
        for t in scheduler.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            v = guided_velocity(denoiser, x, tt, context, null, guidance, sides=sides)
            x, _ = scheduler.step(v.float(), int(t), x)
            x = x.float()
    return x


# --------------------------------------------------------------------------------- run-dir helpers

HEAD_DIR = "diffusion"
HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "denoiser.safetensors"


def save_head(directory: str | Path, denoiser: Denoiser, *, word_dim: int, keypatch_dim: int,
              latent_channels: int) -> None:
    """``RUN/diffusion/``: the denoiser's weights (EMA, without the memory) and how to rebuild it."""
    from safetensors.torch import save_file

    from medvl.config import to_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in denoiser.inference_state_dict().items()},
              str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({
        "unet": to_dict(denoiser.unet_cfg), "condition": to_dict(denoiser.conditioner.cfg),
        "word_dim": word_dim, "keypatch_dim": keypatch_dim, "latent_channels": latent_channels,
        "context_dim": denoiser.conditioner.context_dim}, indent=2))


def load_head(directory: str | Path, memory: nn.Module | None) -> Denoiser:
    from safetensors.torch import load_file

    from medvl.config import from_dict

    directory = Path(directory)
    if not (directory / HEAD_WEIGHTS).exists():
        raise RunError(f"{directory} holds no diffusion head ({HEAD_WEIGHTS}); is this a diffusion run?")
    spec = json.loads((directory / HEAD_CONFIG).read_text())
    unet_cfg = from_dict(UNetConfig, spec["unet"], "unet.")
    cond_cfg = from_dict(ConditionConfig, spec["condition"], "condition.")
    conditioner = ReportConditioner(cond_cfg, spec["word_dim"], spec["keypatch_dim"], spec["context_dim"],
                                    memory=memory)
    denoiser = Denoiser(unet_cfg, spec["latent_channels"], conditioner)
    missing, unexpected = denoiser.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)), strict=False)
    missing = [k for k in missing if not k.startswith("conditioner.memory.")]
    if missing or unexpected:
        raise RunError(f"{directory}: weights do not match the saved head config (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    return denoiser.eval()


def copy_adamatch_run(src_run: str | Path, dst_run: str | Path) -> Path:
    """Copy an AdaMatch run's inference artifacts into ``dst_run/adamatch/`` (where :func:`load_adamatch_run`
    of ``dst_run`` finds them)."""
    from medvl.models.adamatch import copy_adamatch

    return copy_adamatch(src_run, dst_run)


def load_adamatch_run(directory: str | Path, device: str | torch.device = "cpu") -> Any:
    """The AdaMatch run API (``AdaMatchRun.load``: ``directory`` or ``directory/adamatch``); a separate
    function so tests can substitute a stand-in."""
    try:
        from medvl.models.adamatch import AdaMatchRun
    except ImportError as exc:  # pragma: no cover - until AdaMatch lands
        raise RunError(f"cannot load the AdaMatch run at {directory}: medvl.models.adamatch is unavailable "
                       f"({exc})") from None
    return AdaMatchRun.load(directory, device=str(device))

"""AdaPatch: adaptive patches on a backbone feature map (after the official AdaMatch code).

For each cell of a regular ``G x G`` grid the layer predicts, from the cell's own feature, a centre
shift ``(dx, dy)`` and a width/height scale ``(dw, dh)``:

* centre = cell centre + ``tanh(dx, dy) * max_shift`` cells (at most about one cell);
* side = ``base_size`` cells ``* exp(tanh(dw, dh) * ln(max_scale))``, so each side stays within
  ``[base/max_scale, base*max_scale]`` (the cap the prototype lacked: its boxes kept growing);
* ``k x k`` points evenly spread inside the box are sampled bilinearly from the feature map
  (``grid_sample``, no custom op), flattened and projected to the patch feature.

The predictor's last layer starts at zero, so an untrained layer *is* the fixed grid. Modes:
``adaptive`` (boxes, above), ``freeform`` (each patch moves each of its ``k x k`` points by a
learned offset: lesion-shaped point sets; the box is their bounding box) and ``grid`` (no
predictor: the fixed-grid ablation, same sampling and projection).

Coordinates are normalised image coordinates in ``[0, 1]``, ``x`` to the image's right, ``y`` down,
so boxes map straight back to pixels. Patch ``p`` is grid cell ``(row, col) = divmod(p, G)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from medvl.errors import ConfigError


class PatchMode(str, Enum):
    ADAPTIVE = "adaptive"
    FREEFORM = "freeform"
    GRID = "grid"


@dataclass
class AdaPatchConfig:
    mode: PatchMode = PatchMode.ADAPTIVE
    grid: int = 8  # patches per side (P = grid**2)
    points: int = 3  # k: k x k bilinear sample points per patch
    max_shift: float = 1.0  # centre moves at most this many cells
    base_size: float = 1.0  # base box side, in cells
    max_scale: float = 3.0  # side scales within [base/max_scale, base*max_scale]
    max_offset: float = 1.5  # freeform: each point moves at most this many cells
    size_weight: float = 0.0  # weight of the box-growth regulariser added to the loss
    hidden: int = 0  # predictor hidden width (0: one linear layer)
    sample_dim: int = 0  # channels kept (1x1 conv) before sampling; 0: all of the backbone's
    # Add an embedding of each patch's box (centre, width, height) to its feature, so report words about
    # place ("left", "base", "apical") can meet the patches there. Grid and adaptive modes alike.
    box_embedding: bool = False

    def validate(self) -> None:
        if self.grid < 1 or self.points < 1:
            raise ConfigError("patches.grid and patches.points must be positive")
        if self.max_scale < 1.0:
            raise ConfigError(f"patches.max_scale must be >= 1, got {self.max_scale}")
        if self.max_shift < 0 or self.max_offset < 0 or self.base_size <= 0:
            raise ConfigError("patches.max_shift / max_offset must be >= 0 and base_size > 0")


@dataclass
class ImagePatches:
    """Adaptive patches of a batch of images: the geometry and features of one forward pass.

    ``features`` (B, P, D) projected, not normalised; ``boxes`` (B, P, 4) ``x0, y0, x1, y1`` normalised (x to the
    image's right); ``centres`` (B, P, 2); ``points`` (B, P, k*k, 2) the sample points (the free-form shape);
    ``shift`` (B, P, 2) centre shift and ``size`` (B, P, 2) box width/height, both in grid cells; ``penalty``
    scalar regulariser; ``global_features`` (B, D) the mean of the patch features.
    """

    features: torch.Tensor
    boxes: torch.Tensor
    centres: torch.Tensor
    points: torch.Tensor
    shift: torch.Tensor
    size: torch.Tensor
    penalty: torch.Tensor
    global_features: torch.Tensor | None = None


def grid_centres(grid: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(G*G, 2) cell centres ``(x, y)`` in row-major order."""
    c = (torch.arange(grid, device=device, dtype=dtype) + 0.5) / grid
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def point_layout(k: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(k*k, 2) point positions as fractions of the box side, in ``(-0.5, 0.5)``, row-major."""
    u = (torch.arange(k, device=device, dtype=dtype) + 0.5) / k - 0.5
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def sample_points(fmap: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features at normalised points: fmap (B, C, H, W), points (B, P, K, 2) -> (B, P, K, C)."""
    grid = (
        points * 2.0 - 1.0
    )  # [0, 1] image coords -> grid_sample's [-1, 1] (align_corners=False: pixel edges)
    # grid_sample reads channels-last input faster on CPU; its output is (B, C, P, K).
    out = F.grid_sample(
        fmap, grid.to(fmap.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.permute(0, 2, 3, 1)  # (B, C, P, K) -> (B, P, K, C)


class AdaptivePatchLayer(nn.Module):
    """Feature map (B, C, H, W) -> :class:`ImagePatches` with P = grid**2 patches of dim ``out_dim``."""

    def __init__(self, in_channels: int, out_dim: int, cfg: AdaPatchConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.mode = PatchMode(cfg.mode)
        k2 = cfg.points**2
        self.register_buffer("base_centres", grid_centres(cfg.grid), persistent=False)
        self.register_buffer("layout", point_layout(cfg.points), persistent=False)
        c = cfg.sample_dim or in_channels
        # Channels are reduced and normalised on the map (H*W positions), not on the P*k*k samples: cheaper.
        self.reduce = nn.Conv2d(in_channels, c, 1) if cfg.sample_dim else nn.Identity()
        self.norm = nn.LayerNorm(c)
        self.proj = nn.Linear(k2 * c, out_dim)
        self.box_embed: nn.Module | None = None
        if cfg.box_embedding:
            self.box_embed = nn.Sequential(nn.Linear(4, 64), nn.GELU(), nn.Linear(64, out_dim))
        self.predictor: nn.Module | None = None
        if self.mode is not PatchMode.GRID:
            n_out = 4 if self.mode is PatchMode.ADAPTIVE else 2 + 2 * k2
            last = nn.Linear(cfg.hidden or c, n_out)
            nn.init.zeros_(last.weight)  # start from the grid
            nn.init.zeros_(last.bias)
            if cfg.hidden:
                self.predictor = nn.Sequential(nn.Linear(c, cfg.hidden), nn.GELU(), last)
            else:
                self.predictor = last

    @property
    def num_patches(self) -> int:
        return self.cfg.grid**2

    def forward(self, fmap: torch.Tensor) -> ImagePatches:
        cfg = self.cfg
        b = fmap.shape[0]
        fmap = self.norm(self.reduce(fmap).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C', H, W)
        cell = 1.0 / cfg.grid
        centres = self.base_centres.to(fmap.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, P, 2)
        layout = self.layout.to(fmap.dtype)  # (K, 2)
        base = cfg.base_size * cell
        zeros = fmap.new_zeros(b, self.num_patches, 2)
        penalty = fmap.new_zeros(())
        if self.mode is PatchMode.GRID:
            shift, log_scale = zeros, zeros
        else:
            # The predictor reads the cell's own feature: the feature map averaged over the cell.
            cell_feat = F.adaptive_avg_pool2d(fmap, cfg.grid).flatten(2).transpose(1, 2)  # (B, P, C)
            out = self.predictor(cell_feat)
            shift = torch.tanh(out[..., :2]) * cfg.max_shift  # cells
            log_scale = (
                zeros
                if self.mode is PatchMode.FREEFORM
                else torch.tanh(out[..., 2:4]) * math.log(cfg.max_scale)
            )
        centre = (centres + shift * cell).clamp(0, 1)
        if self.mode is PatchMode.FREEFORM:
            offsets = torch.tanh(out[..., 2:]).view(b, self.num_patches, -1, 2) * cfg.max_offset  # cells
            points = (centre.unsqueeze(2) + layout * base + offsets * cell).clamp(0, 1)  # (B, P, K, 2)
            margin = 0.5 * base / cfg.points  # half the base spacing: zero offsets give the grid cell
            lo = (points.amin(2) - margin).clamp(0, 1)
            hi = (points.amax(2) + margin).clamp(0, 1)
            boxes = torch.cat([lo, hi], dim=-1)
            if cfg.size_weight:
                spread = (offsets - offsets.mean(2, keepdim=True)).abs().mean()
                penalty = cfg.size_weight * spread
        else:
            half = 0.5 * base * torch.exp(log_scale)  # (B, P, 2)
            boxes = torch.cat([(centre - half).clamp(0, 1), (centre + half).clamp(0, 1)], dim=-1)
            wh = boxes[..., 2:] - boxes[..., :2]
            points = boxes[..., None, :2] + (layout + 0.5) * wh.unsqueeze(2)
            if cfg.size_weight:
                penalty = cfg.size_weight * F.relu(log_scale).sum(-1).mean()
        samples = sample_points(fmap, points)  # (B, P, K, C)
        features = self.proj(samples.flatten(2))
        size = (boxes[..., 2:] - boxes[..., :2]) / cell
        # A free-form patch's centre is its points' mean (its box may be lopsided).
        centres = points.mean(2) if self.mode is PatchMode.FREEFORM else (boxes[..., :2] + boxes[..., 2:]) / 2
        if self.box_embed is not None:
            geometry = torch.cat([centres, boxes[..., 2:] - boxes[..., :2]], dim=-1)  # (B, P, 4) in [0, 1]
            features = features + self.box_embed(geometry * 2 - 1)
        return ImagePatches(
            features=features,
            boxes=boxes,
            centres=centres,
            points=points,
            shift=shift,
            size=size,
            penalty=penalty,
            global_features=features.mean(1),
        )


def patch_stats(layout: ImagePatches) -> dict[str, torch.Tensor]:
    """Mean centre shift and box side (both in cells) for logs, as 0-d tensors on the patches' device: reading
    them to the host is left to the log line (a read here would make every training step wait for the device,
    and a compiled forward would recompile on each new value)."""
    with torch.no_grad():
        side = layout.size.float().prod(-1).clamp_min(0).sqrt()
        return {
            "mean_shift": layout.shift.float().norm(dim=-1).mean(),
            "box_size": side.mean(),
            "box_size_median": side.median(),
        }

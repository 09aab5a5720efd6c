"""Grounding through synthesis: where the diffusion head's cross-attention puts a report word on a *real* scan.

The real scan is encoded by the run's autoencoder, noised to a few timesteps (fixed noise), and denoised once per
timestep conditioned on its own report; every cross-attention layer of the UNet is read (a forward hook recomputes
its attention weights from the layer's own queries and keys), and the weights of the word's token slot are
averaged over heads, layers (each resized to the latent grid) and timesteps (its shared-memory slot is left out:
on validation it drew the pointer away from the finding). The pointer is the map's maximum; the pair is scored
like AdaMatch's pointing game (:mod:`medvl.eval.alignment`): one record per (image, finding word), a hit when the pointer lies in one of the
word's region boxes widened by 5% of the image. Unlike a map drawn while sampling from the report alone, this one
reads the scan's pixels: the latent of the real scan is what the attention queries come from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from medvl.eval.alignment import PointingRecord, region_groups, word_positions
from medvl.eval.priors import WIDEN, point_scores

__all__ = ["GROUNDING_TIMESTEPS", "attention_maps", "grounding_records", "CONVENTION"]

#: The noise levels the real scan's latent is read at (of 1,000 training timesteps).
#: Chosen on validation (seed 7): low noise reads the scan best.
GROUNDING_TIMESTEPS: tuple[int, ...] = (20, 50, 100)

CONVENTION = (
    "grounding.*: the diffusion head's cross-attention on the real scan (its autoencoder latent noised to "
    f"timesteps {', '.join(map(str, GROUNDING_TIMESTEPS))} with fixed noise, one denoising pass each, conditioned "
    "on its own report): the weights of the word's token slot averaged over heads, layers and "
    "timesteps; the pointer is the map's maximum, scored like localization.pointing_game (one record per image "
    "and finding word, hit inside a region box widened by 5%); box_iou uses the latent cell under the pointer"
)


def _cross_attention_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's cross-attention blocks (MONAI ``DiffusionUNetTransformerBlock.attn2``)."""
    return [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]


@torch.no_grad()
def attention_maps(synth, images: torch.Tensor, reports: Sequence[str], seed: int = 0) -> torch.Tensor:
    """Real scans (B, 1, S, S) in [-1024, 1024] and their reports -> cross-attention maps (B, L, h, w) over the
    conditioning context's L slots, on the latent grid (h, w), each slot's map summing over the grid to its mean
    attention weight."""
    from medvl.models.diffusion.samplers import build_train_scheduler

    den = synth.denoiser.eval()
    device = synth.device
    feats = synth.encoder.encode(list(reports)).to(device)
    context = den.conditioner(**feats.as_kwargs())
    mu, _ = synth.autoencoder.encode(images.to(device))
    latents = mu * synth.autoencoder.latent.scale_factor
    b, _, h, w = latents.shape
    scheduler = build_train_scheduler(synth.noise)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        x = args[0]
        ctx = kwargs.get("context")
        if ctx is None and len(args) > 1:
            ctx = args[1]
        q = module.input_rearrange(module.to_q(x))
        k = module.input_rearrange(module.to_k(ctx))
        att = torch.einsum("blxd,blyd->blxy", q.float(), k.float()) * module.scale
        att = att.softmax(-1)  # (B, H, N, L)
        n = att.shape[2]
        side = int(round(n**0.5))
        maps = att.mean(1).transpose(1, 2).reshape(att.shape[0], -1, side, side)  # (B, L, s, s)
        captured.append(F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in _cross_attention_layers(den.unet)]
    if not handles:
        raise ValueError("this diffusion head's UNet has no cross-attention layers to read")
    try:
        for t in GROUNDING_TIMESTEPS:
            steps = torch.full((b,), t, dtype=torch.long, device=device)
            noisy = scheduler.add_noise(original_samples=latents, noise=noise, timesteps=steps)
            den(noisy, steps, context, sides=feats.sides.to(device) if den.unet_cfg.side_maps else None)
    finally:
        for handle in handles:
            handle.remove()
    maps = torch.stack(captured).mean(0)  # (B, L, h, w)
    return maps / (h * w)


def grounding_records(
    synth, dataset, regions: pd.DataFrame, *, batch_size: int = 32, seed: int = 0
) -> tuple[list[PointingRecord], dict[str, int]]:
    """One :class:`PointingRecord` per (image, finding word with a region box) of ``dataset`` (items with
    ``image``, ``report``, ``dicom_id``), as AdaMatch's pointing game pairs them."""
    by_image: dict[str, list] = defaultdict(list)
    for r in regions.itertuples(index=False):
        by_image[str(r.dicom_id)].append(r)
    tokenizer = synth.encoder.run.tokenizer
    max_tokens = synth.denoiser.conditioner.cfg.max_tokens
    records: list[PointingRecord] = []
    skipped: dict[str, int] = defaultdict(int)
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        items = [it for it in items if by_image.get(str(it["dicom_id"]))]
        if not items:
            continue
        texts = [" ".join(str(it["report"]).split()) for it in items]
        maps = attention_maps(synth, torch.stack([it["image"] for it in items]), texts, seed=seed).cpu()
        enc = tokenizer.encode(texts)
        h, w = maps.shape[-2:]
        ys, xs = np.meshgrid(
            (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij"
        )  # cell centres
        for b, item in enumerate(items):
            for word, rows in region_groups(by_image[str(item["dicom_id"])], skipped).items():
                found = word_positions(enc, b, word)
                pos = [p for p in found[0] if p < max_tokens] if found is not None else []
                if not pos:
                    skipped["word_not_in_context"] += 1
                    continue
                slots = [1 + p for p in pos]  # [summary | words | memory | keypatches]: the word's own slots
                heat = maps[b, slots].sum(0)  # (h, w)
                cell = int(heat.flatten().argmax())
                cy, cx = divmod(cell, w)
                point = ((cx + 0.5) / w, (cy + 0.5) / h)
                box = (cx / w, cy / h, (cx + 1) / w, (cy + 1) / h)
                boxes = np.array([[r.x0, r.y0, r.x1, r.y1] for r in rows], dtype=np.float64)
                hit, iou = point_scores(point, box, boxes)
                inside = np.zeros((h, w), dtype=bool)
                for x0, y0, x1, y1 in boxes:
                    inside |= (
                        (xs >= x0 - WIDEN) & (xs <= x1 + WIDEN) & (ys >= y0 - WIDEN) & (ys <= y1 + WIDEN)
                    )
                records.append(
                    PointingRecord(
                        str(item["dicom_id"]),
                        word,
                        hit,
                        float(inside.mean()),
                        iou,
                        negated_fallback=not found[1],
                        regions=len(rows),
                    )
                )
    return records, dict(skipped)

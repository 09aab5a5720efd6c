"""Training and sampling speed of the diffusion head at the `base` preset's size (MONAI's MIMIC recipe UNet).

    python benchmarks/unet_scale_speed.py [--config base] [--device cuda] [--latent 64]

docs/design.md section 9 anchors the MONAI MIMIC-CXR bundle's UNet (264 M parameters, 3 x 64 x 64 latents) on an
H100: about 120 training images/s at batch 16 in bf16 with flash attention, DDIM-50 sampling with guidance at
0.26-0.43 s per image (batch 8). This script builds *our* denoiser from ``configs/diffusion/<config>.yaml``
(the same MONAI ``DiffusionModelUNet`` sizes plus our report conditioner, CoordConv channels and the frozen
shared memory, random weights: speed does not depend on them) and measures, side by side in one process:

* training: :class:`medvl.models.diffusion.LatentDiffusion` forward + backward + AdamW + EMA update, images/s,
  bf16 autocast against fp32;
* sampling (UNet only, autoencoder decode excluded), seconds per image at batch 8 with classifier-free guidance
  (conditional and unconditional halves batched): the MONAI recipe (DDIM 50 steps, fp32), DDIM 50 in bf16 and
  the preset's default sampler (DPM-Solver++(2M), its steps, bf16).

Every row runs after a warm-up; CUDA timings are synchronised. Prints a table and writes
``benchmarks/results/unet_scale_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def build(config: str, device: torch.device, latent_channels: int, upstream: str = "base"):
    """The denoiser of diffusion preset ``config``; word / keypatch widths and the shared memory come from the
    AdaMatch and report presets named ``upstream`` (the runs a real diffusion stage is built ``--from``)."""
    from medvl.config import load_config, resolve_config_path
    from medvl.models.diffusion import Denoiser, LatentDiffusion, ReportConditioner
    from medvl.models.memory import SharedMemory
    from medvl.train.stages.adamatch import AdaMatchStageConfig
    from medvl.train.stages.diffusion import DiffusionStageConfig
    from medvl.train.stages.report import ReportStageConfig

    cfg = load_config(DiffusionStageConfig, resolve_config_path("diffusion", config))
    adamatch = load_config(AdaMatchStageConfig, resolve_config_path("adamatch", upstream)).model
    report = load_config(ReportStageConfig, resolve_config_path("report", upstream)).model
    word_dim, keypatch_dim = adamatch.text.hidden_size, adamatch.embed_dim
    memory = SharedMemory(report.memory) if cfg.condition.use_memory else None
    conditioner = ReportConditioner(
        cfg.condition, word_dim, keypatch_dim, cfg.unet.cross_attention_dim, memory
    )
    denoiser = Denoiser(cfg.unet, latent_channels, conditioner)
    model = LatentDiffusion(denoiser, cfg.noise, scale_factor=1.0).to(device)
    return cfg, model, word_dim, keypatch_dim


def features(cfg, batch: int, word_dim: int, keypatch_dim: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    T, K = cfg.condition.max_tokens, max(cfg.condition.keypatches, 1)
    lengths = torch.randint(T // 3, T + 1, (batch,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    out = {
        "words": torch.randn(batch, T, word_dim, generator=g),
        "word_mask": mask,
        "word_kind": torch.randint(0, 3, (batch, T), generator=g),
        "keypatches": torch.randn(batch, K, keypatch_dim, generator=g),
        "keypatch_boxes": torch.rand(batch, K, 4, generator=g).sort(-1).values,
        "keypatch_mask": torch.ones(batch, K, dtype=torch.long),
    }
    if cfg.unet.side_maps:
        out["sides"] = torch.randint(0, 2, (batch, 2), generator=g).float()
    return {k: v.to(device) for k, v in out.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(
    cfg,
    model,
    feats: dict,
    latent: tuple[int, int, int],
    *,
    precision: str,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict:
    from medvl.models.diffusion import autocast_context

    batch = feats["words"].shape[0]
    model.train()
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    mu = torch.randn(batch, *latent, device=device)
    sigma = torch.full_like(mu, 0.05)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with autocast_context(device, precision):
            loss = model(mu, sigma, **feats)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_ema(0.9999)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del opt
    return {
        "what": "train",
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "images_per_s": batch * steps / seconds,
        "s_per_step": seconds / steps,
        "peak_gib": peak,
    }


def sample_row(
    cfg,
    model,
    feats: dict,
    latent: tuple[int, int, int],
    *,
    sampler: str,
    steps: int,
    guidance: float,
    precision: str,
    repeats: int,
    device: torch.device,
    graphs: bool = False,
    keep_latents: bool = False,
) -> dict:
    """Seconds per image of ``sampler`` (after a warm-up call); ``graphs``: the denoiser replayed from CUDA graphs
    (``medvl.models.diffusion.graphs``; the warm-up captures them); ``keep_latents``: the row's ``latents``."""
    from medvl.models.diffusion import autocast_context, build_sampler, sample_latents
    from medvl.models.diffusion.graphs import CUDA_GRAPHS

    model.eval()
    den = model.ema
    batch = feats["words"].shape[0]
    with torch.no_grad(), autocast_context(device, precision):
        context = den.conditioner(
            feats["words"],
            feats["word_mask"],
            feats["word_kind"],
            feats["keypatches"],
            feats["keypatch_boxes"],
            feats["keypatch_mask"],
        )
    context = context.float()
    noise = torch.randn(batch, *latent, generator=torch.Generator().manual_seed(0)).to(device)

    def once():
        torch.manual_seed(0)  # the fresh noise a consistency sampler draws: the same in every call
        scheduler = build_sampler(cfg.noise, sampler)
        return sample_latents(
            den, context, noise, scheduler, steps, guidance, precision, sides=feats.get("sides")
        )

    before = CUDA_GRAPHS["sample"]
    CUDA_GRAPHS["sample"] = graphs
    try:
        sync(device)
        t0 = time.perf_counter()
        once()  # warm-up (and the graphs' capture)
        sync(device)
        first = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = once()
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        CUDA_GRAPHS["sample"] = before
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "what": "sample",
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "precision": precision,
        "batch": batch,
        "s_per_image": seconds / (repeats * batch),
        "first_call_s": first,
        "graphs": graphs,
        "finite": bool(torch.isfinite(out).all()),
        "peak_gib": peak,
    } | ({"latents": out} if keep_latents else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="base", help="diffusion preset or YAML (default: base)")
    p.add_argument(
        "--upstream", default="base", help="AdaMatch and report preset whose sizes feed the conditioner"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--latent", type=int, default=64, help="latent side (base: 64 = 512 px with 8x downsampling)"
    )
    p.add_argument("--latent-channels", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-fp32-train", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg, model, word_dim, keypatch_dim = build(args.config, device, args.latent_channels, args.upstream)
    latent = (args.latent_channels, args.latent, args.latent)
    n_unet = sum(p.numel() for p in model.denoiser.unet.parameters())
    n_all = sum(p.numel() for p in model.denoiser.parameters())
    print(
        f"{args.config}: UNet {n_unet / 1e6:.1f} M parameters ({n_all / 1e6:.1f} M with conditioner and memory), "
        f"latent {latent}, context {model.denoiser.conditioner.context_length} x "
        f"{model.denoiser.conditioner.context_dim}, device {device}",
        flush=True,
    )
    rows = []
    tf = features(cfg, args.train_batch, word_dim, keypatch_dim, device)
    for precision in ["bf16"] + ([] if args.skip_fp32_train else ["fp32"]):
        rows.append(
            train_row(
                cfg, model, tf, latent, precision=precision, steps=args.train_steps, warmup=3, device=device
            )
        )
        print(rows[-1], flush=True)
    sf = features(cfg, args.sample_batch, word_dim, keypatch_dim, device, seed=1)
    g = float(cfg.sampler.guidance)
    default = cfg.sampler.name.value
    for name, sampler, steps, precision in [
        ("monai_recipe", "ddim", 50, "fp32"),
        ("ddim50_bf16", "ddim", 50, "bf16"),
        ("default", default, cfg.sampler.steps, "bf16"),
    ]:
        row = sample_row(
            cfg,
            model,
            sf,
            latent,
            sampler=sampler,
            steps=steps,
            guidance=g,
            precision=precision,
            repeats=args.repeats,
            device=device,
        )
        row["row"] = name
        rows.append(row)
        print(row, flush=True)

    print()
    print(f"{'row':>22s} {'precision':>9s} {'batch':>5s} {'result':>22s} {'peak GiB':>8s}")
    for r in rows:
        if r["what"] == "train":
            print(
                f"{'train':>22s} {r['precision']:>9s} {r['batch']:5d} {r['images_per_s']:14.1f} images/s "
                f"{r['peak_gib']:8.1f}"
            )
        else:
            label = f"{r['row']} ({r['sampler']} {r['steps']})"
            print(
                f"{label:>22s} {r['precision']:>9s} {r['batch']:5d} {r['s_per_image']:15.4f} s/image "
                f"{r['peak_gib']:8.1f}"
            )
    ratios = {}
    by = {r.get("row", "train_" + r["precision"]): r for r in rows}
    if "train_fp32" in by:
        ratios["train_bf16_over_fp32"] = by["train_bf16"]["images_per_s"] / by["train_fp32"]["images_per_s"]
    ratios["sample_recipe_over_default"] = by["monai_recipe"]["s_per_image"] / by["default"]["s_per_image"]
    ratios["sample_recipe_over_ddim50_bf16"] = (
        by["monai_recipe"]["s_per_image"] / by["ddim50_bf16"]["s_per_image"]
    )
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "unet_scale_speed",
        "config": args.config,
        "device": name,
        "unet_parameters": n_unet,
        "parameters_with_conditioner": n_all,
        "latent": list(latent),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "rows": rows,
        "ratios": ratios,
        "anchor": "docs/design.md section 9: MONAI bundle UNet on an H100, ~120 train images/s (batch 16, bf16), "
        "DDIM-50 with guidance 0.26-0.43 s/image (batch 8)",
    }
    out = args.out or RESULTS / f"unet_scale_speed_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

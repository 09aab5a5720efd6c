"""AdaMatch training throughput and peak memory for a preset on this machine's CPU, and what the
adaptive patch layer costs over the fixed grid.

For each patch mode (adaptive, grid, free-form), in its own process so peak memory is its own:
a few warm-up steps, then timed training steps (collate with augmentation, forward, backward,
AdamW) at the preset's batch size; the share of the step spent in the backbone, the patch layer,
the text encoder and the token-wise similarity + loss (forward + backward of each, timed apart).
Prints a table and writes ``benchmarks/results/adamatch_throughput.json``.

Run::

    python benchmarks/adamatch_throughput.py --data /tmp/iu_phantom      # a prepared dataset (phantom)
    python benchmarks/adamatch_throughput.py                             # 128 px toy data if none
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "adamatch_throughput.json"


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(mode: str, config: str, data: Path, steps: int, warmup: int) -> dict:
    import torch.nn.functional as F

    from medvl.models.adamatch import contrastive_loss, token_scores, word_identities, word_loss, word_order
    from medvl.train.stages.adamatch import build_stage

    torch.manual_seed(0)
    stage = build_stage(config_path=_config_path(config), overrides=[f"model.patches.mode={mode}"], data=data)
    model = stage.build_model()
    opt = torch.optim.AdamW(stage.param_groups(model), lr=stage.train.lr)
    ds = stage.train_dataset()
    bs = stage.train.batch_size
    g = torch.Generator().manual_seed(0)

    def batch():
        idx = torch.randperm(len(ds), generator=g)[:bs].tolist()
        return stage.collate([ds[i] for i in idx])

    def step(b):
        loss, _ = stage.training_step(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(warmup):
        step(batch())
    t_collate = t_step = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        b = batch()
        t1 = time.perf_counter()
        step(b)
        t2 = time.perf_counter()
        t_collate += t1 - t0
        t_step += t2 - t1

    # Parts, forward + backward each, on one fixed batch.
    b = batch()
    images = model.prepare_images(b["images"])
    text_keys = ("input_ids", "attention_mask", "word_ids", "word_mask", "match_mask", "word_weight")

    def run_backbone():
        model.backbone(images).sum().backward()

    fmap = model.backbone(images).detach().requires_grad_(True)

    def run_patches():
        model.patches(fmap).features.sum().backward()

    def run_text():
        model.encode_text(**{k: b[k] for k in text_keys}).features.sum().backward()

    with torch.no_grad():
        pf = model.patches(fmap).features
        tok = model.encode_text(**{k: b[k] for k in text_keys})
    img = F.normalize(pf, dim=-1).requires_grad_(True)
    txt0, wm, mm, ww = model.select(tok)
    txt = txt0.clone().requires_grad_(True)

    def run_loss():  # as AdaMatch.forward: the pair-level loss, plus the word-level term where the config has it
        if model.cfg.word_loss_weight > 0:
            s1, s2, best = token_scores(img, txt, wm, mm, model.cfg.chunk_size, ww, word_best=True)
            ids = word_identities(b["input_ids"], word_order(tok.word_mask), b["word_key"])
            extra = model.cfg.word_loss_weight * word_loss(best, mm, ids, torch.tensor(1 / 0.07))
        else:
            s1, s2 = token_scores(img, txt, wm, mm, model.cfg.chunk_size, ww)
            extra = 0.0
        (contrastive_loss(s1 / 0.07) + contrastive_loss(s2.t() / 0.07) + extra).backward()

    parts = {
        name: _timed(fn, 3)
        for name, fn in (
            ("backbone", run_backbone),
            ("patch_layer", run_patches),
            ("text_encoder", run_text),
            ("similarity_loss", run_loss),
        )
    }
    return {
        "mode": mode,
        "batch_size": bs,
        "image_size": model.cfg.image_size,
        "patches": model.num_patches,
        "words_per_report_mean": float(wm.sum(1).float().mean()),
        "words_padded": int(wm.shape[1]),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_seconds": t_step / steps,
        "collate_seconds": t_collate / steps,
        "images_per_second": bs * steps / (t_step + t_collate),
        "images_per_second_model_only": bs * steps / t_step,
        "part_seconds": parts,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _config_path(config: str) -> Path:
    from medvl.config import resolve_config_path

    return resolve_config_path("adamatch", config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="prepared dataset (default: 128 px toy data)")
    p.add_argument("--config", default="demo")
    p.add_argument("--modes", nargs="+", default=["adaptive", "grid", "freeform"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.child:
        print(json.dumps(measure(args.child, args.config, args.data, args.steps, args.warmup)))
        return
    tmp = None
    if args.data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.toydata import make_tiny_prepared

        tmp = tempfile.TemporaryDirectory()
        args.data = make_tiny_prepared(Path(tmp.name) / "toy", n=400, size=128)
    rows = []
    for mode in args.modes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--config",
            args.config,
            "--data",
            str(args.data),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"measured {mode}", flush=True)
    base = {r["mode"]: r for r in rows}
    print(
        f"\n{'mode':10s}{'img/s':>8s}{'step s':>8s}{'collate s':>10s}{'peak MB':>9s}{'backbone':>10s}"
        f"{'patches':>9s}{'text':>8s}{'sim+loss':>9s}"
    )
    for r in rows:
        ps = r["part_seconds"]
        print(
            f"{r['mode']:10s}{r['images_per_second']:8.1f}{r['step_seconds']:8.2f}{r['collate_seconds']:10.2f}"
            f"{r['peak_rss_mb']:9.0f}{ps['backbone']:10.3f}{ps['patch_layer']:9.3f}{ps['text_encoder']:8.3f}"
            f"{ps['similarity_loss']:9.3f}"
        )
    ratios = {}
    if "grid" in base:
        g = base["grid"]
        for m in ("adaptive", "freeform"):
            if m in base:
                ratios[m] = {
                    "patch_layer_time_ratio": base[m]["part_seconds"]["patch_layer"]
                    / g["part_seconds"]["patch_layer"],
                    "step_time_ratio": base[m]["step_seconds"] / g["step_seconds"],
                }
                print(
                    f"{m} over grid: patch layer x{ratios[m]['patch_layer_time_ratio']:.2f}, "
                    f"whole training step x{ratios[m]['step_time_ratio']:.2f}"
                )
    record = {
        "benchmark": "adamatch_throughput",
        "config": args.config,
        "data": "toy 128 px (tests/toydata.py)" if tmp else str(args.data),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "rows": rows,
        "ratios_over_grid": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Adaptive patches vs the fixed grid (and optionally free-form point sets) on IU-Phantom.

Each mode is trained with the same preset, budget and seed through ``medvl train adamatch`` (the
shared loop: model selection on the validation split only), then scored once on the test split
with ``medvl evaluate adamatch``. Prints retrieval and localization (with chance) side by side,
overall and per finding, checks the quality bars below, and writes
``benchmarks/results/adamatch_ablation.json``.

Run (about 2 x 10 minutes on 2 CPU cores with the demo preset)::

    medvl prepare phantom --out /tmp/iu_phantom --size 128      # if you have no prepared phantom yet
    python benchmarks/adamatch_ablation.py --data /tmp/iu_phantom --work /tmp/adamatch_ablation

Quality bars: adaptive ``pointing_game`` >= 0.6 and >= 0.3 above its chance; adaptive
``box_iou`` >= 1.5 x the fixed grid's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "adamatch_ablation.json"
PROTOTYPE = {
    "adaptive": {"pointing_game": 0.54, "box_iou": 0.136, "pointing_game_chance": 0.22},
    "grid": {"pointing_game": 0.44, "box_iou": 0.054, "pointing_game_chance": 0.12},
}


def patch_geometry(run_dir: Path, data: Path, split: str = "test", limit: int = 256) -> dict[str, float]:
    """Mean centre shift and box side (cells) of the trained model on ``split`` images."""
    from medvl.data.prepared import PreparedDataset
    from medvl.models.adamatch import AdaMatchRun
    from medvl.models.adamatch.patches import patch_stats

    run = AdaMatchRun.from_pretrained(run_dir)
    ds = PreparedDataset(data, split)
    n = min(limit, len(ds))
    images = torch.stack([ds[i]["image"] for i in range(n)])
    return patch_stats(run.encode_images(images))


def train_and_score(mode: str, args: argparse.Namespace) -> dict:
    from medvl.eval.alignment import evaluate_adamatch
    from medvl.train.stages import run_stage

    run_dir = args.work / mode
    overrides = [f"model.patches.mode={mode}", f"train.seed={args.seed}", *args.set]
    if mode == "grid":
        overrides.append("model.patches.size_weight=0")
    t0 = time.perf_counter()
    if (run_dir / "stage.json").exists() and args.reuse:
        fit = json.loads((run_dir / "stage.json").read_text())
    else:
        result = run_stage("adamatch", config=args.config, data=args.data, out=run_dir, overrides=overrides)
        fit = json.loads((result.run_dir / "stage.json").read_text())
    train_s = time.perf_counter() - t0
    metrics = evaluate_adamatch(
        run=run_dir, data=args.data, split=args.split, out=args.work / f"{mode}_{args.split}.json"
    )
    return {
        "overrides": overrides,
        "stage_seconds": round(train_s, 1),
        "fit": fit,
        "geometry": patch_geometry(run_dir, args.data, args.split),
        "metrics": {k: v for k, v in metrics.items() if k != "meta"},
        "meta": metrics["meta"],
    }


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def print_table(results: dict[str, dict]) -> None:
    modes = list(results)
    rows = [
        "retrieval.i2t_r1",
        "retrieval.i2t_r5",
        "retrieval.t2i_r1",
        "retrieval.t2i_r5",
        "localization.pointing_game",
        "localization.pointing_game_chance",
        "localization.box_iou",
        "localization.count",
    ]
    words = sorted(
        {
            k.split(".")[2]
            for r in results.values()
            for k in r["metrics"]
            if k.startswith("localization.per_finding.")
        }
    )
    head = f"{'metric':48s}" + "".join(f"{m:>12s}" for m in modes)
    print(head)
    print("-" * len(head))
    for key in rows:
        print(f"{key:48s}" + "".join(f"{fmt(results[m]['metrics'].get(key)):>12s}" for m in modes))
    print(
        f"{'pointing_game - chance':48s}"
        + "".join(
            f"{fmt(results[m]['metrics']['localization.pointing_game'] - results[m]['metrics']['localization.pointing_game_chance']):>12s}"
            for m in modes
        )
    )
    for g in ("mean_shift", "box_size", "box_size_median"):
        print(
            f"{'patches.' + g + ' (cells)':48s}"
            + "".join(f"{fmt(results[m]['geometry'][g]):>12s}" for m in modes)
        )
    print(
        f"{'stage seconds (train + select + save)':48s}"
        + "".join(f"{fmt(results[m]['stage_seconds']):>12s}" for m in modes)
    )
    print()
    print(f"{'per finding: pointing game / chance / box IoU (n)':48s}")
    for w in words:
        cells = []
        for m in modes:
            r = results[m]["metrics"]
            base = f"localization.per_finding.{w}."
            cells.append(
                f"{r[base + 'pointing_game']:.2f}/{r[base + 'pointing_game_chance']:.2f}/"
                f"{r[base + 'box_iou']:.2f} ({r[base + 'count']})"
            )
        print(f"  {w:46s}" + "".join(f"{c:>24s}" for c in cells))


def check_targets(results: dict[str, dict]) -> dict[str, dict]:
    out = {}
    if "adaptive" not in results:
        return out
    a = results["adaptive"]["metrics"]
    pg, chance, iou = (
        a["localization.pointing_game"],
        a["localization.pointing_game_chance"],
        a["localization.box_iou"],
    )
    out["pointing_game >= 0.6"] = {"value": pg, "met": pg >= 0.6}
    out["pointing_game - chance >= 0.3"] = {"value": pg - chance, "met": pg - chance >= 0.3}
    if "grid" in results:
        g_iou = results["grid"]["metrics"]["localization.box_iou"]
        ratio = iou / g_iou if g_iou > 0 else float("inf")
        out["box_iou >= 1.5 x grid"] = {"value": ratio, "met": ratio >= 1.5}
    out["beats prototype (pg 0.54, iou 0.136)"] = {"value": [pg, iou], "met": pg > 0.54 and iou > 0.136}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a prepared IU-Phantom directory")
    p.add_argument("--work", type=Path, default=Path("/tmp/adamatch_ablation"))
    p.add_argument("--config", default="demo")
    p.add_argument(
        "--modes", nargs="+", default=["adaptive", "grid"], choices=["adaptive", "grid", "freeform"]
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        default="validate",
        help="split the configurations are compared on (default: validate; test once)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--reuse", action="store_true", help="score finished runs in --work instead of retraining")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results = {}
    for mode in args.modes:
        print(f"== {mode}", flush=True)
        results[mode] = train_and_score(mode, args)
    print()
    print_table(results)
    targets = check_targets(results)
    print()
    for name, t in targets.items():
        print(f"{'MET ' if t['met'] else 'MISS'} {name}: {t['value']}")
    record = {
        "benchmark": "adamatch_ablation",
        "config": args.config,
        "data": str(args.data),
        "seed": args.seed,
        "extra_overrides": args.set,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "prototype": PROTOTYPE,
        "targets": targets,
        "modes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Seed spread of the AdaMatch ablation: mean and standard deviation over several ``adamatch_ablation.py`` runs.

    for s in 0 1 2; do python benchmarks/adamatch_ablation.py --data D --work W$s --seed $s --out A$s.json; done
    python benchmarks/adamatch_seeds.py A0.json A1.json A2.json

One training run per seed and mode is one draw: at the demo budget the test pointing game
moves by several hundredths from seed to seed; this prints each seed, the mean and the sample standard deviation
per mode, the adaptive/grid box-IoU ratio per seed, and the quality bars on the means. Writes
``benchmarks/results/adamatch_seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "adamatch_seeds.json"
KEYS = [
    "localization.pointing_game",
    "localization.pointing_game_chance",
    "localization.box_iou",
    "retrieval.i2t_r5",
    "retrieval.t2i_r5",
]
ALL_KEYS = KEYS + ["pointing_minus_chance"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="adamatch_ablation.py JSON files, one per seed")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    runs = [json.loads(f.read_text()) for f in args.results]
    modes = sorted(set.intersection(*(set(r["modes"]) for r in runs)))
    if not modes:
        raise SystemExit("the files share no mode")
    table: dict[str, dict] = {}
    for mode in modes:
        per_seed = {
            str(r["seed"]): {k: r["modes"][mode]["metrics"].get(k, float("nan")) for k in KEYS} for r in runs
        }
        for v in per_seed.values():
            v["pointing_minus_chance"] = (
                v["localization.pointing_game"] - v["localization.pointing_game_chance"]
            )
        table[mode] = {
            "per_seed": per_seed,
            "mean": {k: statistics.fmean(v[k] for v in per_seed.values()) for k in ALL_KEYS},
            "sd": {
                k: (statistics.stdev(v[k] for v in per_seed.values()) if len(per_seed) > 1 else 0.0)
                for k in ALL_KEYS
            },
        }
    ratios = {}
    if {"adaptive", "grid"} <= set(modes):
        for seed in table["adaptive"]["per_seed"]:
            ratios[seed] = (
                table["adaptive"]["per_seed"][seed]["localization.box_iou"]
                / table["grid"]["per_seed"][seed]["localization.box_iou"]
            )
    seeds = ", ".join(str(r["seed"]) for r in runs)
    print(f"AdaMatch ablation over seeds {seeds} (test split, config {runs[0]['config']})")
    print(f"{'metric':34s}" + "  ".join(f"{m + ': mean+-sd (per seed)':36s}" for m in modes))
    for k in ALL_KEYS:
        cells = []
        for m in modes:
            vals = " ".join(f"{v[k]:.3f}" for v in table[m]["per_seed"].values())
            cells.append(f"{table[m]['mean'][k]:.3f}+-{table[m]['sd'][k]:.3f} ({vals})")
        print(f"{k:34s}" + "  ".join(f"{c:36s}" for c in cells))
    targets = {}
    if "adaptive" in table:
        a = table["adaptive"]["mean"]
        targets["pointing_game >= 0.6"] = a["localization.pointing_game"] >= 0.6
        targets["pointing_game - chance >= 0.3"] = a["pointing_minus_chance"] >= 0.3
        if ratios:
            targets["box_iou >= 1.5 x grid (every seed)"] = min(ratios.values()) >= 1.5
            print("box IoU adaptive / grid per seed:", {s: round(v, 2) for s, v in ratios.items()})
        for name, ok in targets.items():
            print(("MET  " if ok else "MISS ") + name)
    out = {
        "benchmark": "adamatch_seeds",
        "inputs": [str(f) for f in args.results],
        "config": runs[0]["config"],
        "data": runs[0]["data"],
        "modes": table,
        "box_iou_ratio_per_seed": ratios,
        "targets_on_means": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the diffusion head put density on the side its layout hint names? A diagnostic beside laterality accuracy.

For test reports with a positive finding on exactly one side (read by medvl's labeler), synthesize each scan twice
with the same seed: once with the report's side hint (``unet.side_maps``) and once with the hint's sides swapped,
everything else equal. If the head uses the hint, the half of the image the report names gets denser (brighter)
than it is under the swapped hint. Prints and writes, per run:

* ``sign_agreement``: share of reports whose named half gained density relative to the swapped-hint scan;
* ``mean_shift``: mean of that gain (image units, [-1024, 1024] scale) and its standard deviation;
* ``mean_abs_change``: mean absolute pixel change caused by swapping the hint.

This measures the hint's effect on pixels, not whether the finding is recognisable; ``image.laterality_accuracy``
(the evaluation classifier's side head on synthesized scans) is the contract metric.

    python benchmarks/diffusion_side_hint.py --run RUN --data DATA [--reports 48]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "diffusion_side_hint.json"


def half_asymmetry(x: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) -> (N,) mean of the image's right half minus its left half."""
    w = x.shape[-1]
    return (x[..., w // 2 :].mean((1, 2, 3)) - x[..., : w // 2].mean((1, 2, 3))).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a diffusion run trained with unet.side_maps")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset")
    p.add_argument("--reports", type=int, default=48)
    p.add_argument("--split", default="validate", help="whose reports are drawn from (default: validate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    import medvl.models.diffusion as dh
    from medvl.errors import MedvlError
    from medvl.inference.synthesize import Synthesizer

    try:
        syn = Synthesizer.load(args.run)
    except MedvlError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not syn.denoiser.unet_cfg.side_maps:
        raise SystemExit(f"{args.run} was trained without unet.side_maps: there is no hint to swap")
    index = pd.read_csv(args.data / "index.csv")
    reports = index.loc[index["split"] == args.split, "report"].astype(str).tolist()
    sides = dh.report_sides(reports)
    chosen = [(r, int(s[1] > 0)) for r, s in zip(reports, sides, strict=True) if float(s.sum()) == 1.0][
        : args.reports
    ]
    if not chosen:
        raise SystemExit("no test report states a finding on exactly one side")
    texts = [r for r, _ in chosen]
    # patient's left is the image's right on a PA film: expected sign of (right half - left half) gain
    expected = np.array([1.0 if left else -1.0 for _, left in chosen])

    stated = syn.synthesize_with_keypatches(texts, seed=args.seed).images.float()
    # Swap the hint's sides: halves swap their two flags; zone maps swap channels and mirror left to right, so
    # a left-base box becomes a right-base box.
    zones = syn.denoiser.conditioner.cfg.layout == "zones"
    name = "report_layout" if zones else "report_sides"
    original = getattr(dh, name)
    setattr(
        dh,
        name,
        (lambda *a, **k: original(*a, **k).flip(1).flip(-1)) if zones else (lambda t: original(t).flip(-1)),
    )
    try:
        swapped = syn.synthesize_with_keypatches(texts, seed=args.seed).images.float()
    finally:
        setattr(dh, name, original)
    gain = (half_asymmetry(stated) - half_asymmetry(swapped)) * expected
    result = {
        "benchmark": "diffusion_side_hint",
        "run": str(args.run),
        "data": str(args.data),
        "reports": len(texts),
        "seed": args.seed,
        "layout": syn.denoiser.conditioner.cfg.layout,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "sign_agreement": float((gain > 0).mean()),
        "mean_shift": float(gain.mean()),
        "shift_std": float(gain.std()),
        "mean_abs_change": float((stated - swapped).abs().mean()),
    }
    print(f"{len(texts)} one-sided test reports, run {args.run}")
    print("| measure | value |\n|---|---:|")
    for k in ("sign_agreement", "mean_shift", "shift_std", "mean_abs_change"):
        print(f"| {k} | {result[k]:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

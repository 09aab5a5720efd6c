"""Seconds per synthesized scan: the run's default sampler against the MONAI-recipe baseline, same UNet.

    python benchmarks/sampling_speed.py --run RUN --data DATA [--reports 256] [--batch 16] [--device cpu]

Rows (all with the run's classifier-free guidance, conditional and unconditional halves batched):

* ``default``: the sampler saved in the run (DPM-Solver++(2M), 20 steps in the demo preset), bf16 autocast
  where the device supports it (``precision: auto``: CUDA with bf16; fp32 on CPU);
* ``monai_recipe``: MONAI's recipe, DDIM 50 steps, fp32;
* extra rows: DDIM 20 steps and DPM-Solver++(2M) 10 steps (fp32), to separate solver order from step count.

Each row synthesizes the same test reports with the same seeds and reports wall seconds per image (after a
warm-up batch, model loading excluded) and the label AUROC of the dataset's evaluation classifier on those
images (macro, Cardiomegaly, Pleural Effusion): speed means nothing if the images stop carrying the report.
Prints a table and writes ``benchmarks/results/sampling_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def run_row(
    synth,
    reports,
    labels,
    classifier,
    *,
    sampler: str,
    steps: int,
    guidance: float,
    precision: str,
    batch: int,
    seed: int = 0,
) -> dict:
    from medvl.eval.classifier import label_aurocs, predict

    synth.synthesize(
        reports[:batch],
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        seed=seed,
        batch_size=batch,
        precision=precision,
    )  # warm-up
    if synth.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = []
    for i in range(0, len(reports), batch):
        images.append(
            synth.synthesize(
                reports[i : i + batch],
                steps=steps,
                guidance=guidance,
                sampler=sampler,
                seed=seed + i,
                batch_size=batch,
                precision=precision,
            )
        )
    if synth.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images = torch.cat(images).numpy()
    probs, _, _ = predict(classifier, images)
    aucs = label_aurocs(probs, labels)
    return {
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "precision": precision,
        "batch": batch,
        "images": len(reports),
        "seconds": round(seconds, 2),
        "s_per_image": seconds / len(reports),
        "label_auroc": float(np.mean(list(aucs.values()))) if aucs else float("nan"),
        "auroc_cardiomegaly": aucs.get("Cardiomegaly", float("nan")),
        "auroc_pleural_effusion": aucs.get("Pleural Effusion", float("nan")),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a diffusion run")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset (test reports, classifier)")
    p.add_argument("--reports", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-extra", action="store_true", help="only the default and the MONAI-recipe rows")
    args = p.parse_args(argv)

    from medvl.eval.classifier import ClassifierConfig, load_split
    from medvl.inference.synthesize import Synthesizer
    from medvl.train.classifier import load_or_train_classifier

    synth = Synthesizer.load(args.run, device=args.device)
    classifier, _ = load_or_train_classifier(args.data, ClassifierConfig(), device=synth.device)
    test = load_split(args.data, "test", synth.image_size, limit=args.reports)
    reports = [" ".join(r.split()) for r in test.reports]
    g = float(synth.sampler.guidance)
    rows = {
        "default": dict(
            sampler=synth.sampler.name.value,
            steps=synth.sampler.steps,
            guidance=g,
            precision=synth.sampler.precision.value,
        ),
        "monai_recipe": dict(sampler="ddim", steps=50, guidance=g, precision="fp32"),
    }
    if not args.no_extra:
        rows["ddim_20"] = dict(sampler="ddim", steps=20, guidance=g, precision="fp32")
        rows["dpm_solver_2m_10"] = dict(sampler="dpm_solver_2m", steps=10, guidance=g, precision="fp32")
    results = {}
    for name, spec in rows.items():
        results[name] = run_row(synth, reports, test.labels, classifier, batch=args.batch, **spec)
        r = results[name]
        print(
            f"  {name}: {r['s_per_image']:.4f} s/image, label AUROC {r['label_auroc']:.3f}", file=sys.stderr
        )
    base = results["monai_recipe"]["s_per_image"]
    device = synth.device
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(
        f"\nSampling speed on {device_name}, {len(reports)} test reports, batch {args.batch}, run {args.run}\n"
    )
    print(
        "| row | sampler | steps | precision | s/image | speed-up | label AUROC | Cardiomegaly | Effusion |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['sampler']} | {r['steps']} | {r['precision']} | {r['s_per_image']:.4f} | "
            f"{base / r['s_per_image']:.1f}x | {r['label_auroc']:.3f} | {r['auroc_cardiomegaly']:.3f} | "
            f"{r['auroc_pleural_effusion']:.3f} |"
        )
    out = args.out or REPO / "benchmarks" / "results" / f"sampling_speed_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": device_name,
                "torch": torch.__version__,
                "run": str(args.run),
                "data": str(args.data),
                "reports": len(reports),
                "batch": args.batch,
                "rows": results,
                "command": "python benchmarks/sampling_speed.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seconds per synthesized scan: the run's default sampler, faster ones and a distilled student against the
MONAI-recipe baseline, same UNet, side by side in one process.

    python benchmarks/sampling_speed.py --run RUN --data DATA [--student RUN_FAST] [--split validate]
        [--reports 256] [--batch 8 64] [--device cpu]

Rows (the teacher's with its classifier-free guidance, conditional and unconditional halves batched):

* ``monai_recipe``: MONAI's recipe, DDIM 50 steps, fp32 (two network passes per step);
* ``default``: the sampler saved in the run (DPM-Solver++(2M), 20 steps in the demo preset), bf16 autocast
  where the device supports it (``precision: auto``: CUDA with bf16; fp32 on CPU);
* extra rows: DDIM 20 steps, DPM-Solver++(2M) 10 and 5 steps (fp32), to separate solver order from step count;
* with ``--student``: the distilled student (``medvl train distill``) with its own sampler and steps (guidance
  built in: one pass per step), and the same at 2 steps and at 1.

Each row synthesizes the same reports of ``--split`` with the same seeds and reports wall seconds per image
(after a warm-up batch, model loading excluded) and the label AUROC of the dataset's evaluation classifier on
those images (macro with a study-bootstrap interval, Cardiomegaly, Pleural Effusion): speed means nothing if the
images stop carrying the report. ``equal_auroc`` says whether a row's macro AUROC lies inside the recipe's
interval. Compare samplers on ``--split validate``; the test split is for a final figure. Prints a table per
batch size and writes ``benchmarks/results/sampling_speed_<device>.json``.
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
    studies=None,
) -> dict:
    from medvl.eval.bootstrap import StudyResampler
    from medvl.eval.classifier import label_aurocs, predict
    from medvl.eval.image import auroc_intervals

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
    ci = auroc_intervals(probs, labels, StudyResampler(studies))["macro"] if studies else None
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
        "label_auroc_ci": ci,
        "auroc_cardiomegaly": aucs.get("Cardiomegaly", float("nan")),
        "auroc_pleural_effusion": aucs.get("Pleural Effusion", float("nan")),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a diffusion run (the teacher)")
    p.add_argument("--data", type=Path, required=True, help="the prepared dataset (reports, classifier)")
    p.add_argument(
        "--student", type=Path, default=None, help="a distilled student of --run (medvl train distill)"
    )
    p.add_argument("--split", choices=["validate", "test"], default="test")
    p.add_argument("--reports", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-extra", action="store_true", help="only the default, recipe and student rows")
    args = p.parse_args(argv)

    from medvl.eval.classifier import ClassifierConfig, load_split
    from medvl.inference.synthesize import Synthesizer
    from medvl.train.classifier import load_or_train_classifier

    synth = Synthesizer.load(args.run, device=args.device)
    classifier, _ = load_or_train_classifier(args.data, ClassifierConfig(), device=synth.device)
    split = load_split(args.data, args.split, synth.image_size, limit=args.reports)
    reports = [" ".join(r.split()) for r in split.reports]
    g = float(synth.sampler.guidance)
    rows = {
        "monai_recipe": (synth, dict(sampler="ddim", steps=50, guidance=g, precision="fp32")),
        "default": (
            synth,
            dict(
                sampler=synth.sampler.name.value,
                steps=synth.sampler.steps,
                guidance=g,
                precision=synth.sampler.precision.value,
            ),
        ),
    }
    if not args.no_extra:
        rows["ddim_20"] = (synth, dict(sampler="ddim", steps=20, guidance=g, precision="fp32"))
        rows["dpm_solver_2m_10"] = (
            synth,
            dict(sampler="dpm_solver_2m", steps=10, guidance=g, precision="fp32"),
        )
        rows["dpm_solver_2m_5"] = (
            synth,
            dict(sampler="dpm_solver_2m", steps=5, guidance=g, precision="fp32"),
        )
    if args.student is not None:
        student = Synthesizer.load(args.student, device=synth.device)
        if student.distilled is None:
            p.error(f"--student {args.student} is not a distilled student (medvl train distill)")
        own = dict(
            sampler=student.sampler.name.value,
            steps=student.sampler.steps,
            guidance=float(student.sampler.guidance),
            precision=student.sampler.precision.value,
        )
        rows["student"] = (student, own)
        for steps in (2, 1):
            if steps < own["steps"]:
                rows[f"student_{steps}"] = (student, {**own, "steps": steps})
    device = synth.device
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    by_batch = {}
    for batch in args.batch:
        results = {}
        for name, (model, spec) in rows.items():
            results[name] = run_row(
                model, reports, split.labels, classifier, batch=batch, studies=split.study_ids, **spec
            )
            r = results[name]
            print(
                f"  batch {batch} {name}: {r['s_per_image']:.4f} s/image, label AUROC {r['label_auroc']:.3f}",
                file=sys.stderr,
            )
        recipe = results["monai_recipe"]
        lo, hi = recipe["label_auroc_ci"] or (float("nan"), float("nan"))
        for r in results.values():
            r["speedup_vs_recipe"] = recipe["s_per_image"] / r["s_per_image"]
            r["equal_auroc"] = bool(lo <= r["label_auroc"] <= hi)
        by_batch[str(batch)] = results
        print(
            f"\nSampling speed on {device_name}, {len(reports)} {args.split} reports, batch {batch}, "
            f"run {args.run}\n"
        )
        print(
            "| row | sampler | steps | passes/step | s/image | speed-up | label AUROC [95% CI] | inside recipe's "
            "interval | Cardiomegaly | Effusion |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            passes = 1 if r["guidance"] in (0.0, 1.0) else 2
            ci = r["label_auroc_ci"]
            ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            print(
                f"| {name} | {r['sampler']} | {r['steps']} | {passes} | {r['s_per_image']:.4f} | "
                f"{r['speedup_vs_recipe']:.1f}x | {r['label_auroc']:.3f}{ci_text} | "
                f"{'yes' if r['equal_auroc'] else 'no'} | {r['auroc_cardiomegaly']:.3f} | "
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
                "student": str(args.student) if args.student else None,
                "data": str(args.data),
                "split": args.split,
                "reports": len(reports),
                "batches": args.batch,
                "rows": by_batch,
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

"""A trained report head's reports through medvl's decoding and through transformers' ``generate()``, side by side.

``ReportGenerator.generate`` over every scan of a split (AdaMatch encoding and keyword hints included) with
``ReportHead.generate(engine="medvl")`` (the default) and ``engine="transformers"``, alternating, best time of each;
counts the reports whose text and whose score are the same. ``tests/models/test_decoding.py`` checks the sameness on
small random heads; this checks it on a trained one.

Run::

    python benchmarks/decode_same_reports.py --run demo/runs/report --data demo/data --split validate --beams 1 3

Writes ``benchmarks/results/decode_same_reports.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch

from medvl.data.prepared import PreparedDataset
from medvl.inference.generate import ReportGenerator
from medvl.models.report_head import ReportHead

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("transformers", "medvl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a report run")
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset")
    p.add_argument("--split", default="validate")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "decode_same_reports.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = PreparedDataset(args.data, args.split)
    gen = ReportGenerator.load(args.run)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    original = ReportHead.generate
    rows = []
    try:
        for beams in args.beams:
            best = {e: float("inf") for e in ENGINES}
            reports = {}
            for _ in range(args.repeats):
                for engine in ENGINES:
                    ReportHead.generate = functools.partialmethod(original, engine=engine)
                    t0 = time.perf_counter()
                    reports[engine] = gen.generate(images, beams=beams)
                    best[engine] = min(best[engine], time.perf_counter() - t0)
            ref, ours = reports["transformers"], reports["medvl"]
            row = {
                "beams": beams,
                "scans": len(ds),
                "same_text": sum(a.text == b.text for a, b in zip(ref, ours, strict=True)),
                "same_score": sum(a.score == b.score for a, b in zip(ref, ours, strict=True)),
                "medvl_s": best["medvl"],
                "transformers_s": best["transformers"],
                "speedup": best["transformers"] / best["medvl"],
            }
            rows.append(row)
            print(row, flush=True)
    finally:
        ReportHead.generate = original
    env = {
        "run": str(args.run),
        "data": str(args.data),
        "split": args.split,
        "batch_size": gen.generation.batch_size,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print("\n| beams | scans | same text | same score | medvl (s) | generate() (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['beams']} | {r['scans']} | {r['same_text']} | {r['same_score']} | {r['medvl_s']:.2f} | "
            f"{r['transformers_s']:.2f} | x{r['speedup']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

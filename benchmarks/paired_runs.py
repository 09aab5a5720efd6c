"""Two report-head configurations over several training seeds, scored on the same studies, with a paired interval.

Each argument names the predictions file ``medvl evaluate report --out FILE.json`` writes beside its JSON
(``FILE.predictions.csv``: study id, reference, generated). Runs are given as ``A:PATH`` and ``B:PATH``, one per
seed and arm; every file must hold the same studies. For each run the script labels the generated reports with
medvl's labeler and computes ``ce.micro5`` F1 (and micro F1 over 14 labels); the table lists every run, the mean
of each arm over its seeds and the mean difference B - A with a 95% bootstrap interval: 1,000 resamples of the
studies (seed 0), each recomputing every run's F1 on the resample, then the difference of the arm means. A run of
one arm is not paired with a particular run of the other; the studies are.

Run, e.g. the shared memory ablation of the report head:

    python benchmarks/paired_runs.py --a-name memory --b-name "no memory" \\
        A:val_mem0.predictions.csv A:val_mem1.predictions.csv A:val_mem2.predictions.csv \\
        B:val_nomem0.predictions.csv B:val_nomem1.predictions.csv B:val_nomem2.predictions.csv \\
        --out benchmarks/results/memory_ablation_seed7.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from medvl.eval.bootstrap import StudyResampler
from medvl.eval.clinical import label_reports, positives
from medvl.text.chexpert import CHEXPERT_5, CHEXPERT_LABELS

FIVE = [CHEXPERT_LABELS.index(name) for name in CHEXPERT_5]


def f1_terms(reference: list[str], generated: list[str]) -> dict[str, np.ndarray]:
    """Per study: 2 TP and 2 TP + FP + FN, summed over the five labels (micro5) and over all 14 (micro)."""
    ref, gen = positives(label_reports(reference)), positives(label_reports(generated))
    tp, fp, fn = (ref & gen), (~ref & gen), (ref & ~gen)
    out = {}
    for name, cols in (("micro5", FIVE), ("micro", list(range(len(CHEXPERT_LABELS))))):
        t, f, n = tp[:, cols].sum(1), fp[:, cols].sum(1), fn[:, cols].sum(1)
        out[name] = np.stack([2 * t, 2 * t + f + n], axis=1).astype(np.float64)
    return out


def ratio(terms: np.ndarray, index: np.ndarray | None = None) -> float:
    sums = terms.sum(0) if index is None else terms[index].sum(0)
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="A:PATH or B:PATH, a predictions CSV per seed and arm")
    parser.add_argument("--a-name", default="A")
    parser.add_argument("--b-name", default="B")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    arms: dict[str, list[tuple[str, dict[str, np.ndarray]]]] = {"A": [], "B": []}
    studies = None
    for spec in args.runs:
        arm, _, path = spec.partition(":")
        if arm not in arms or not path:
            parser.error(f"{spec!r}: give runs as A:PATH or B:PATH")
        table = pd.read_csv(path, dtype={"study_id": str}, keep_default_na=False).sort_values("study_id")
        ids = table["study_id"].tolist()
        if studies is None:
            studies = ids
        elif ids != studies:
            parser.error(f"{path} does not hold the same studies as the first file")
        arms[arm].append((path, f1_terms(table["reference"].tolist(), table["generated"].tolist())))
    if not arms["A"] or not arms["B"]:
        parser.error("give at least one run of each arm")
    names = {"A": args.a_name, "B": args.b_name}
    result: dict = {"studies": len(studies), "runs": [], "arms": {}, "difference": {}}
    for arm, runs in arms.items():
        for path, terms in runs:
            result["runs"].append(
                {"arm": names[arm], "file": str(path), **{k: ratio(v) for k, v in terms.items()}}
            )
        result["arms"][names[arm]] = {
            k: float(np.mean([ratio(t[k]) for _, t in runs])) for k in ("micro5", "micro")
        }
    resampler = StudyResampler(studies)
    for key in ("micro5", "micro"):
        diffs = []
        for index in resampler.indices():
            mean = {arm: np.mean([ratio(t[key], index) for _, t in runs]) for arm, runs in arms.items()}
            diffs.append(mean["B"] - mean["A"])
        diffs = np.asarray(diffs)
        diffs = diffs[np.isfinite(diffs)]
        point = result["arms"][names["B"]][key] - result["arms"][names["A"]][key]
        result["difference"][key] = {
            "value": point,
            "ci": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
        }
    print(f"{result['studies']} studies; F1 by medvl's labeler (R2Gen convention)\n")
    print("| run | ce.micro5 F1 | ce.micro F1 |\n|---|---:|---:|")
    for r in result["runs"]:
        print(f"| {r['arm']}: {Path(r['file']).name} | {r['micro5']:.3f} | {r['micro']:.3f} |")
    for name, m in result["arms"].items():
        print(
            f"| **{name}, mean of {sum(r['arm'] == name for r in result['runs'])}** | {m['micro5']:.3f} | {m['micro']:.3f} |"
        )
    d5, d = result["difference"]["micro5"], result["difference"]["micro"]
    print(
        f"| **{names['B']} minus {names['A']}** | {d5['value']:+.3f} [{d5['ci'][0]:+.3f}, {d5['ci'][1]:+.3f}] "
        f"| {d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

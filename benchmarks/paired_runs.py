"""Two configurations over several training seeds, scored on the same studies, with a paired interval.

Report heads: each argument names the predictions file ``medvl evaluate report --out FILE.json`` writes beside its
JSON (``FILE.predictions.csv``: study id, reference, generated); the script labels the generated reports with
medvl's labeler and computes ``ce.micro5`` F1 (and micro F1 over 14 labels).

Diffusion heads: each argument names the record ``medvl evaluate diffusion --out FILE.json`` writes; its
``meta.scan_scores`` holds the evaluation classifier's probabilities on every synthesized scan and, per laterality
pair, whether the finding came out on the stated side. The script computes the Cardiomegaly and Pleural Effusion
AUROC, the macro AUROC over the labels with both classes, and the laterality accuracy.

Runs are given as ``A:PATH`` and ``B:PATH``, one per seed and arm; every file must hold the same studies. The table
lists every run, the mean of each arm over its seeds and the mean difference B - A with a 95% bootstrap interval:
1,000 resamples of the studies (seed 0), each recomputing every run's metrics on the resample, then the difference
of the arm means. A run of one arm is not paired with a particular run of the other; the studies are.

Run, e.g. the shared memory ablation of the report head:

    python benchmarks/paired_runs.py --a-name memory --b-name "no memory" \\
        A:val_mem0.predictions.csv A:val_mem1.predictions.csv A:val_mem2.predictions.csv \\
        B:val_nomem0.predictions.csv B:val_nomem1.predictions.csv B:val_nomem2.predictions.csv \\
        --out benchmarks/results/memory_ablation_seed7.json

and of the diffusion head, with ``A:val_mem0.json ...`` (the evaluation records) in place of the CSV files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from medvl.eval.bootstrap import StudyResampler, binary_auroc
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


REPORT_KEYS = {"micro5": "ce.micro5 F1", "micro": "ce.micro F1"}
DIFFUSION_KEYS = {
    "cardiomegaly": "Cardiomegaly AUROC",
    "effusion": "Pleural Effusion AUROC",
    "macro": "macro AUROC",
    "laterality": "laterality accuracy",
}


class ReportRun:
    """A report head's predictions CSV: ce F1 on any resample of its studies."""

    keys = REPORT_KEYS

    def __init__(self, path: str):
        table = pd.read_csv(path, dtype={"study_id": str}, keep_default_na=False).sort_values("study_id")
        self.studies = table["study_id"].tolist()
        self.terms = f1_terms(table["reference"].tolist(), table["generated"].tolist())

    def metrics(self, index: np.ndarray | None = None) -> dict[str, float]:
        return {k: ratio(v, index) for k, v in self.terms.items()}


class DiffusionRun:
    """A diffusion evaluation record: label AUROCs and laterality of its synthesized scans on any resample."""

    keys = DIFFUSION_KEYS

    def __init__(self, path: str):
        record = json.loads(Path(path).read_text())
        # RUN/eval/diffusion-<split>.json wraps the record that the --out file holds as it is
        record = record.get("metrics", record)
        scores = record.get("meta", {}).get("scan_scores") or {}
        if "studies" not in scores:
            raise ValueError(
                f"{path}: no per-study scores (meta.scan_scores.studies); re-run medvl evaluate diffusion"
            )
        order = np.argsort(scores["studies"], kind="stable")
        self.studies = [scores["studies"][i] for i in order]
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        names = scores["labels"]
        self.probs = np.asarray(scores["synthesized"], dtype=np.float64)[order]
        self.positive = np.asarray(scores["positive"], dtype=bool)[order]
        self.columns = {
            "cardiomegaly": names.index("Cardiomegaly"),
            "effusion": names.index("Pleural Effusion"),
        }
        both = self.positive.any(0) & ~self.positive.all(0)
        self.macro_columns = np.flatnonzero(both)
        lat = scores.get("laterality") or {"pairs": [], "synthesized": []}
        self.pair_scan = rank[np.asarray([p[0] for p in lat["pairs"]], dtype=np.int64)]
        self.pair_hits = np.asarray(lat["synthesized"], dtype=np.float64)

    def metrics(self, index: np.ndarray | None = None) -> dict[str, float]:
        index = np.arange(len(self.studies)) if index is None else index
        probs, positive = self.probs[index], self.positive[index]

        def auroc(k: int) -> float:
            value = binary_auroc(probs[:, k], positive[:, k])
            return float("nan") if value is None else value

        macro = [auroc(k) for k in self.macro_columns]
        out = {name: auroc(k) for name, k in self.columns.items()}
        out["macro"] = float(np.nanmean(macro)) if np.isfinite(macro).any() else float("nan")
        # A scan drawn c times counts each of its laterality pairs c times.
        weight = np.bincount(index, minlength=len(self.studies))[self.pair_scan].astype(np.float64)
        out["laterality"] = (
            float((weight * self.pair_hits).sum() / weight.sum()) if weight.sum() else float("nan")
        )
        return out


def load_run(path: str) -> ReportRun | DiffusionRun:
    return DiffusionRun(path) if path.endswith(".json") else ReportRun(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs",
        nargs="+",
        help="A:PATH or B:PATH, a report predictions CSV or a diffusion record per seed and arm",
    )
    parser.add_argument("--a-name", default="A")
    parser.add_argument("--b-name", default="B")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    arms: dict[str, list[tuple[str, ReportRun | DiffusionRun]]] = {"A": [], "B": []}
    studies = None
    kinds = set()
    for spec in args.runs:
        arm, _, path = spec.partition(":")
        if arm not in arms or not path:
            parser.error(f"{spec!r}: give runs as A:PATH or B:PATH")
        try:
            run = load_run(path)
        except ValueError as exc:
            parser.error(str(exc))
        kinds.add(type(run))
        if studies is None:
            studies = run.studies
        elif run.studies != studies:
            parser.error(f"{path} does not hold the same studies as the first file")
        arms[arm].append((path, run))
    if not arms["A"] or not arms["B"]:
        parser.error("give at least one run of each arm")
    if len(kinds) > 1:
        parser.error("give report predictions or diffusion records, not both")
    keys = kinds.pop().keys
    names = {"A": args.a_name, "B": args.b_name}
    result: dict = {"studies": len(studies), "runs": [], "arms": {}, "difference": {}}
    for arm, runs in arms.items():
        scored = [{"arm": names[arm], "file": str(path), **run.metrics()} for path, run in runs]
        result["runs"].extend(scored)
        result["arms"][names[arm]] = {k: float(np.mean([r[k] for r in scored])) for k in keys}
    diffs: dict[str, list[float]] = {k: [] for k in keys}
    for index in StudyResampler(studies).indices():
        per_run = {arm: [run.metrics(index) for _, run in runs] for arm, runs in arms.items()}
        for k in keys:
            diffs[k].append(np.mean([m[k] for m in per_run["B"]]) - np.mean([m[k] for m in per_run["A"]]))
    for k in keys:
        values = np.asarray(diffs[k])
        values = values[np.isfinite(values)]
        result["difference"][k] = {
            "value": result["arms"][names["B"]][k] - result["arms"][names["A"]][k],
            "ci": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))],
        }
    note = (
        "F1 by medvl's labeler (R2Gen convention)"
        if keys is REPORT_KEYS
        else "synthesized scans, evaluation classifier"
    )
    print(f"{result['studies']} studies; {note}\n")
    print("| run | " + " | ".join(keys.values()) + " |\n|---|" + "---:|" * len(keys))
    for r in result["runs"]:
        print(f"| {r['arm']}: {Path(r['file']).name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    for name, m in result["arms"].items():
        count = sum(r["arm"] == name for r in result["runs"])
        print(f"| **{name}, mean of {count}** | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    cells = []
    for k in keys:
        d = result["difference"][k]
        cells.append(f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
    print(f"| **{names['B']} minus {names['A']}** | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

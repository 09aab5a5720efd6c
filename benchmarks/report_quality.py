"""Report head quality on IU-Phantom: the head, its two ablations, two baselines, one table.

Trains (through ``medvl train report``, the shared loop, selection on validation only)::

    WORK/report                          the report head (configs/report/<config>.yaml)
    WORK/report/ablations/no_memory      same, model.use_memory=false
    WORK/report/ablations/no_keywords    same, model.use_keywords=false

then scores all of them once on the test split with ``medvl evaluate report`` (which adds the
most-frequent-report and AdaMatch-retrieval baselines), prints a table, checks the quality bars below
and writes ``benchmarks/results/report_quality.json``.

Run::

    medvl prepare phantom --out /tmp/iu_phantom --size 128
    medvl train adamatch --config demo --data /tmp/iu_phantom --out /tmp/runs/adamatch
    python benchmarks/report_quality.py --data /tmp/iu_phantom --adamatch /tmp/runs/adamatch --work /tmp/runs

Quality bars: ``ce.micro5.f1`` >= most-frequent baseline + 0.4; ``ce.micro.f1`` above that baseline;
Cardiomegaly F1 >= 0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "report_quality.json"
ROWS = (
    ("report head", ""),
    ("ablation: no memory", "ablations.no_memory."),
    ("ablation: no keyword hints", "ablations.no_keywords."),
    ("baseline: most frequent report", "baselines.most_frequent."),
    ("baseline: AdaMatch retrieval", "baselines.retrieval."),
)
COLUMNS = (
    "ce.micro5.f1",
    "ce.micro.f1",
    "ce.macro.f1",
    "ce.per_label.Cardiomegaly.f1",
    "ce.per_label.Pleural Effusion.f1",
    "nlg.bleu4",
    "nlg.cider",
    "nlg.meteor",
    "nlg.rouge_l",
)
ABLATIONS = {"no_memory": ["model.use_memory=false"], "no_keywords": ["model.use_keywords=false"]}


def train(run: Path, args: argparse.Namespace, extra: list[str]) -> float:
    from medvl.train.stages import run_stage

    if (run / "stage.json").exists() and args.reuse:
        return json.loads((run / "stage.json").read_text()).get("seconds", float("nan"))
    t0 = time.perf_counter()
    run_stage(
        "report",
        config=args.config,
        data=args.data,
        out=run,
        from_runs=[args.adamatch],
        overrides=[*args.set, *extra],
    )
    return time.perf_counter() - t0


def score_with_beams(run: Path, data: Path, beams: int, split: str = "validate") -> dict[str, float]:
    """The report head's metrics on ``split`` decoded with ``beams`` (keys ``decoding.beam<N>.*``)."""
    from medvl.eval.clinical import label_reports
    from medvl.eval.nlg import NLGScorer
    from medvl.eval.report import _run_config, generate_for_split, score_reports
    from medvl.inference.generate import ReportGenerator
    from medvl.train.stages.report import report_split

    test = report_split(data, split, _run_config(run).data)
    refs = [str(r) for r in test.index["report"]]
    texts = generate_for_split(ReportGenerator.load(run), test, beams=beams, desc=f"beam {beams}")
    with NLGScorer() as scorer:
        metrics, _ = score_reports(scorer, refs, label_reports(refs), texts, prefix=f"decoding.beam{beams}.")
    return metrics


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--adamatch", type=Path, required=True, help="a finished AdaMatch run")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--config", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument(
        "--split",
        default="validate",
        help="split the configurations are compared on (default: validate; test once)",
    )
    p.add_argument("--reuse", action="store_true", help="keep finished runs under WORK")
    p.add_argument(
        "--also-beams",
        type=int,
        nargs="*",
        default=[3],
        help="also score the report head decoded with these beam widths (reported, not selected on)",
    )
    args = p.parse_args()

    from medvl.eval.report import evaluate_report

    main_run = args.work / "report"
    seconds = {"report": train(main_run, args, [])}
    if not args.no_ablations:
        for name, extra in ABLATIONS.items():
            seconds[f"ablation {name}"] = train(main_run / "ablations" / name, args, extra)
    t0 = time.perf_counter()
    out = args.work / "eval" / "report.json"
    record = evaluate_report(run=main_run, data=args.data, split=args.split, out=out)
    seconds["evaluate"] = time.perf_counter() - t0
    rows = list(ROWS)
    for beams in args.also_beams:
        rows.insert(1, (f"report head, beam {beams}", f"decoding.beam{beams}."))
        record.update(score_with_beams(main_run, args.data, beams, args.split))

    print(
        f"\nIU-Phantom test split, {record['meta']['num_samples']} studies "
        f"({record['meta']['conventions']['decoding']})\n"
    )
    print("| | " + " | ".join(c.replace("ce.per_label.", "F1 ").replace(".f1", "") for c in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for label, prefix in rows:
        if not any(k.startswith(prefix) for k in record if prefix):
            if prefix:
                continue
        print(f"| {label} | " + " | ".join(fmt(record.get(prefix + c)) for c in COLUMNS) + " |")
    base = "baselines.most_frequent."
    targets = {
        "ce.micro5.f1 >= most_frequent + 0.4": record["ce.micro5.f1"] >= record[base + "ce.micro5.f1"] + 0.4,
        "ce.micro.f1 > most_frequent": record["ce.micro.f1"] > record[base + "ce.micro.f1"],
        "Cardiomegaly F1 >= 0.6": (record.get("ce.per_label.Cardiomegaly.f1") or 0.0) >= 0.6,
    }
    print()
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": f"python benchmarks/report_quality.py --data {args.data} --adamatch {args.adamatch} "
                f"--work {args.work} --config {args.config}" + "".join(f" --set {s}" for s in args.set),
                "metrics": {k: v for k, v in record.items() if k != "meta"},
                "meta": record["meta"],
                "targets": targets,
                "seconds": seconds,
                "cpu_count": os.cpu_count(),
                "load_average_1min": os.getloadavg()[0],
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

"""The headline table: each model beside its no-pixel or trivial baseline, with 95% bootstrap intervals.

Reads a demo's ``metrics.json`` (``medvl demo --preset full --seed 7 --out DIR``: a phantom seed no preset was
tuned on), prints a Markdown table (the one in README.md and docs/results.md) and writes the rows as JSON.

Run: ``python benchmarks/headline_table.py DIR/metrics.json [--out benchmarks/results/headline_seed7.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "headline_seed7.json"

P5 = "Pleural Effusion"
# (what, model key, [(baseline name, baseline key)]); a key's interval is "<key>_ci".
ROWS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "AdaMatch pointing game",
        "localization.pointing_game",
        [
            ("text-only prior", "localization.pointing_game_prior"),
            ("image centre", "localization.pointing_game_centre"),
        ],
    ),
    ("  model minus prior (paired)", "localization.pointing_game_gap_prior", []),
    (
        "  the diffusion head's cross-attention on the real scans, hinted head",
        "grounding.localization.pointing_game",
        [
            ("text-only head", "ablations.layout_none.grounding.localization.pointing_game"),
            ("chance", "grounding.localization.pointing_game_chance"),
        ],
    ),
    (
        "  on pairs whose report states no side",
        "localization.pointing_game_unstated",
        [("text-only prior", "localization.pointing_game_prior_unstated")],
    ),
    ("AdaMatch box IoU", "localization.box_iou", [("text-only prior", "localization.box_iou_prior")]),
    ("AdaMatch report -> image R@5", "retrieval.t2i_r5", []),
    (
        "report head ce.micro5 F1",
        "ce.micro5.f1",
        [
            ("most frequent report", "baselines.most_frequent.ce.micro5.f1"),
            ("AdaMatch retrieval", "baselines.retrieval.ce.micro5.f1"),
            ("classifier + templates", "baselines.classifier_template.ce.micro5.f1"),
        ],
    ),
    ("  minus classifier + templates (paired)", "ce.micro5.f1_gap_classifier_template", []),
    ("  minus AdaMatch retrieval (paired)", "ce.micro5.f1_gap_retrieval", []),
    ("report head, share of reports repeating a sentence", "report.repeated_sentences", []),
    (
        "report head ce.micro F1 (14 labels)",
        "ce.micro.f1",
        [
            ("most frequent report", "baselines.most_frequent.ce.micro.f1"),
            ("classifier + templates", "baselines.classifier_template.ce.micro.f1"),
        ],
    ),
    (
        f"report head F1 {P5}",
        f"ce.per_label.{P5}.f1",
        [("classifier + templates", f"baselines.classifier_template.ce.per_label.{P5}.f1")],
    ),
    (
        "synthesized scans, laterality, text-only head",
        "ablations.layout_none.image.laterality_accuracy",
        [("hinted head (labeler-derived layout)", "image.laterality_accuracy")],
    ),
    (
        f"synthesized scans, AUROC {P5}, text-only head",
        f"ablations.layout_none.image.per_label.{P5}.auroc",
        [("hinted head", f"image.per_label.{P5}.auroc"), ("real scans", f"image.real_per_label.{P5}.auroc")],
    ),
    (
        "synthesized scans, AUROC Cardiomegaly, text-only head",
        "ablations.layout_none.image.per_label.Cardiomegaly.auroc",
        [
            ("hinted head", "image.per_label.Cardiomegaly.auroc"),
            ("real scans", "image.real_per_label.Cardiomegaly.auroc"),
        ],
    ),
    (
        "synthesized scans, macro AUROC, text-only head",
        "ablations.layout_none.image.label_auroc",
        [
            ("hinted head", "image.label_auroc"),
            ("unconditional (guidance 0)", "baselines.unconditional.image.label_auroc"),
        ],
    ),
    (
        "FID (classifier features), hinted head",
        "image.fid",
        [
            ("real validation vs real test", "image.fid_real_floor"),
            ("autoencoder reconstructions", "baselines.autoencoder_reconstruction.image.fid"),
            ("text-only head", "ablations.layout_none.image.fid"),
        ],
    ),
    (
        "report -> scan -> report, ce F1",
        "cyclic.report_image_report.ce_f1",
        [],
    ),
    (
        "scan -> report -> scan, macro AUROC (labels with 10+ positives)",
        "cyclic.image_report_image.label_auroc",
        [],
    ),
    (
        "scan -> report -> scan, AdaMatch cosine",
        "cyclic.image_report_image.adamatch_similarity",
        [("random pairs", "cyclic.image_report_image.adamatch_similarity_random_pair")],
    ),
]


def cell(metrics: dict, key: str) -> str:
    v = metrics.get(key)
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    ci = metrics.get(f"{key}_ci")
    digits = 1 if "fid" in key else 3
    text = f"{v:.{digits}f}"
    if ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", type=Path, help="a demo's metrics.json")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    metrics = json.loads(args.metrics.read_text())
    meta = metrics.get("meta", {})
    rows = []
    print(
        f"IU-Phantom seed {meta.get('phantom_seed')}, preset {meta.get('preset')}, test split; "
        "95% bootstrap intervals over studies in brackets"
    )
    print("| figure (`metrics.json` key) | model | beside it |")
    print("|---|---:|---|")
    for what, key, baselines in ROWS:
        side = "; ".join(f"{name} {cell(metrics, b)}" for name, b in baselines) or ""
        print(f"| {what} (`{key}`) | {cell(metrics, key)} | {side} |")
        rows.append(
            {
                "what": what,
                "key": key,
                "value": metrics.get(key),
                "ci": metrics.get(f"{key}_ci"),
                "baselines": {
                    name: {"key": b, "value": metrics.get(b), "ci": metrics.get(f"{b}_ci")}
                    for name, b in baselines
                },
            }
        )
    words = sorted(
        {
            k.split(".")[2]
            for k in metrics
            if k.startswith("localization.per_finding.") and k.endswith(".count")
        },
        key=lambda w: -metrics[f"localization.per_finding.{w}.count"],
    )
    per_word = {}
    print()
    print(
        "| finding word | pairs | pointing game | text-only prior | image centre | box IoU | prior box IoU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for w in words:
        base = f"localization.per_finding.{w}."
        row = {
            k: metrics.get(base + k)
            for k in (
                "count",
                "pointing_game",
                "pointing_game_prior",
                "pointing_game_centre",
                "box_iou",
                "box_iou_prior",
            )
        }
        per_word[w] = row
        if (row["count"] or 0) >= 10:
            vals = " | ".join(
                "-" if row[k] is None else f"{row[k]:.3f}"
                for k in (
                    "pointing_game",
                    "pointing_game_prior",
                    "pointing_game_centre",
                    "box_iou",
                    "box_iou_prior",
                )
            )
            print(f"| {w} | {row['count']} | {vals} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "source": str(args.metrics),
                "phantom_seed": meta.get("phantom_seed"),
                "preset": meta.get("preset"),
                "medvl_version": meta.get("medvl_version"),
                "timings_s": meta.get("timings_s"),
                "rows": rows,
                "per_finding_word": per_word,
                "command": f"python benchmarks/headline_table.py {args.metrics}",
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

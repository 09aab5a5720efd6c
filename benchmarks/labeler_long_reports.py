"""Time of medvl's report labeler against the length of one report: the labeler is linear in a report's length.

Three kinds of worst case, each built from real IU X-ray report text (``medvl.data.phantom.plan``) with a fixed
seed, at lengths from 1,000 to 100,000 characters:

* ``run-on``: IU reports with their full stops removed, so that a report is one long sentence (its clauses still
  end at ";", ":", "but"...);
* ``no-breaks``: the same with every sentence and clause break removed (commas, "but", "however"...): one clause;
* ``list``: "no" followed by a comma-separated list of findings, the densest text there is for mentions (one every
  15 characters), every one of them in the reach of the same cue.

Each mention's cues are read within ``medvl.text.negation.SCOPE_WINDOW_CHARS`` characters of it (a clause that
fits is read whole), so the time per character stays flat. The last column is the time per 1,000 characters.

Run: ``python benchmarks/labeler_long_reports.py`` (prints the table, writes
benchmarks/results/labeler_long_reports.json); ``--lengths 1000 10000`` for other lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

from medvl.data.phantom.plan import labelled_text, load_iu_reports
from medvl.text.labeler import extract_mentions, label_report
from medvl.text.negation import SCOPE_WINDOW_CHARS

LENGTHS = (1_000, 3_000, 10_000, 30_000, 100_000)
_BREAKS = (".", ";", ":", ",", " - ")
_CLAUSE_WORDS = (
    "but",
    "however",
    "although",
    "though",
    "whereas",
    "except",
    "otherwise",
    "yet",
    "nevertheless",
)
_LIST_ITEMS = (
    "pleural effusion",
    "pneumothorax",
    "consolidation",
    "edema",
    "cardiomegaly",
    "nodule",
    "opacity",
    "atelectasis",
    "fracture",
    "mass",
    "pneumonia",
)


def _iu_text(length: int, rng: random.Random, texts: list[str], *, no_breaks: bool) -> str:
    parts, size = [], 0
    while size < length:
        text = rng.choice(texts).replace(".", " ")
        if no_breaks:
            for mark in _BREAKS:
                text = text.replace(mark, " ")
            text = " ".join(w for w in text.split() if w.lower() not in _CLAUSE_WORDS)
        parts.append(" ".join(text.split()))
        size += len(parts[-1]) + 1
    return " ".join(parts)[:length]


def _list_text(length: int, rng: random.Random) -> str:
    parts, size = ["No"], 2
    while size < length:
        parts.append(rng.choice(_LIST_ITEMS) + ",")
        size += len(parts[-1]) + 1
    return " ".join(parts)[:length]


def build(kind: str, length: int, seed: int = 0) -> str:
    """A report of ``kind`` (run-on, no-breaks, list) and ``length`` characters."""
    rng = random.Random(f"{kind}-{length}-{seed}")
    if kind == "list":
        return _list_text(length, rng)
    texts = [labelled_text(r) for r in load_iu_reports()]
    return _iu_text(length, rng, texts, no_breaks=kind == "no-breaks")


def time_one(report: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        label_report(report)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per report")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "labeler_long_reports.json"
    )
    args = parser.parse_args()
    rows = []
    print(f"{'kind':<10} {'characters':>10} {'mentions':>9} {'seconds':>8} {'ms / 1,000 chars':>17}")
    for kind in ("run-on", "no-breaks", "list"):
        for length in args.lengths:
            report = build(kind, length)
            seconds = time_one(report, args.repeats)
            mentions = len(extract_mentions(report))
            rows.append({"kind": kind, "characters": len(report), "mentions": mentions, "seconds": seconds})
            print(
                f"{kind:<10} {len(report):>10,} {mentions:>9,} {seconds:>8.3f} {1e6 * seconds / len(report):>17.2f}"
            )
    result = {
        "benchmark": "labeler_long_reports",
        "scope_window_chars": SCOPE_WINDOW_CHARS,
        "repeats": args.repeats,
        "rows": rows,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "command": "python benchmarks/labeler_long_reports.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

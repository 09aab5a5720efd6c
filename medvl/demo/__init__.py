"""``medvl demo``: the whole system on the embedded IU-Phantom dataset, in one command.

Stages run in order and each leaves a finished directory under ``OUT``; rerunning with the
same ``--out`` skips what is finished (a stage is finished when its run directory holds
``stage.json`` / its metrics file exists) and resumes a stage that was interrupted.

    OUT/data/                 prepared IU-Phantom
    OUT/runs/<stage>/         adamatch, report, autoencoder, diffusion (self-contained runs)
    OUT/eval/<kind>.json      per-stage metrics
    OUT/metrics.json          all metrics, one file
    OUT/report.html           the self-contained HTML report
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medvl.version import __version__

# Preset -> (phantom studies, image size, {stage: config preset name}, {stage: overrides})
PRESETS: dict[str, dict] = {
    "quick": {"studies": 800, "size": 128, "configs": "demo", "overrides": "quick",
              "classifier": {"steps": 150, "eval_every": 50}, "cyclic_studies": 64,
              "estimates": {"prepare IU-Phantom": 4, "train the evaluation classifier (real training scans)": 17,
                            "train adamatch": 85, "train report": 105, "train autoencoder": 31,
                            "train diffusion": 86, "evaluate adamatch": 1, "evaluate report": 7,
                            "evaluate diffusion": 18, "evaluate cyclic": 8}},
    "full": {"studies": None, "size": 128, "configs": "demo", "overrides": None,
             "classifier": {}, "cyclic_studies": 200,
             "estimates": {"prepare IU-Phantom": 10, "train the evaluation classifier (real training scans)": 55,
                           "train adamatch": 245, "train report": 450, "train autoencoder": 130,
                           "train diffusion": 1050, "evaluate adamatch": 10, "evaluate report": 40,
                           "evaluate diffusion": 85, "evaluate cyclic": 30}},
    # Not offered by the CLI: the tests' end-to-end run (tiny configs, seconds per stage, quality meaningless).
    "tiny": {"studies": 60, "size": 64, "configs": "tiny", "overrides": None,
             "classifier": {"steps": 20, "eval_every": 10, "channels": [8, 16]}, "cyclic_studies": 8},
}


@dataclass
class Step:
    name: str
    done: Callable[[], bool]
    run: Callable[[], None]
    estimate_s: float


def _log(msg: str) -> None:
    print(f"[medvl demo] {msg}", file=sys.stderr, flush=True)


def _stage_done(run: Path) -> bool:
    return (run / "stage.json").exists()


def quick_overrides(stage: str) -> list[str]:
    """Shorter schedules for ``--preset quick`` (the whole demo in under 10 minutes on 2 cores)."""
    from medvl.config import preset_overrides

    return preset_overrides("demo_quick", stage)


def build_steps(out: Path, preset: str) -> list[Step]:
    from medvl.data.prepared import META_FILE

    p = PRESETS[preset]
    data = out / "data"
    runs = out / "runs"
    evals = out / "eval"
    steps: list[Step] = []

    def prepare() -> None:
        from medvl.data.phantom import prepare_phantom

        prepare_phantom(data, studies=p["studies"], size=p["size"], seed=0, workers=2)

    steps.append(Step("prepare IU-Phantom", lambda: (data / META_FILE).exists() and (data / "index.csv").exists(),
                      prepare, 60))

    def classifier_config():
        from medvl.eval.classifier import ClassifierConfig

        return ClassifierConfig(**p["classifier"])

    def train_classifier() -> None:
        from medvl.eval.classifier import load_or_train_classifier

        load_or_train_classifier(data, classifier_config())

    def classifier_done() -> bool:
        from medvl.eval.classifier import classifier_cache_dir

        return (classifier_cache_dir(data, classifier_config()) / "classifier.safetensors").is_file()

    steps.append(Step("train the evaluation classifier (real training scans)", classifier_done,
                      train_classifier, 60))

    def train(stage: str, from_runs: list[str]) -> Callable[[], None]:
        def _run() -> None:
            from medvl.train.stages import run_stage

            overrides = quick_overrides(stage) if p["overrides"] == "quick" else []
            run_dir = runs / stage
            run_stage(stage, config=p["configs"], data=data, out=run_dir,
                      from_runs=[runs / f for f in from_runs], overrides=overrides,
                      resume=(run_dir / "checkpoints").exists())

        return _run

    for stage, deps, est in (("adamatch", [], 300), ("report", ["adamatch"], 240),
                             ("autoencoder", [], 200), ("diffusion", ["adamatch", "report", "autoencoder"], 400)):
        steps.append(Step(f"train {stage}", (lambda s=stage: _stage_done(runs / s)), train(stage, deps), est))

    def evaluate(kind: str, run: str) -> Callable[[], None]:
        def _run() -> None:
            from medvl.eval import evaluate as _evaluate

            options: dict = {}
            if kind in ("diffusion", "cyclic"):
                options["classifier_config"] = classifier_config()
            if kind == "cyclic":
                options["max_studies"] = p["cyclic_studies"]
            _evaluate(kind, run=runs / run, data=data, split="test", out=evals / f"{kind}.json", **options)

        return _run

    for kind, run, est in (("adamatch", "adamatch", 30), ("report", "report", 60), ("diffusion", "diffusion", 120),
                           ("cyclic", "diffusion", 120)):
        steps.append(Step(f"evaluate {kind}", (lambda k=kind: (evals / f"{k}.json").exists()),
                          evaluate(kind, run), est))
    # Progress estimates: the preset's measured seconds per step on 2 idle CPU cores (README), where known.
    for step in steps:
        step.estimate_s = float(p.get("estimates", {}).get(step.name, step.estimate_s))
    return steps


def merge_metrics(out: Path, preset: str, timings: dict[str, float]) -> dict:
    merged: dict = {"meta": {"preset": preset, "medvl_version": __version__, "timings_s": timings, "stages": {}}}
    for path in sorted((out / "eval").glob("*.json")):
        record = json.loads(path.read_text())
        meta = record.pop("meta", {})
        merged["meta"]["stages"][path.stem] = meta
        merged.update(record)
    (out / "metrics.json").write_text(json.dumps(merged, indent=2))
    return merged


def run_demo(out: str | Path = "demo_out", preset: str = "quick") -> dict:
    """Build IU-Phantom, train every stage, evaluate, and write ``metrics.json`` and ``report.html``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = build_steps(out, preset)
    timings: dict[str, float] = {}
    remaining = sum(s.estimate_s for s in steps if not s.done())
    t_start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        if step.done():
            _log(f"({i}/{len(steps)}) {step.name}: already finished, kept")
            continue
        left = f"{remaining / 60:.0f} min" if remaining >= 90 else f"{remaining:.0f} s"
        _log(f"({i}/{len(steps)}) {step.name} ... (about {left} of work left on 2 CPU cores)")
        t0 = time.perf_counter()
        step.run()
        timings[step.name] = round(time.perf_counter() - t0, 1)
        remaining = max(0.0, remaining - step.estimate_s)
        _log(f"({i}/{len(steps)}) {step.name}: done in {timings[step.name]:.0f} s")
    merged = merge_metrics(out, preset, timings)
    from medvl.report.html import write_report

    write_report(out, out / "report.html")
    _log(f"finished in {time.perf_counter() - t_start:.0f} s: {out / 'metrics.json'}, {out / 'report.html'}")
    return merged

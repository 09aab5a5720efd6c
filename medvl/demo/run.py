"""``medvl demo``: the whole system on the embedded IU-Phantom dataset, in one command.

Steps run in order and each leaves a finished result under ``OUT``; rerunning with the same
``--out`` skips what is finished (a stage is finished when its run directory holds
``stage.json``, an evaluation when its metrics file exists) and resumes a stage that was
interrupted. The stages, their order, the runs each builds on and the evaluations come from
:mod:`medvl.registry`.

    OUT/data/                 prepared IU-Phantom
    OUT/runs/<stage>/         one self-contained run per registered stage
    OUT/runs/<variant>/       runs of a stage with other settings (VARIANTS), evaluated beside it
    OUT/eval/<kind>.json      per-evaluation metrics
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

import medvl.registry as registry
from medvl.config import preset_overrides
from medvl.data.phantom import prepare_phantom
from medvl.data.prepared import META_FILE
from medvl.eval import evaluate
from medvl.eval.classifier import ClassifierConfig, classifier_cache_dir
from medvl.report.html import write_report
from medvl.runs import is_finished
from medvl.train.classifier import load_or_train_classifier
from medvl.train.stages import run_stage
from medvl.version import __version__

# Preset -> phantom studies and image size, the config preset of every stage, the table of --set overrides
# (configs/<name>.yaml) or None, the evaluation classifier's settings, options of some evaluations, the VARIANTS
# it trains (all when the key is absent), and the measured seconds of each step on 2 idle CPU cores
# (docs/results.md) for the progress estimate.
PRESETS: dict[str, dict] = {
    "quick": {
        "studies": 800,
        "size": 128,
        "configs": "demo",
        "overrides": "demo_quick",
        "classifier": {"steps": 150, "eval_every": 50},
        "evaluate": {"cyclic": {"max_studies": 64}, "diffusion": {"grounding": True}},
        "variants": (),  # the text-only ablation belongs to the full preset: it would cost 2 of the 10 minutes
        # the few-step student too (about 17 minutes): `medvl train distill --config demo --from OUT/runs/diffusion`
        "skip_stages": ("distill",),
        "estimates": {
            "prepare IU-Phantom": 4,
            "train the evaluation classifier (real training scans)": 22,
            "train adamatch": 111,
            "train report": 123,
            "train autoencoder": 52,
            "train diffusion": 127,
            "evaluate adamatch": 1,
            "evaluate report": 12,
            "evaluate diffusion": 29,
            "evaluate cyclic": 12,
        },
    },
    "full": {
        "studies": None,
        "size": 128,
        "configs": "demo",
        "overrides": None,
        "classifier": {},
        "evaluate": {"cyclic": {"max_studies": None}, "diffusion": {"grounding": True}},  # every test study
        "estimates": {
            "prepare IU-Phantom": 10,
            "train the evaluation classifier (real training scans)": 55,
            "train adamatch": 245,
            "train report": 450,
            "train autoencoder": 130,
            "train diffusion": 1050,
            "train diffusion_text_only": 1050,
            "train distill": 1000,
            "evaluate adamatch": 10,
            "evaluate report": 40,
            "evaluate diffusion": 85,
            "evaluate cyclic": 30,
            "evaluate diffusion_text_only": 85,
            "evaluate distill": 60,
        },
    },
    # Not offered by the CLI: the tests' end-to-end run (tiny configs, seconds per stage, quality meaningless).
    "tiny": {
        "studies": 60,
        "size": 64,
        "configs": "tiny",
        "overrides": None,
        "classifier": {"steps": 20, "eval_every": 10, "channels": [8, 16]},
        "evaluate": {"cyclic": {"max_studies": 8}, "diffusion": {"grounding": True}},
    },
}
DEFAULT_ESTIMATE_S = 60.0  # a step the preset has no measurement for

#: Runs of a registered stage with other settings, trained and evaluated beside the stage's own run; their
#: metrics go under ``ablations.<name>.``. ``diffusion_text_only``: the diffusion head without the layout hint
#: (side / zone maps read from the report by medvl's labeler, the same reading that drew IU-Phantom), so that
#: what it draws where comes from the words alone.
VARIANTS: dict[str, dict] = {
    "diffusion_text_only": {
        "stage": "diffusion",
        "overrides": ["unet.side_maps=false", "condition.layout=none"],
        "ablation": "layout_none",
    },
}


#: Runs of a registered stage scored with another stage's evaluation; their metrics go under ``<prefix>.``.
#: ``distill``: the few-step student of the diffusion head, scored like the head itself.
STUDENTS: dict[str, dict] = {"distill": {"evaluation": "diffusion", "prefix": "distilled"}}


@dataclass
class Step:
    name: str
    done: Callable[[], bool]
    run: Callable[[], None]
    estimate_s: float = DEFAULT_ESTIMATE_S


def _log(msg: str) -> None:
    print(f"[medvl demo] {msg}", file=sys.stderr, flush=True)


def build_steps(out: Path, preset: str, seed: int = 0) -> list[Step]:
    """Prepare IU-Phantom, train the evaluation classifier, train every registered stage, run every
    registered evaluation: the demo's steps in order, each with its own test of being finished."""
    p = PRESETS[preset]
    data, runs, evals = out / "data", out / "runs", out / "eval"
    classifier = ClassifierConfig(**p["classifier"])
    variants = {name: VARIANTS[name] for name in p.get("variants", VARIANTS)}

    def prepare() -> None:
        prepare_phantom(data, studies=p["studies"], size=p["size"], seed=seed, workers=2)

    def train_classifier() -> None:
        load_or_train_classifier(data, classifier)

    def train(stage: str, name: str | None = None, extra: tuple[str, ...] = ()) -> None:
        overrides = preset_overrides(p["overrides"], stage) if p["overrides"] else []
        overrides = [*overrides, *extra]
        run_dir = runs / (name or stage)
        run_stage(
            stage,
            config=p["configs"],
            data=data,
            out=run_dir,
            from_runs=[runs / s for s in registry.stage(stage).sources],
            overrides=overrides,
            resume=(run_dir / "checkpoints").exists(),
        )

    def score(kind: str, name: str | None = None) -> None:
        spec = registry.evaluation(kind)
        options = dict(p["evaluate"].get(kind, {}))
        if spec.uses_classifier:
            options["classifier"] = classifier_cache_dir(data, classifier)  # trained by the step before
        run = runs / (name or spec.run)
        evaluate(kind, run=run, data=data, split="test", out=evals / f"{name or kind}.json", **options)

    steps = [
        Step(
            "prepare IU-Phantom",
            lambda: (data / META_FILE).exists() and (data / "index.csv").exists(),
            prepare,
        ),
        Step(
            "train the evaluation classifier (real training scans)",
            lambda: (classifier_cache_dir(data, classifier) / "model.safetensors").is_file(),
            train_classifier,
        ),
    ]
    stages = [stage for stage in registry.STAGES if stage not in p.get("skip_stages", ())]
    steps += [
        Step(f"train {stage}", (lambda s=stage: is_finished(runs / s)), (lambda s=stage: train(s)))
        for stage in stages
    ]
    for name, v in variants.items():
        steps.append(
            Step(
                f"train {name}",
                (lambda n=name: is_finished(runs / n)),
                (lambda n=name, v=v: train(v["stage"], n, tuple(v["overrides"]))),
            )
        )
    steps += [
        Step(f"evaluate {kind}", (lambda k=kind: (evals / f"{k}.json").exists()), (lambda k=kind: score(k)))
        for kind in registry.EVALUATIONS
    ]
    # runs scored under their own name: the ablation variants (their stage's evaluation) and the students
    named = {name: v["stage"] for name, v in variants.items()}
    named.update({name: v["evaluation"] for name, v in STUDENTS.items() if name in stages})
    steps += [
        Step(
            f"evaluate {name}",
            (lambda n=name: (evals / f"{n}.json").exists()),
            (lambda n=name, k=kind: score(k, n)),
        )
        for name, kind in named.items()
    ]
    for step in steps:
        step.estimate_s = float(p.get("estimates", {}).get(step.name, step.estimate_s))
    return steps


def merge_metrics(out: Path, preset: str, timings: dict[str, float], seed: int = 0) -> dict:
    merged: dict = {
        "meta": {
            "preset": preset,
            "phantom_seed": seed,
            "medvl_version": __version__,
            "timings_s": timings,
            "stages": {},
        }
    }
    for path in sorted((out / "eval").glob("*.json")):
        record = json.loads(path.read_text())
        meta = record.pop("meta", {})
        merged["meta"]["stages"][path.stem] = meta
        variant = VARIANTS.get(path.stem)
        if variant is not None:
            record = {f"ablations.{variant['ablation']}.{k}": v for k, v in record.items()}
        student = STUDENTS.get(path.stem)
        if student is not None:
            record = {f"{student['prefix']}.{k}": v for k, v in record.items()}
        merged.update(record)
    (out / "metrics.json").write_text(json.dumps(merged, indent=2))
    return merged


def run_demo(out: str | Path = "demo_out", preset: str = "quick", seed: int = 0) -> dict:
    """Build IU-Phantom (with ``seed``), train every stage, evaluate, and write ``metrics.json`` and
    ``report.html``. The presets were tuned on the phantom of seed 0; another seed gives a test bed that no
    preset has seen."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = build_steps(out, preset, seed)
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
    merged = merge_metrics(out, preset, timings, seed)
    write_report(out, out / "report.html")
    _log(f"finished in {time.perf_counter() - t_start:.0f} s: {out / 'metrics.json'}, {out / 'report.html'}")
    return merged

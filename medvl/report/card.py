"""The model card (``README.md``) of a saved pipeline folder: what each run is, what data it was
trained on, its config, the metrics of its last evaluation, and how to load it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import medvl.registry as registry
from medvl.runs import CONFIG_FILE, read_evaluations, read_stage_info
from medvl.version import __version__

CARD_FILE = "README.md"
PHANTOM_SOURCE = "iu-phantom"


def describe_source(meta: Mapping[str, Any] | None) -> str:
    """One line on the prepared dataset a run was trained (or evaluated) on, from its ``meta.json``."""
    if not meta:
        return "not recorded in the run"
    counts = meta.get("counts") or {}
    parts = [f"{meta.get('source', 'unknown source')}", f"{meta.get('size', '?')} px"]
    if counts.get("images"):
        split = ", ".join(f"{k} {v}" for k, v in (counts.get("by_split") or {}).items())
        parts.append(f"{counts['images']} images" + (f" ({split})" if split else ""))
    if meta.get("sections"):
        parts.append(f"report sections: {meta['sections']}")
    phantom = meta.get("phantom") or {}
    if phantom:
        parts.append(f"phantom of {phantom.get('studies')} studies, seed {phantom.get('seed')}")
    return "; ".join(parts)


def _data_statement(metas: list[Mapping[str, Any] | None]) -> str:
    sources = {(m or {}).get("source") for m in metas}
    if PHANTOM_SOURCE in sources:
        return (
            "**These models were trained on IU-Phantom, medvl's synthetic chest X-ray dataset: they are "
            "demonstrations, not clinical models.**"
        )
    return "Research models: not validated for clinical use."


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_section(run_dir: Path) -> list[str]:
    lines: list[str] = []
    for record in read_evaluations(run_dir):
        kind, metrics = record.get("kind", "?"), record.get("metrics") or {}
        spec = registry.EVALUATIONS.get(kind)
        rows = spec.headline_of(metrics) if spec else []
        meta = metrics.get("meta") or {}
        lines += [
            "",
            f"Last `medvl evaluate {kind} --split {record.get('split')}` "
            f"({meta.get('num_samples', '?')} samples; data: {describe_source((record.get('data') or {}).get('meta'))}):",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        lines += [f"| `{key}` | {_fmt(value)} |" for key, value in rows]
    return lines or ["", "No evaluation recorded (run `medvl evaluate` on the run before saving)."]


def model_card(directory: Path, runs: Mapping[str, Path]) -> str:
    """The card's text for the pipeline folder ``directory`` holding ``runs`` (stage -> run folder)."""
    order = [*(s for s in registry.STAGES if s in runs), *(s for s in runs if s not in registry.STAGES)]
    runs = {stage: runs[stage] for stage in order}
    infos = {stage: read_stage_info(run) for stage, run in runs.items()}
    metas = [(info.get("data") or {}).get("meta") for info in infos.values()]
    lines = [
        f"# medvl pipeline: {', '.join(runs)}",
        "",
        _data_statement(metas),
        "",
        "## How to load it",
        "",
        "```python",
        "import medvl",
        "",
        f'pipe = medvl.Pipeline.from_pretrained("{directory.name}")   # or medvl.load("{directory.name}")',
    ]
    lines += [spec.usage for stage, spec in registry.STAGES.items() if stage in runs and spec.usage]
    lines += [
        "```",
        "",
        f"Saved by medvl {__version__}. Each folder below is a run directory "
        "(`--run` of the `medvl` commands takes it).",
        "",
        "## Runs",
    ]
    for stage, run in runs.items():
        info = infos[stage]
        spec = registry.STAGES.get(stage)
        built = ", ".join(Path(p).name for p in info.get("from") or []) or "nothing"
        lines += ["", f"### `{run.name}/`: {stage}", ""]
        if spec:
            lines.append(f"{spec.summary}.")
        lines += [
            "",
            f"- trained on: {describe_source((info.get('data') or {}).get('meta'))}",
            f"- built from: {built}",
            f"- {info.get('steps', '?')} steps, weights of step {info.get('best_step', '?')} "
            f"(selected on validation `{info.get('select_metric', '?')}`), {info.get('seconds', '?')} s "
            f"on {info.get('world_size', 1)} {info.get('device', '?')} process(es), medvl {info.get('medvl_version')}",
        ]
        lines += _metrics_section(run)
        config = run / CONFIG_FILE
        if config.is_file():
            lines += [
                "",
                f"<details><summary>config ({CONFIG_FILE})</summary>",
                "",
                "```yaml",
                config.read_text().rstrip(),
                "```",
                "",
                "</details>",
            ]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | Path, runs: Mapping[str, Path]) -> Path:
    """Write ``directory/README.md`` for the pipeline folder holding ``runs``."""
    directory = Path(directory)
    path = directory / CARD_FILE
    path.write_text(model_card(directory, runs), encoding="utf-8")
    return path

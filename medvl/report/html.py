"""The self-contained HTML page of a set of trained runs (``medvl report``, and the demo's ``report.html``).

Sections appear for the runs given: the runs and what they were trained on; a few studies of the prepared
dataset with what each part does with them (:mod:`medvl.report.examples`); each run's training curves from its
TensorBoard logs; the pointing game per finding word beside its baselines (an AdaMatch evaluation); per-label
ROC curves of real and synthesized scans (a diffusion evaluation); and every evaluation the runs keep
(``RUN/eval/<kind>-<split>.json``, :func:`medvl.runs.record_evaluation`) as tables with their conventions.
Every image is a PNG embedded as a data URI, shown at the size it was drawn for (:mod:`medvl.report.overlay`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import medvl.registry as registry
from medvl.data.prepared import read_meta
from medvl.errors import DataError, RunError
from medvl.report.card import PHANTOM_SOURCE, describe_source
from medvl.report.examples import Keypatch, StudyExample, collect_examples
from medvl.report.figures import pointing_figure, read_training_scalars, roc_figure, training_figure
from medvl.report.overlay import Picture
from medvl.runs import find_runs, is_finished, read_evaluations, read_stage_info

logger = logging.getLogger(__name__)

__all__ = [
    "Keypatch",
    "Section",
    "StudyExample",
    "build_page",
    "metrics_tables",
    "png_data_uri",
    "render_html",
    "resolve_runs",
    "write_report",
    "write_run_report",
]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1d1d1f;background:#fff;line-height:1.4}
h1{margin-bottom:.2rem} .note{color:#8a1c1c;font-weight:600}
img{max-width:100%;height:auto;border:1px solid #ccc}
.study{display:grid;grid-template-columns:362px 1fr 362px;gap:1rem;border-top:1px solid #ddd;padding:1rem 0}
.study h3{margin:.2rem 0} .report{font-size:.92rem} .report p{margin:.3rem 0}
.keypatches{display:flex;flex-wrap:wrap;gap:.4rem;margin-top:.4rem}
.keypatches figure{margin:0;width:98px;font-size:13px;text-align:center;overflow-wrap:anywhere}
.figure{margin:.5rem 0 1.5rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left} .caption{color:#555;font-size:.85rem}
td.text{text-align:left}
"""


@dataclass
class Section:
    """A part of the page after the studies: its heading and its HTML."""

    title: str
    body: str


def png_data_uri(image: np.ndarray | bytes) -> str:
    """A PNG (bytes, an (H, W) uint8/float array, or (H, W, 3) uint8) as a ``data:`` URI."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            lo, hi = float(arr.min()), float(arr.max())
            arr = ((arr - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img_tag(picture: Picture, alt: str) -> str:
    """``<img>`` of ``picture`` at its intended CSS size; ``data-label-px`` is the height of its smallest text
    there (0 for a picture without text)."""
    return (
        f'<img alt="{html.escape(alt)}" src="{png_data_uri(picture.png)}" width="{picture.width}" '
        f'height="{picture.height}" data-label-px="{picture.label_px:g}">'
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if v is None:
        return "–"
    return html.escape(str(v))


def _conventions(meta: Mapping[str, Any]) -> dict[str, str]:
    conventions = dict(meta.get("conventions") or {})
    for stage_meta in (meta.get("stages") or {}).values():  # a merged metrics.json
        conventions.update(stage_meta.get("conventions") or {})
    return conventions


def metrics_tables(metrics: Mapping[str, Any]) -> str:
    """One table per metric family (first dotted component), keys as rows, then the conventions."""
    groups: dict[str, list[tuple[str, object]]] = {}
    for key, value in metrics.items():
        if key == "meta" or isinstance(value, (dict, list)):
            continue
        groups.setdefault(key.split(".", 1)[0], []).append((key, value))
    parts = []
    for family, rows in groups.items():
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in rows)
        parts.append(
            f"<h4>{html.escape(family)}</h4><table><tr><th>metric</th><th>value</th></tr>{body}</table>"
        )
    conventions = _conventions(metrics.get("meta") or {})
    if conventions:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td class='text'>{html.escape(str(v))}</td></tr>"
            for k, v in conventions.items()
        )
        parts.append(f"<h4>conventions</h4><table><tr><th>metric</th><th>convention</th></tr>{rows}</table>")
    return "\n".join(parts)


# ---- studies


def _study_html(ex: StudyExample) -> str:
    scan = (
        img_tag(ex.scan, f"scan {ex.study_id} with its keywords on their adaptive boxes")
        if ex.scan
        else "<p>(no AdaMatch model given)</p>"
    )
    keywords = html.escape(", ".join(ex.keywords)) or "none"
    left = f"""<div><h3>study {html.escape(ex.study_id)}</h3>{scan}
<div class="caption">AdaMatch keywords on the adaptive boxes they match best: {keywords}</div></div>"""
    generated = ""
    if ex.generated is not None:
        generated = f"""<h3>generated report</h3><p>{html.escape(ex.generated)}</p>
<div class="caption">labels: {html.escape(ex.labels_generated)}</div>"""
    middle = f"""<div class="report">{generated}<h3>reference report</h3><p>{html.escape(ex.reference)}</p>
<div class="caption">labels: {html.escape(ex.labels_reference)}</div></div>"""
    right = "<div></div>"
    if ex.synthesized is not None:
        crops = []
        for k, kp in enumerate(ex.keypatches):
            pic = (
                img_tag(kp.picture, f"keypatch {k + 1}: {kp.word}")
                if kp.picture
                else "<div class='caption'>(no crop)</div>"
            )
            crops.append(f"<figure>{pic}<figcaption>{html.escape(kp.word)}</figcaption></figure>")
        strip = (
            f"<div class='caption'>the training patches retrieved for the report:</div>"
            f"<div class='keypatches'>{''.join(crops)}</div>"
            if crops
            else ""
        )
        if ex.keypatch_note:
            strip += f"<div class='caption'>keypatch crops left out: {html.escape(ex.keypatch_note)}</div>"
        right = f"""<div><h3>synthesized from the reference</h3>
{img_tag(ex.synthesized, "synthesized from the reference report, with its keypatch boxes")}
<div class="caption">keypatch boxes, labelled with their keywords</div>{strip}</div>"""
    return f'<div class="study">{left}{middle}{right}</div>'


# ---- sections from the runs


def resolve_runs(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Stage -> run directory for ``paths``: each a finished run (its stage from ``stage.json``), or a folder of
    runs (a demo directory, a pipeline folder) standing for the runs inside. Two runs of one stage are an
    error."""
    runs: dict[str, Path] = {}
    for path in map(Path, paths):
        found = {read_stage_info(path)["stage"]: path} if is_finished(path) else find_runs(path)
        for stage, run in found.items():
            if stage in runs and runs[stage].resolve() != run.resolve():
                raise RunError(f"two {stage} runs given: {runs[stage]} and {run}; give one")
            runs[stage] = run
    order = [*(s for s in registry.STAGES if s in runs), *(s for s in runs if s not in registry.STAGES)]
    return {stage: runs[stage] for stage in order}


def _runs_section(runs: Mapping[str, Path]) -> Section:
    rows = []
    for stage, run in runs.items():
        info = read_stage_info(run)
        spec = registry.STAGES.get(stage)
        steps = (
            f"{info.get('steps', '?')} (kept step {info.get('best_step', '?')}, "
            f"selected on {info.get('select_metric', '?')})"
        )
        rows.append(
            f"<tr><td>{html.escape(stage)}</td><td class='text'>{html.escape(run.name)}/</td>"
            f"<td class='text'>{html.escape(spec.summary if spec else '')}</td><td class='text'>{html.escape(steps)}</td>"
            f"<td class='text'>{html.escape(describe_source((info.get('data') or {}).get('meta')))}</td></tr>"
        )
    body = (
        "<table><tr><th>stage</th><th>run</th><th>what it is</th><th>steps</th><th>trained on</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    return Section("Runs", body)


def _figure_html(picture: Picture | None, alt: str, caption: str, missing: str) -> str:
    if picture is None:
        return f"<p class='caption'>{html.escape(missing)}</p>"
    return (
        f"<div class='figure'>{img_tag(picture, alt)}<div class='caption'>{html.escape(caption)}</div></div>"
    )


def _training_section(runs: Mapping[str, Path]) -> Section:
    parts = []
    for stage, run in runs.items():
        info = read_stage_info(run)
        try:
            scalars = read_training_scalars(run)
        except Exception as exc:  # a damaged event file costs its figure only
            logger.warning("training curves of %s skipped: %s", run, exc)
            scalars = {}
        picture = training_figure(
            scalars, f"{stage} ({run.name})", info.get("select_metric"), info.get("best_step")
        )
        parts.append(
            _figure_html(
                picture,
                f"training curves of the {stage} run",
                "training loss (light: every logged step, dark: smoothed), validation loss and the validation "
                "metric the kept weights were selected on; from the run's TensorBoard logs (logs/).",
                f"{stage} ({run.name}): no TensorBoard logs in the run (a saved pipeline folder leaves logs/ out).",
            )
        )
    return Section("Training curves", "\n".join(parts))


def _records(runs: Mapping[str, Path]) -> list[tuple[str, Path, dict[str, Any]]]:
    out = []
    for stage, run in runs.items():
        for record in read_evaluations(run):
            out.append((stage, run, record))
    return out


def _record_heading(run: Path, record: Mapping[str, Any]) -> str:
    meta = (record.get("metrics") or {}).get("meta") or {}
    data = describe_source((record.get("data") or {}).get("meta"))
    return (
        f"<p><code>medvl evaluate {html.escape(str(record.get('kind')))} --split "
        f"{html.escape(str(record.get('split')))}</code> of {html.escape(run.name)}/ "
        f"({html.escape(str(meta.get('num_samples', '?')))} samples; data: {html.escape(data)})</p>"
    )


def _localization_section(records) -> Section | None:
    parts = []
    for _stage, run, record in records:
        if record.get("kind") != "adamatch":
            continue
        metrics = record.get("metrics") or {}
        has_prior = any(k.endswith(".pointing_game_prior") for k in metrics)
        caption = (
            "Per finding word of the reports: how often AdaMatch's best patch for the word lands in the finding's "
            "ground-truth box, beside baselines that see no pixel"
            + ("" if has_prior else " (this evaluation record has none: only chance is shown)")
            + "; n = (image, word) pairs."
        )
        parts.append(
            _record_heading(run, record)
            + _figure_html(
                pointing_figure(metrics),
                "pointing game per finding word",
                caption,
                "No per-finding pointing game: the dataset has no ground-truth boxes (regions.csv).",
            )
        )
    return Section("Localization: the pointing game per finding word", "\n".join(parts)) if parts else None


def _synthesis_section(records) -> Section | None:
    parts = []
    for _stage, run, record in records:
        if record.get("kind") != "diffusion":
            continue
        scores = ((record.get("metrics") or {}).get("meta") or {}).get("scan_scores")
        parts.append(
            _record_heading(run, record)
            + _figure_html(
                roc_figure(scores) if scores else None,
                "ROC curves per label, real and synthesized scans",
                "The evaluation classifier (trained on real training scans) scoring each label on the real "
                "scans and on the scans synthesized from their reports, against the reports' labels; labels "
                "with both classes in the split.",
                "No ROC curves: this evaluation record keeps no per-scan scores (records from medvl 0.3 on "
                "do: rerun `medvl evaluate diffusion`)"
                if not scores
                else "No label has both classes among these scans.",
            )
        )
    return Section("Synthesized scans: ROC per label", "\n".join(parts)) if parts else None


def _metrics_section(records) -> Section:
    parts = []
    for _stage, run, record in records:
        metrics = record.get("metrics") or {}
        spec = registry.EVALUATIONS.get(str(record.get("kind")))
        headline = spec.headline_of(metrics) if spec else []
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in headline)
        table = f"<table><tr><th>headline metric</th><th>value</th></tr>{rows}</table>" if rows else ""
        parts.append(
            f"<h3>{html.escape(str(record.get('kind')))} ({html.escape(str(record.get('split')))})</h3>"
            + _record_heading(run, record)
            + table
            + f"<details><summary>every metric and its convention</summary>{metrics_tables(metrics)}</details>"
        )
    if not parts:
        parts.append(
            "<p>No evaluation kept in these runs: run <code>medvl evaluate</code> on them first.</p>"
        )
    return Section("Metrics", "\n".join(parts))


def render_html(
    title: str,
    examples: Sequence[StudyExample],
    sections: Sequence[Section] = (),
    notes: Sequence[str] = (),
) -> str:
    """The page: title, notes, the studies, then each section."""
    note_html = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
    studies = "".join(_study_html(ex) for ex in examples)
    studies_html = f"<h2>Studies</h2>{studies}" if studies else ""
    rest = "".join(f"<h2>{html.escape(s.title)}</h2>{s.body}" for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>{note_html}
{studies_html}
{rest}
</body></html>
"""


def _notes(runs: Mapping[str, Path], data: Path | None) -> list[str]:
    sources = {
        ((read_stage_info(r).get("data") or {}).get("meta") or {}).get("source") for r in runs.values()
    }
    if data is not None:
        try:
            sources.add(read_meta(data).source)
        except DataError:
            pass
    if PHANTOM_SOURCE in sources:
        return ["IU-Phantom images are synthetic: these models are demonstrations, not clinical models."]
    return ["Research models: not validated for clinical use."]


def build_page(
    runs: Mapping[str, Path],
    data: str | Path | None,
    title: str = "medvl report",
    num_studies: int = 6,
    notes: Sequence[str] = (),
) -> str:
    """The page of ``runs`` (stage -> run directory); studies come from the prepared dataset ``data`` (none
    without it)."""
    data = Path(data) if data is not None else None
    examples = (
        collect_examples(runs, data, num_studies=num_studies) if data is not None and num_studies else []
    )
    records = _records(runs)
    sections = [_runs_section(runs), _training_section(runs)]
    sections += [s for s in (_localization_section(records), _synthesis_section(records)) if s is not None]
    sections.append(_metrics_section(records))
    return render_html(title, examples, sections, [*_notes(runs, data), *notes])


def write_run_report(
    runs: Sequence[str | Path],
    data: str | Path | None,
    out: str | Path,
    title: str = "medvl report",
    num_studies: int = 6,
    notes: Sequence[str] = (),
) -> Path:
    """``medvl report --runs RUN... --data DIR --out FILE.html``: the page of the runs given, written to
    ``out``."""
    page = build_page(resolve_runs(runs), data, title=title, num_studies=num_studies, notes=notes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def write_report(out_dir: str | Path, path: str | Path, num_studies: int = 6) -> Path:
    """The page of a demo directory (``OUT/runs/<stage>/``, ``OUT/data/``), written to ``path``."""
    out_dir = Path(out_dir)
    return write_run_report(
        [out_dir],
        out_dir / "data",
        path,
        title="medvl demo report",
        num_studies=num_studies,
        notes=_preset_notes(out_dir),
    )


#: One line on the page of a demo run with a preset whose figures are not the tables' (docs/results.md).
PRESET_NOTES = {
    "quick": "Quick preset: 800 studies, short schedules and no text-only diffusion ablation, a tour of every "
    "stage in minutes. This run against `medvl demo --preset full` (all studies, schedules 4 to 12 times longer, "
    "scored on the held-out phantom of docs/results.md): ",
}

#: (label, metrics key, the full preset's held-out figure: benchmarks/results/headline_seed7.json) for that line.
FULL_PRESET_FIGURES = (
    ("report head ce.micro5 F1", "ce.micro5.f1", 0.527),
    ("AdaMatch pointing game", "localization.pointing_game", 0.540),
    ("synthesized Cardiomegaly AUROC", "image.per_label.Cardiomegaly.auroc", 0.961),
    ("synthesized Pleural Effusion AUROC", "image.per_label.Pleural Effusion.auroc", 0.966),
)


def _preset_notes(out_dir: Path) -> list[str]:
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
        preset = metrics["meta"]["preset"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if preset not in PRESET_NOTES:
        return []
    figures = []
    for label, key, full in FULL_PRESET_FIGURES:
        value = metrics.get(key)
        here = f"{value:.2f}" if isinstance(value, (int, float)) else "not scored"
        figures.append(f"{label} {here} here, {full:.2f} full")
    return [PRESET_NOTES[preset] + "; ".join(figures) + "."]

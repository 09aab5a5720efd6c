"""The self-contained HTML report of a demo (or any set of runs): images embedded as data URIs.

For a handful of test studies: the scan with its adaptive boxes and keywords, the generated
report beside the reference, the scan synthesized from the reference report with its
keypatches; then every metric table with its conventions.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from medvl.report.examples import StudyExample, collect_examples

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
color:#1d1d1f;background:#fff;line-height:1.4}
h1{margin-bottom:.2rem} .note{color:#8a1c1c;font-weight:600}
.study{display:grid;grid-template-columns:300px 1fr 300px;gap:1rem;border-top:1px solid #ddd;padding:1rem 0}
.study img{width:300px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
.study h3{margin:.2rem 0} .report{font-size:.92rem} .report p{margin:.3rem 0}
table{border-collapse:collapse;margin:.5rem 0 1.5rem} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left} .caption{color:#555;font-size:.85rem}
"""


__all__ = ["StudyExample", "png_data_uri", "metrics_tables", "render_html", "write_report"]


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


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if v is None:
        return "–"
    return html.escape(str(v))


def metrics_tables(metrics: dict) -> str:
    """One table per metric family (first dotted component), keys as rows."""
    groups: dict[str, list[tuple[str, object]]] = {}
    for key, value in metrics.items():
        if key == "meta" or isinstance(value, (dict, list)):
            continue
        family = key.split(".", 1)[0]
        groups.setdefault(family, []).append((key, value))
    parts = []
    for family, rows in groups.items():
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in rows)
        parts.append(
            f"<h3>{html.escape(family)}</h3><table><tr><th>metric</th><th>value</th></tr>{body}</table>"
        )
    meta = metrics.get("meta", {})
    conventions = {}
    for stage_meta in (meta.get("stages") or {}).values():
        conventions.update(stage_meta.get("conventions") or {})
    if conventions:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in conventions.items()
        )
        parts.append(f"<h3>conventions</h3><table><tr><th>metric</th><th>convention</th></tr>{rows}</table>")
    return "\n".join(parts)


def render_html(
    title: str, examples: list[StudyExample], metrics: dict, notes: list[str] | None = None
) -> str:
    studies = []
    for ex in examples:
        scan = (
            f'<img alt="scan {html.escape(ex.study_id)} with adaptive boxes" src="{png_data_uri(ex.scan_png)}">'
            if ex.scan_png
            else "<p>(no scan)</p>"
        )
        synth = (
            f'<img alt="synthesized from the reference report" src="{png_data_uri(ex.synthesized_png)}">'
            if ex.synthesized_png
            else "<p>(no synthesis)</p>"
        )
        studies.append(
            f"""<div class="study"><div><h3>study {html.escape(ex.study_id)}</h3>{scan}
<div class="caption">adaptive boxes with matched keywords: {html.escape(", ".join(ex.keywords))}</div></div>
<div class="report"><h3>generated report</h3><p>{html.escape(ex.generated)}</p>
<div class="caption">labels: {html.escape(ex.labels_generated)}</div>
<h3>reference report</h3><p>{html.escape(ex.reference)}</p>
<div class="caption">labels: {html.escape(ex.labels_reference)}</div></div>
<div><h3>synthesized from the reference</h3>{synth}
<div class="caption">keypatches for: {html.escape(", ".join(ex.keypatch_words))}</div></div></div>"""
        )
    note_html = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in (notes or []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>{note_html}
<h2>Test studies</h2>{"".join(studies) or "<p>No studies rendered.</p>"}
<h2>Metrics</h2>{metrics_tables(metrics)}
</body></html>
"""


def write_report(out_dir: str | Path, path: str | Path, num_studies: int = 6) -> Path:
    """Render ``out_dir`` (a demo directory: data/, runs/, metrics.json) to a self-contained HTML page."""
    out_dir = Path(out_dir)
    metrics = (
        json.loads((out_dir / "metrics.json").read_text()) if (out_dir / "metrics.json").exists() else {}
    )
    examples = collect_examples(out_dir, num_studies=num_studies)
    page = render_html(
        "medvl demo report",
        examples,
        metrics,
        notes=["IU-Phantom images are synthetic: these models are demonstrations, not clinical models."],
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path

"""The study panels of the HTML report: for a few test studies, what each trained part does with them."""

from __future__ import annotations

import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medvl.api import load
from medvl.data.prepared import PreparedDataset
from medvl.errors import MedvlError
from medvl.inference.explain import explain_image
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import label_reports

logger = logging.getLogger(__name__)


@dataclass
class StudyExample:
    study_id: str
    scan_png: bytes | None = None  # scan with adaptive boxes and keywords
    keywords: list[str] = field(default_factory=list)
    reference: str = ""
    generated: str = ""
    synthesized_png: bytes | None = None  # synthesized from the reference report, keypatches drawn
    keypatch_words: list[str] = field(default_factory=list)
    labels_reference: str = ""
    labels_generated: str = ""


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def draw_boxes(image: np.ndarray, boxes: np.ndarray, words: list[str], title: str) -> bytes:
    """A scan (S, S) in [-1024, 1024] with normalised boxes (K, 4) and their words, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    size = image.shape[-1]
    fig, ax = plt.subplots(figsize=(4.2, 4.4), dpi=110)
    ax.imshow(image, cmap="gray", vmin=-1024, vmax=1024, extent=(0, size, size, 0))
    colours = plt.get_cmap("tab10")
    for k, (box, word) in enumerate(zip(boxes, words, strict=False)):
        x0, y0, x1, y1 = np.clip(np.asarray(box, dtype=float), 0, 1) * size
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.4, ec=colours(k % 10)))
        ax.text(x0 + 1, y0 + 5, word, color=colours(k % 10), fontsize=7, weight="bold")
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _labels_text(labels: np.ndarray) -> str:
    pos = [n for n, v in zip(CHEXPERT_LABELS, labels, strict=True) if v == 1]
    unc = [n for n, v in zip(CHEXPERT_LABELS, labels, strict=True) if v == -1]
    text = ", ".join(pos) or "none positive"
    return text + (f"; uncertain: {', '.join(unc)}" if unc else "")


def pick_studies(index, labels: np.ndarray, n: int) -> list[int]:
    """Test studies to show: abnormal ones with different findings first, then one normal."""
    chosen: list[int] = []
    nf = CHEXPERT_LABELS.index("No Finding")
    for k in range(len(CHEXPERT_LABELS)):
        if k == nf:
            continue
        for i in np.flatnonzero(labels[:, k] == 1):
            if int(i) not in chosen:
                chosen.append(int(i))
                break
        if len(chosen) >= n - 1:
            break
    normal = np.flatnonzero(labels[:, nf] == 1)
    if len(normal):
        chosen.append(int(normal[0]))
    for i in range(len(index)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen[:n]


def collect_examples(out_dir: str | Path, num_studies: int = 6) -> list[StudyExample]:
    """Render ``num_studies`` test studies of a demo directory with every part that was trained."""
    out_dir = Path(out_dir)
    try:
        pipe = load(out_dir)
        ds = PreparedDataset(out_dir / "data", split="test")
    except (MedvlError, ValueError, FileNotFoundError) as exc:
        logger.warning("no studies for the report: %s", exc)
        return []
    rows = pick_studies(ds.index, ds.labels.numpy(), num_studies)
    examples: list[StudyExample] = []
    for i in rows:
        item = ds[i]
        image = item["image"][0].numpy()
        ex = StudyExample(
            study_id=str(item["study_id"]),
            reference=item["report"],
            labels_reference=_labels_text(label_reports([item["report"]])[0]),
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                expl = explain_image(pipe.adamatch, image, out=Path(tmp) / "scan.png")
                ex.scan_png = (Path(tmp) / "scan.png").read_bytes()
            ex.keywords = [k.word for k in expl.keywords]
        except MedvlError as exc:
            logger.warning("explanation skipped: %s", exc)
        if "report" in pipe.runs:
            gen = pipe.generate_report(image)
            ex.generated = gen.text
            ex.labels_generated = _labels_text(label_reports([gen.text])[0])
        if "diffusion" in pipe.runs:
            syn = pipe.synthesize(item["report"], seed=0)
            mask = syn.keypatch_mask[0].cpu().numpy().astype(bool)
            boxes = syn.keypatch_boxes[0].cpu().numpy()[mask][:5]
            words = []
            try:
                kp = pipe.adamatch.report_keypatches([item["report"]], top_k=len(boxes) or 1)
                words = kp.words[0][: len(boxes)]
            except MedvlError:
                pass
            ex.keypatch_words = words
            ex.synthesized_png = draw_boxes(syn.images[0, 0].numpy(), boxes, words, "synthesized, keypatches")
        examples.append(ex)
    return examples

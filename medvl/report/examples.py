"""The study panels of the HTML page: for a few test studies, what each trained part given does with them.

An AdaMatch model (its run, or the copy a report or diffusion run carries) draws the scan's keywords on their
adaptive boxes; a report run writes the report; a diffusion run draws a scan from the reference report, with the
keypatches that guided it: their boxes on the synthesized scan and, beside it, the training patches themselves,
cut at display time from the prepared dataset's scans (the bank keeps each patch's box and the position of its
scan in the training split, no pixels).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import medvl.registry as registry
from medvl.api import Pipeline
from medvl.data.prepared import PreparedDataset
from medvl.errors import DataError, MedvlError
from medvl.report.overlay import Picture, crop, draw_boxes
from medvl.text.chexpert import CHEXPERT_LABELS
from medvl.text.labeler import label_reports

logger = logging.getLogger(__name__)

STUDY_SPLITS = ("test", "validate")  # studies are shown from the first of these the dataset has


@dataclass
class Keypatch:
    """A keypatch shown on the page: its keyword and its crop of the training scan it was mined from (None when the
    prepared dataset given is not the one the bank was mined from)."""

    word: str
    picture: Picture | None = None


@dataclass
class StudyExample:
    study_id: str
    scan: Picture | None = None  # the scan with AdaMatch's keywords on their adaptive boxes
    keywords: list[str] = field(default_factory=list)
    reference: str = ""
    generated: str | None = None  # None: no report run given
    synthesized: Picture | None = None  # drawn from the reference report, keypatch boxes on it
    keypatches: list[Keypatch] = field(default_factory=list)
    keypatch_note: str = ""  # why the keypatch crops are missing
    labels_reference: str = ""
    labels_generated: str = ""


def labels_text(labels: np.ndarray) -> str:
    """CheXpert labels (14,) as "A, B; uncertain: C" (or "none positive")."""
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
    if len(normal) and int(normal[0]) not in chosen:
        chosen.append(int(normal[0]))
    for i in range(len(index)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen[:n]


def study_split(data: str | Path) -> tuple[str, PreparedDataset] | None:
    for split in STUDY_SPLITS:
        ds = PreparedDataset(data, split=split)
        if len(ds):
            return split, ds
    return None


def _keyword_panel(pipe: Pipeline, image: np.ndarray, ex: StudyExample) -> None:
    try:
        expl = pipe.explain(image, top_k=6)
    except MedvlError as exc:
        logger.warning("keywords skipped: %s", exc)
        return
    ex.keywords = [k.word for k in expl.keywords]
    ex.scan = draw_boxes(image, [k.box for k in expl.keywords], ex.keywords)


def _synthesis_panel(pipe: Pipeline, report: str, ex: StudyExample, data: Path, max_keypatches: int) -> None:
    syn = pipe.synthesize(report, seed=0)
    mask = syn.keypatch_mask[0].cpu().numpy().astype(bool)
    boxes = syn.keypatch_boxes[0].cpu().numpy()
    keep = np.flatnonzero(mask)[:max_keypatches]
    words = [""] * len(boxes)
    scans: list[np.ndarray | None] = [None] * len(keep)
    if len(keep):
        # The keypatches the synthesizer retrieved (its own AdaMatch copy, the same query), and the training scans
        # they were cut from, read from the prepared dataset: the bank keeps no pixels.
        run = pipe.synthesizer.encoder.run
        kp = run.report_keypatches([report], top_k=len(boxes))
        words[: len(kp.words[0])] = kp.words[0]
        entries = [int(kp.entries[0, i]) for i in keep]
        try:
            scans = list(run.keypatch_bank.source_scans(entries, data))
        except DataError as exc:
            logger.warning("keypatch crops left out: %s", exc)
            ex.keypatch_note = str(exc)
    ex.synthesized = draw_boxes(syn.images[0, 0].numpy(), boxes[keep], [words[i] for i in keep])
    for i, scan in zip(keep, scans, strict=True):
        ex.keypatches.append(Keypatch(words[i], crop(scan, boxes[i]) if scan is not None else None))


def collect_examples(
    runs: Mapping[str, Path], data: str | Path, num_studies: int = 6, max_keypatches: int = 5
) -> list[StudyExample]:
    """Render ``num_studies`` studies of ``data`` (test split, else validate) with every part of ``runs``
    (stage -> run directory) that works on a study. Empty when no such part is given."""
    pipe = Pipeline(dict(runs))
    if not any(stage in runs for stage in registry.holders("adamatch")):
        return []  # an autoencoder alone works on no study
    found = study_split(data)
    if found is None:
        logger.warning("no studies for the page: %s has no test or validate studies with reports", data)
        return []
    _, ds = found
    examples: list[StudyExample] = []
    for i in pick_studies(ds.index, ds.labels.numpy(), num_studies):
        item = ds[i]
        image = item["image"][0].numpy()
        ex = StudyExample(
            study_id=str(item["study_id"]),
            reference=item["report"],
            labels_reference=labels_text(label_reports([item["report"]])[0]),
        )
        _keyword_panel(pipe, image, ex)
        if "report" in runs:
            gen = pipe.generate_report(image)
            ex.generated = gen.text
            ex.labels_generated = labels_text(label_reports([gen.text])[0])
        if "diffusion" in runs:
            _synthesis_panel(pipe, item["report"], ex, Path(data), max_keypatches)
        examples.append(ex)
    return examples

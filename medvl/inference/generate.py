"""Report generation from scans with a trained report run (``medvl generate-report``).

Python::

    gen = ReportGenerator.load("runs/report")
    reports = gen.generate(["scan.dcm", "scan.png"], beams=3)   # or images (B, 1, S, S) in [-1024, 1024]
    reports[0].text, reports[0].keywords                        # GeneratedReport

A scan is read with :func:`medvl.data.scans.load_scan` (DICOM, PNG or JPG, one intensity
convention) and resized to the run's square size the way ``medvl prepare`` does (aspect kept, padded
with air), so keyword boxes are in that frame. AdaMatch (from the run's ``adamatch/`` copy) gives the
patch features and the top-K keywords; the report head (``report_head/``, with the run's ``memory/``) decodes
with beam search and its KV cache.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvl.data.scans import load_scan
from medvl.errors import InvalidImageError, RunError
from medvl.models import report_head as rh
from medvl.models.adamatch import AdaMatchRun
from medvl.models.memory import SharedMemory
from medvl.models.report_bundle import ReportHeadBundle
from medvl.models.report_head import KeywordHints


@dataclass
class UsedKeyword:
    """A keyword hint given to the decoder: AdaMatch's calibrated ``score`` and the ``box`` (x0, y0, x1, y1,
    normalised to the run's square image frame, x to the image's right) of its best patch."""

    word: str
    score: float
    box: tuple[float, float, float, float]


@dataclass
class GeneratedReport:
    """One generated report: ``text``, its word ``tokens``, the decoder's length-normalised log-probability
    ``score``, and the ``keywords`` given to the decoder as hints (empty for a no-keyword model)."""

    text: str
    tokens: list[str]
    score: float
    keywords: list[UsedKeyword] = field(default_factory=list)


class ReportGenerator:
    """A loaded report run: AdaMatch + report head + tokenizer, in eval mode on ``device``."""

    def __init__(self, report: ReportHeadBundle, adamatch_run: AdaMatchRun, device: str = "cpu"):
        self.head = report.head.eval()
        self.tokenizer = report.tokenizer
        self.adamatch_run = adamatch_run
        self.device = torch.device(device)
        self.image_size = report.image_size
        self.generation = report.generation

    @classmethod
    def load(cls, run: str | Path, device: str = "cpu") -> ReportGenerator:
        """Load a report run directory (``medvl train report --out RUN``): its ``report_head/``, ``memory/`` and
        ``adamatch/`` components."""
        run = Path(run)
        if not run.is_dir():
            raise RunError(f"report run {run} does not exist")
        ReportHeadBundle.read_config(run)  # first: a run without a report head says so
        memory_dir = run / SharedMemory.DIRNAME
        memory = SharedMemory.from_pretrained(memory_dir) if memory_dir.is_dir() else None
        adamatch_run = AdaMatchRun.from_pretrained(run, device=device)
        report = ReportHeadBundle.from_pretrained(
            run, device=device, memory=memory, adamatch=adamatch_run.model
        )
        adamatch_run.model.eval()
        return cls(report, adamatch_run, device)

    @property
    def uses_keywords(self) -> bool:
        return self.head.cfg.use_keywords

    def read(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Scans -> (B, 1, S, S) at the run's size; the first unreadable file raises."""
        return torch.stack([load_scan(p, self.image_size) for p in paths])

    @torch.no_grad()
    def conditions(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, KeywordHints, list[list[Any]]]:
        """images (B, 1, S, S) -> patch features (B, P, D), boxes (B, P, 4), keyword hints, AdaMatch keywords."""
        images = images.to(self.device, torch.float32)
        patches = self.adamatch_run.encode_images(images)
        k = self.head.cfg.num_keywords
        keywords: list[list[Any]] = [[] for _ in range(images.shape[0])]
        if self.uses_keywords:
            keywords = self.adamatch_run.image_keywords(None, top_k=k, patches=patches)
        hints = rh.keyword_hints(keywords, self.head.keyword_vocabulary, k)
        return patches.features.float(), patches.boxes.float(), hints, keywords

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | Sequence[str | Path],
        *,
        beams: int | None = None,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
    ) -> list[GeneratedReport]:
        """Reports for ``images`` (B, 1, S, S) in [-1024, 1024] (or paths to scans), in input order.

        ``beams`` defaults to the run's ``generation.beams`` (1 = greedy); length penalty and n-gram
        blocking come from the run's ``generation`` settings.
        """
        if not isinstance(images, torch.Tensor):
            images = self.read(list(images))
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != 1:
            raise InvalidImageError(f"images must be (B, 1, S, S), got {tuple(images.shape)}")
        g = self.generation
        beams = beams or g.beams
        bs = batch_size or g.batch_size
        out: list[GeneratedReport] = []
        for start in range(0, images.shape[0], bs):
            feats, boxes, hints, _ = self.conditions(images[start : start + bs])
            dec = self.head.generate(
                patch_features=feats,
                patch_boxes=boxes,
                keywords=hints if self.uses_keywords else None,
                num_beams=beams,
                max_new_tokens=max_new_tokens or g.max_new_tokens or None,
                length_penalty=g.length_penalty,
                no_repeat_ngram_size=g.no_repeat_ngram_size,
            )
            texts, tokens = rh.decode_sequences(self.tokenizer, dec.sequences, self.head.eos_id)
            for i, (text, toks) in enumerate(zip(texts, tokens, strict=True)):
                used = (
                    [
                        UsedKeyword(
                            w, float(hints.scores[i, j]), tuple(float(v) for v in hints.boxes[i, j].tolist())
                        )
                        for j, w in enumerate(hints.words[i])
                    ]
                    if self.uses_keywords
                    else []
                )
                out.append(GeneratedReport(text, toks, float(dec.scores[i]), used))
        return out


# --------------------------------------------------------------------------------------------------- CLI


def _labels_of(texts: list[str]) -> tuple[list[dict[str, float | None]] | None, str | None]:
    try:
        from medvl.eval.clinical import label_reports
        from medvl.text.chexpert import CHEXPERT_LABELS

        arr = label_reports(texts)
    except ImportError as exc:
        return None, f"labeler not available: {exc}"
    rows = [
        {name: (None if np.isnan(v) else float(v)) for name, v in zip(CHEXPERT_LABELS, row, strict=True)}
        for row in arr
    ]
    return rows, None


def _draw_explanations(
    gen: ReportGenerator, images: torch.Tensor, reports: list[GeneratedReport], names: list[str], out: Path
) -> None:
    """One panel per scan (stacked vertically in one PNG): keyword boxes and words, report as the title."""
    from PIL import Image

    from medvl.inference.explain import render_explanation

    panels = []
    for i in range(images.shape[0]):
        img = images[i : i + 1].to(gen.device)
        patches = gen.adamatch_run.encode_images(img)
        kws = (
            gen.adamatch_run.image_keywords(None, top_k=gen.head.cfg.num_keywords, patches=patches)[0]
            if gen.adamatch_run.keywords is not None
            else []
        )
        if gen.uses_keywords:
            used = {k.word for k in reports[i].keywords}
            kws = [k for k in kws if k.word in used]
        title = names[i] + "\n" + "\n".join(textwrap.wrap(reports[i].text or "(empty report)", 60)[:6])
        s = gen.adamatch_run.image_size
        frame = (
            torch.nn.functional.interpolate(
                img, size=(s, s), mode="bilinear", antialias=True, align_corners=False
            )[0, 0]
            .cpu()
            .numpy()
        )
        panels.append(render_explanation(frame, patches, 0, keywords=kws, title=title))
    width = max(p.shape[1] for p in panels)
    canvas = np.full((sum(p.shape[0] for p in panels), width, 3), 255, np.uint8)
    y = 0
    for p in panels:
        canvas[y : y + p.shape[0], : p.shape[1]] = p
        y += p.shape[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out, format="PNG")


def generate_report_command(
    scans: Sequence[str | Path],
    *,
    run: str | Path,
    beams: int | None = None,
    explain: str | Path | None = None,
    as_json: bool = False,
) -> int:
    """``medvl generate-report SCAN... --run RUN [--beams N] [--explain OUT.png] [--json]``.

    Every readable scan gets a report; an unreadable one gets a one-line error on stderr (and an
    ``error`` entry in the JSON). Returns 0 when every scan got a report, 1 otherwise.
    With ``--json`` standard output is one JSON list, one object per scan in input order:
    ``{"scan", "report", "score", "tokens", "labels" (CheXpert name -> 1 / 0 / -1 / null), "keywords":
    [{"word", "score", "box"}], "image_size"}`` or ``{"scan", "error"}``.
    """
    if explain is not None and Path(explain).suffix.lower() != ".png":
        raise InvalidImageError(f"--explain must name a .png file, got {explain}")
    gen = ReportGenerator.load(run)
    records: list[dict[str, Any]] = []
    ok_images, ok_index = [], []
    for path in scans:
        try:
            ok_images.append(load_scan(path, gen.image_size))
            ok_index.append(len(records))
            records.append({"scan": str(path)})
        except (ValueError, OSError) as exc:  # InvalidImageError is a ValueError; missing files are OSErrors
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            print(f"medvl: error: {message}", file=sys.stderr)
            records.append({"scan": str(path), "error": message})
    if ok_images:
        images = torch.stack(ok_images)
        reports = gen.generate(images, beams=beams)
        labels, why = _labels_of([r.text for r in reports])
        for j, (i, rep) in enumerate(zip(ok_index, reports, strict=True)):
            records[i].update(
                {
                    "report": rep.text,
                    "score": rep.score,
                    "tokens": rep.tokens,
                    "labels": labels[j] if labels is not None else None,
                    "keywords": [asdict(k) for k in rep.keywords],
                    "image_size": gen.image_size,
                }
            )
            if why:
                records[i]["labels_missing"] = why
        if explain is not None:
            _draw_explanations(gen, images, reports, [records[i]["scan"] for i in ok_index], Path(explain))
    if as_json:
        print(json.dumps(records, indent=2))
    else:
        for rec in records:
            if "error" in rec:
                continue
            print(f"== {rec['scan']} ==")
            print(rec["report"] or "(empty report)")
            if rec["keywords"]:
                print("keywords: " + ", ".join(f"{k['word']} ({k['score']:.2f})" for k in rec["keywords"]))
            print()
    if explain is not None and ok_images:
        print(f"explanation written to {explain}", file=sys.stderr)
    failed = sum("error" in r for r in records)
    if failed:
        print(
            f"medvl: {failed} of {len(records)} scan(s) could not be read; reports written for the rest",
            file=sys.stderr,
        )
    return 1 if failed else 0

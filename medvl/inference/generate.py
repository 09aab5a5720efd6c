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

Many scans (``medvl generate-report``): :func:`collect_scans` (files, folders, CSV files) and
:func:`generate_many` (batches, a progress bar, one :class:`ScanResult` per scan in input order, an unreadable scan
an error result), written by :func:`generate_report_command` as CSV / JSON lines rows (:data:`OUTPUT_COLUMNS`), one
explanation PNG per scan and one DICOM SR per study (:mod:`medvl.inference.sr`).
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from medvl.data.scans import load_scan
from medvl.devices import resolve_device
from medvl.errors import ConfigError, DataError, InvalidImageError, MedvlError, RunError
from medvl.inference.scan_reader import ScanReader
from medvl.models import report_head as rh
from medvl.models.adamatch import AdaMatchRun
from medvl.models.memory import SharedMemory
from medvl.models.report_bundle import ReportHeadBundle
from medvl.models.report_head import KeywordHints
from medvl.runs import trained_jpg_compatible, training_data


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
        #: DICOMs read as MIMIC-CXR-JPG was made, as the run's training data were (``prepare --jpg-compatible``)
        self.jpg_compatible = False

    @classmethod
    def load(cls, run: str | Path, device: str | torch.device = "cpu") -> ReportGenerator:
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
        gen = cls(report, adamatch_run, device)
        gen.jpg_compatible = trained_jpg_compatible(run)
        return gen

    @property
    def uses_keywords(self) -> bool:
        return self.head.cfg.use_keywords

    def read(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Scans -> (B, 1, S, S) at the run's size; the first unreadable file raises."""
        return torch.stack([load_scan(p, self.image_size, jpg_compatible=self.jpg_compatible) for p in paths])

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
        if beams is not None and (isinstance(beams, bool) or not isinstance(beams, int) or beams < 1):
            raise ConfigError(f"beams must be a positive integer (1 = greedy), got {beams!r}")
        beams = beams or g.beams
        bs = batch_size or g.batch_size
        rules = rh.decoding_rules(self.tokenizer, g)  # built once: NearRepeatBan reads the whole vocabulary
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
                logits_processor=rules,
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


# ------------------------------------------------------------------------------ many scans (medvl generate-report)

#: What a folder given to ``medvl generate-report`` is searched for (recursively, any case).
SCAN_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")
#: The columns of ``--out FILE.csv`` / the keys of ``--out FILE.jsonl``, one row per scan in input order.
OUTPUT_COLUMNS = (
    "input",
    "status",
    "error",
    "report",
    "score",
    "keywords",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "explanation",
)


def collect_scans(
    inputs: Sequence[str | Path], *, image_column: str = "image", image_root: str | Path | None = None
) -> list[Path]:
    """The scans ``inputs`` name, in order: a file as is (a missing one too: it becomes an error row), a folder's
    DICOM, PNG and JPG files (:data:`SCAN_SUFFIXES`, recursively, sorted), a ``.csv`` file's ``image_column``
    (relative paths from ``image_root``, default the CSV's folder)."""
    scans: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in SCAN_SUFFIXES and p.is_file())
            if not found:
                print(f"medvl: note: no {', '.join(SCAN_SUFFIXES)} files under {item}", file=sys.stderr)
            scans.extend(found)
        elif item.suffix.lower() == ".csv" and item.is_file():
            try:
                table = pd.read_csv(item, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{item}: unreadable CSV ({exc})") from None
            if image_column not in table.columns:
                raise DataError(
                    f"{item}: no column {image_column!r} (its columns: {list(table.columns)[:12]}); "
                    "name the image column with --image-column"
                )
            root = Path(image_root) if image_root is not None else item.parent
            for cell in table[image_column]:
                path = Path(cell.strip()).expanduser()
                scans.append(path if path.is_absolute() or not cell.strip() else root / path)
        else:
            scans.append(item)
    if not scans:
        raise InvalidImageError(f"no scans found in {', '.join(map(str, inputs))}")
    return scans


@dataclass
class ScanResult:
    """One scan's outcome: its report (None when it could not be read, ``error`` says why), its DICOM header
    (read without pixels; None for PNG and JPG), its labels and its explanation PNG (when asked for)."""

    input: str
    report: GeneratedReport | None = None
    error: str = ""
    header: pydicom.Dataset | None = None
    labels: dict[str, float | None] | None = None
    explanation: str = ""
    image: torch.Tensor | None = None  # (1, S, S), kept only when asked for

    @property
    def ok(self) -> bool:
        return self.report is not None

    def uids(self) -> tuple[str, str, str]:
        h = self.header
        if h is None:
            return "", "", ""
        return tuple(str(h.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))


def _trained_on_jpgs(run: str | Path) -> bool:
    files = training_data(run).get("image_files")
    return isinstance(files, dict) and bool(files.get("jpg")) and not files.get("dcm")


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def explanation_panel(
    gen: ReportGenerator, image: torch.Tensor, report: GeneratedReport, name: str
) -> np.ndarray:
    """One scan (1, S, S) with the keyword boxes given to the decoder (all AdaMatch keywords for a no-keyword model)
    and the report as the title: (H, W, 3) uint8."""
    from medvl.inference.explain import render_explanation

    img = image.unsqueeze(0).to(gen.device)
    patches = gen.adamatch_run.encode_images(img)
    kws = (
        gen.adamatch_run.image_keywords(None, top_k=gen.head.cfg.num_keywords, patches=patches)[0]
        if gen.adamatch_run.keywords is not None
        else []
    )
    if gen.uses_keywords:
        used = {k.word for k in report.keywords}
        kws = [k for k in kws if k.word in used]
    title = name + "\n" + "\n".join(textwrap.wrap(report.text or "(empty report)", 60)[:6])
    s = gen.adamatch_run.image_size
    frame = F.interpolate(img, size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return render_explanation(frame.cpu().numpy(), patches, 0, keywords=kws, title=title)


def generate_many(
    gen: ReportGenerator,
    scans: Sequence[str | Path],
    *,
    beams: int | None = None,
    explain_dir: str | Path | None = None,
    keep_images: bool = False,
    workers: int = 1,
) -> Iterator[ScanResult]:
    """Reports for many scans, batch by batch (the run's ``generation.batch_size``), yielded in input order, with a
    progress bar on stderr. A scan that cannot be read (any reader error, a missing file) is a result with
    ``error`` set and the others go on. ``explain_dir``: one PNG per readable scan, ``NNNNN_<name>.png`` (its
    position in ``scans``, from 1). ``workers`` > 1: the scans are read in that many processes
    (:class:`~medvl.inference.scan_reader.ScanReader`)."""
    paths = [Path(p) for p in scans]
    if explain_dir is not None:
        Path(explain_dir).mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(paths))))
    step = max(1, gen.generation.batch_size)
    with (
        ScanReader(gen.image_size, workers, gen.jpg_compatible) as reader,
        tqdm(total=len(paths), desc="generate-report", unit="scan", file=sys.stderr, mininterval=0.5) as bar,
    ):
        for start in range(0, len(paths), step):
            results, images = [], []
            for path, (image, header, error) in zip(
                paths[start : start + step], reader.read(paths[start : start + step]), strict=True
            ):
                result = ScanResult(str(path), error=error, header=header)
                if error:
                    bar.write(f"medvl: error: {error}", file=sys.stderr)
                else:
                    images.append(image)
                results.append(result)
            readable = [r for r in results if not r.error]
            if readable:
                reports = gen.generate(torch.stack(images), beams=beams)
                labels, _ = _labels_of([r.text for r in reports])
                for j, (result, report) in enumerate(zip(readable, reports, strict=True)):
                    result.report = report
                    result.labels = labels[j] if labels is not None else None
                    if keep_images:
                        result.image = images[j]
                    if explain_dir is not None:
                        k = start + results.index(result) + 1  # the scan's position among all inputs
                        png = Path(explain_dir) / f"{k:0{width}d}_{Path(result.input).stem}.png"
                        Image.fromarray(explanation_panel(gen, images[j], report, result.input)).save(png)
                        result.explanation = str(png)
            for result in results:
                bar.update(1)
                yield result


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


def output_row(result: ScanResult, *, as_csv: bool) -> dict[str, Any]:
    """A result as one row of :data:`OUTPUT_COLUMNS`: keywords as ``word (score); ...`` in CSV, as a list of
    ``{"word", "score", "box"}`` in JSON; a non-finite score as blank / null."""
    rep = result.report
    keywords = rep.keywords if rep is not None else []
    study, series, sop = result.uids()
    return {
        "input": result.input,
        "status": "ok" if result.ok else "error",
        "error": result.error,
        "report": rep.text if rep is not None else "",
        "score": _finite(rep.score) if rep is not None else None,
        "keywords": "; ".join(f"{k.word} ({k.score:.3f})" for k in keywords)
        if as_csv
        else [{"word": k.word, "score": _finite(k.score), "box": list(k.box)} for k in keywords],
        "study_instance_uid": study,
        "series_instance_uid": series,
        "sop_instance_uid": sop,
        "explanation": result.explanation,
    }


class _RowWriter:
    """``--out FILE.csv`` or ``FILE.jsonl``, written row by row (and flushed) as scans finish."""

    def __init__(self, path: Path):
        self.path, self.as_csv = path, path.suffix.lower() == ".csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "w", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.fh, fieldnames=list(OUTPUT_COLUMNS)) if self.as_csv else None
        if self.csv is not None:
            self.csv.writeheader()

    def write(self, result: ScanResult) -> None:
        row = output_row(result, as_csv=self.as_csv)
        if self.csv is not None:
            self.csv.writerow({k: "" if v is None else v for k, v in row.items()})
        else:
            self.fh.write(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _json_record(result: ScanResult, image_size: int) -> dict[str, Any]:
    if not result.ok:
        return {"scan": result.input, "error": result.error}
    rep = result.report
    return {
        "scan": result.input,
        "report": rep.text,
        "score": _finite(rep.score),
        "tokens": rep.tokens,
        "labels": result.labels,
        "keywords": [{"word": k.word, "score": _finite(k.score), "box": list(k.box)} for k in rep.keywords],
        "image_size": image_size,
    }


def _write_srs(results: list[ScanResult], sr_dir: Path, run: Path) -> tuple[list[Path], list[str]]:
    """One Basic Text SR per study of the DICOM results: (files written, errors one line each)."""
    from medvl.inference.sr import SourceImage, write_study_sr

    studies: dict[str, list[SourceImage]] = {}
    errors = []
    for r in results:
        missing = [k for k in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID") if not r.header.get(k)]
        if missing:
            errors.append(f"{r.input}: no SR, the DICOM header lacks {', '.join(missing)}")
            continue
        studies.setdefault(str(r.header.StudyInstanceUID), []).append(SourceImage(r.header, r.report.text))
    written = []
    for study, images in studies.items():
        try:
            written.append(write_study_sr(images, sr_dir, run_name=run.name))
        except (MedvlError, ValueError, AttributeError) as exc:  # a source header highdicom cannot use
            errors.append(f"SR of study {study}: {exc}")
    return written, errors


def generate_report_command(
    scans: Sequence[str | Path],
    *,
    run: str | Path,
    beams: int | None = None,
    explain: str | Path | None = None,
    explain_dir: str | Path | None = None,
    as_json: bool = False,
    out: str | Path | None = None,
    sr: str | Path | None = None,
    image_column: str = "image",
    image_root: str | Path | None = None,
    workers: int = 1,
    jpg_compatible: bool | None = None,
    device: str | None = None,
) -> int:
    """``medvl generate-report INPUT... --run RUN [--out FILE.csv|FILE.jsonl] [--explain-dir DIR] [--sr DIR] ...``.

    INPUTs are scan files, folders (searched recursively for :data:`SCAN_SUFFIXES`) or CSV files (column
    ``image_column``). Every readable scan gets a report; one that cannot be read gets an error row (and a one-line
    error on stderr) and the rest go on. Returns 0 when every scan got a report, 2 when any could not be read (or
    its SR could not be written).

    ``out``: one row per scan in input order (:data:`OUTPUT_COLUMNS`), as CSV or JSON lines (always valid JSON:
    non-finite numbers are null). Without ``out`` the reports go to standard output, as text or (``as_json``) one
    JSON list of ``{"scan", "report", "score", "tokens", "labels", "keywords", "image_size"}`` or
    ``{"scan", "error"}``. ``explain``: every readable scan's panel stacked in one PNG; ``explain_dir``: one PNG per
    scan. ``sr``: one DICOM Basic Text SR per study of the DICOM scans (:mod:`medvl.inference.sr`). ``workers``:
    processes reading the scans (a scan whose reading ends its process is an error row saying so).
    ``jpg_compatible``: read DICOMs as MIMIC-CXR-JPG was made (None: as the run's training data were read).
    ``device``: where the models run (None: CUDA when available, else the CPU).
    """
    if explain is not None and Path(explain).suffix.lower() != ".png":
        raise InvalidImageError(f"--explain must name a .png file, got {explain}")
    if out is not None and Path(out).suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"--out must name a .csv or .jsonl file, got {out}")
    if sr is not None:
        from medvl.inference.sr import require_highdicom

        require_highdicom()  # before the model loads
    where = resolve_device(device)  # before the scans are searched and the model loads
    paths = collect_scans(scans, image_column=image_column, image_root=image_root)
    gen = ReportGenerator.load(run, device=where)
    if jpg_compatible is not None:
        gen.jpg_compatible = jpg_compatible
    elif _trained_on_jpgs(run) and any(p.suffix.lower() == ".dcm" for p in paths):
        print(
            "medvl: note: this run was trained on JPGs only; --jpg-compatible reads the DICOMs the way "
            "MIMIC-CXR-JPG was made (without it: their VOI window)",
            file=sys.stderr,
        )
    writer = _RowWriter(Path(out)) if out is not None else None
    results: list[ScanResult] = []
    try:
        for result in generate_many(
            gen, paths, beams=beams, explain_dir=explain_dir, keep_images=explain is not None, workers=workers
        ):
            if writer is not None:
                writer.write(result)
            results.append(result)
    finally:
        if writer is not None:
            writer.close()
    ok = [r for r in results if r.ok]
    unread = len(results) - len(ok)
    if as_json:
        print(json.dumps([_json_record(r, gen.image_size) for r in results], indent=2, allow_nan=False))
    elif writer is None:
        for r in ok:
            print(f"== {r.input} ==")
            print(r.report.text or "(empty report)")
            if r.report.keywords:
                print("keywords: " + ", ".join(f"{k.word} ({k.score:.2f})" for k in r.report.keywords))
            print()
    if explain is not None and ok:
        panels = [explanation_panel(gen, r.image, r.report, r.input) for r in ok]
        canvas = np.full((sum(p.shape[0] for p in panels), max(p.shape[1] for p in panels), 3), 255, np.uint8)
        y = 0
        for p in panels:
            canvas[y : y + p.shape[0], : p.shape[1]] = p
            y += p.shape[0]
        Path(explain).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(explain, format="PNG")
        print(f"explanation written to {explain}", file=sys.stderr)
    sr_errors: list[str] = []
    if sr is not None:
        dicoms = [r for r in ok if r.header is not None]
        written, sr_errors = _write_srs(dicoms, Path(sr), Path(run))
        for line in sr_errors:
            print(f"medvl: error: {line}", file=sys.stderr)
        others = len(ok) - len(dicoms)
        note = f" ({others} PNG/JPG scan(s) belong to no DICOM study: no SR for them)" if others else ""
        print(f"{len(written)} DICOM SR document(s) written to {sr}{note}", file=sys.stderr)
    if writer is not None:
        print(f"{len(ok)} report(s), {unread} error row(s): {out}", file=sys.stderr)
    if unread:
        print(
            f"medvl: {unread} of {len(results)} scan(s) could not be read; the others have their reports",
            file=sys.stderr,
        )
    return 2 if unread or sr_errors else 0

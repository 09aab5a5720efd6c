"""Python API: load trained runs and use them.

>>> import medvl
>>> pipe = medvl.load("demo_out")            # a demo directory, a pipeline folder or any run directory
>>> rep = pipe.generate_report("scan.dcm")   # GeneratedReport(text, tokens, score, keywords)
>>> syn = pipe.synthesize("Small left pleural effusion.", seed=0)   # Synthesis (images (1, 1, S, S))
>>> exp = pipe.explain("scan.png", word="effusion", out="explain.png")
>>> m = pipe.match("scan.png", "Cardiomegaly.")   # MatchResult: scores and each word's best box
>>> pipe.save_pretrained("medvl-phantom")     # every run in one folder, with a README.md model card
>>> pipe = medvl.Pipeline.from_pretrained("medvl-phantom")   # on any machine

``medvl.load`` accepts a demo output directory (``runs/<stage>/`` inside), a pipeline folder
(``<stage>/`` inside), or one run directory of any stage; the runs a stage was built from
(``stage.json``'s ``from``) are found too, and a report or diffusion run carries its own copy of
AdaMatch. Which run gives which part is :data:`medvl.registry.STAGES`'s; parts load on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import medvl.registry as registry
from medvl.data.scans import ScanLike, load_scan
from medvl.devices import resolve_device
from medvl.errors import ConfigError, InvalidImageError, InvalidReportError, RunError
from medvl.inference.explain import explain_command, explain_image
from medvl.report.card import write_model_card
from medvl.runs import find_runs, save_run_set, trained_jpg_compatible
from medvl.text.labeler import decode_report


@dataclass
class WordMatch:
    """One report word and the adaptive patch it matched best: ``box`` (x0, y0, x1, y1) normalised,
    x to the image's right; ``similarity`` the cosine; ``negated`` words are left out of the score."""

    word: str
    box: tuple[float, float, float, float]
    similarity: float
    negated: bool


@dataclass
class MatchResult:
    """AdaMatch scores of one (scan, report) pair: image-to-report (mean over patches of the best
    word) and report-to-image (mean over affirmed content words of the best patch), plus per word."""

    image_to_report: float
    report_to_image: float
    words: list[WordMatch] = field(default_factory=list)


class Pipeline:
    """The trained parts of medvl behind one object. Every method runs in eval mode, without gradients.

    ``runs`` maps stage names (:data:`medvl.registry.STAGES`) to run directories; each part loads on
    first use. :meth:`save_pretrained` writes the whole set as one folder that
    :meth:`from_pretrained` (or :func:`medvl.load`) reads back anywhere.
    """

    def __init__(self, runs: dict[str, Path], device: str | None = None):
        self.runs = dict(runs)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._parts: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> Pipeline:
        """Load a folder written by :meth:`save_pretrained` (or a demo directory, or a run directory)."""
        return cls(find_runs(directory), device=device)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write every run of this pipeline into ``directory/<stage>/`` (weights, configs, tokenizers,
        evaluation records; no training state), with the links between runs made relative so the folder
        can be copied to another machine, and a ``README.md`` model card. Returns ``directory``."""
        directory = Path(directory)
        saved = save_run_set(self.runs, directory)
        write_model_card(directory, saved)
        return directory

    # ---- components
    def part(self, stage: str) -> Any:
        """The inference object of the ``stage`` run (``registry.STAGES[stage].loader``), loaded once."""
        if stage not in self._parts:
            if stage not in self.runs:
                raise RunError(
                    f"no {stage} run loaded: train one with `medvl train {stage}` (or load a demo directory)"
                )
            self._parts[stage] = registry.loader(stage)(self.runs[stage], device=self.device)
        return self._parts[stage]

    @property
    def adamatch(self):
        """The :class:`~medvl.models.adamatch.AdaMatchRun` (from the AdaMatch run or a copy inside a later run)."""
        if "adamatch" not in self._parts:
            load = registry.loader("adamatch")
            errors: list[RunError] = []
            for stage in registry.holders("adamatch"):
                if stage in self.runs:
                    try:
                        self._parts["adamatch"] = load(self.runs[stage], device=self.device)
                        break
                    except RunError as exc:
                        errors.append(exc)
            else:
                if errors:  # say why the first holder could not be loaded (an older layout, a missing file)
                    raise errors[0]
                raise RunError(f"no AdaMatch model among {sorted(self.runs)}")
        return self._parts["adamatch"]

    @functools.cached_property
    def _adamatch_jpg_compatible(self) -> bool:
        """Whether the run holding the AdaMatch model was trained on DICOMs read as MIMIC-CXR-JPG was made."""
        stage = next((s for s in registry.holders("adamatch") if s in self.runs), None)
        return stage is not None and trained_jpg_compatible(self.runs[stage])

    @property
    def reporter(self):
        """The :class:`~medvl.inference.generate.ReportGenerator` of the report run."""
        return self.part("report")

    @property
    def synthesizer(self):
        """The :class:`~medvl.inference.synthesize.Synthesizer` of the diffusion run."""
        return self.part("diffusion")

    # ---- inputs
    def _batch(
        self, scans: ScanLike | Sequence[ScanLike], size: int, jpg_compatible: bool = False
    ) -> tuple[torch.Tensor, bool]:
        """One scan (a path, (H, W) or (1, H, W)) or many (a list, (B, H, W) or (B, 1, H, W))."""
        if isinstance(scans, (str, Path)):
            items, single = [scans], True
        elif isinstance(scans, (np.ndarray, torch.Tensor)):
            # (H, W, 3) or (H, W, 4): one colour scan, not H scans of width 3
            colour = scans.ndim == 3 and scans.shape[-1] in (3, 4) and scans.shape[0] > 4
            if scans.ndim == 2 or (scans.ndim == 3 and scans.shape[0] == 1) or colour:
                items, single = [scans], True
            elif scans.ndim in (3, 4):
                items, single = list(scans), False
            else:
                raise InvalidImageError(
                    f"scans must be (H, W), (B, H, W) or (B, 1, H, W); got {tuple(scans.shape)}"
                )
        else:
            items, single = list(scans), False
        if not items:
            raise InvalidImageError("no scans given")
        return torch.stack([load_scan(s, size, jpg_compatible=jpg_compatible) for s in items]), single

    # ---- the four jobs
    def generate_report(self, scans: ScanLike | Sequence[ScanLike], beams: int | None = None):
        """Scan(s) -> :class:`~medvl.inference.generate.GeneratedReport` (one, or a list for a list of scans):
        the text, tokens, score and the AdaMatch keywords given as hints, with their boxes."""
        rep = self.reporter
        images, single = self._batch(scans, rep.image_size, rep.jpg_compatible)  # DICOMs read as in training
        out = rep.generate(images, beams=beams)
        return out[0] if single else out

    def synthesize(
        self,
        reports: str | Sequence[str],
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        sampler: str | None = None,
    ):
        """Report(s) -> :class:`~medvl.inference.synthesize.Synthesis`: ``images`` (B, 1, S, S) in [-1024, 1024] and
        the keypatch boxes that guided each. Same seed, same image. ``sampler="fast"`` draws with the pipeline's
        distilled student (``medvl train distill``) in a few network passes."""
        reports = decode_report(reports)
        if not isinstance(reports, str):
            reports = [decode_report(r) for r in reports]
        if isinstance(reports, str) and not reports.strip():
            raise InvalidReportError("the report is empty")
        synth = self.part("distill") if sampler == "fast" and "distill" in self.runs else self.synthesizer
        return synth.synthesize_with_keypatches(
            reports, steps=steps, guidance=guidance, seed=seed, sampler=sampler
        )

    def explain(self, scan: ScanLike, word: str | None = None, out: str | Path | None = None, top_k: int = 6):
        """Scan -> :class:`~medvl.inference.explain.Explanation`: ranked keywords with boxes, all adaptive boxes
        (P, 4), and the similarity map (S, S) of ``word``; drawn to ``out`` (PNG) when given."""
        run = self.adamatch
        image = load_scan(scan, run.image_size, jpg_compatible=self._adamatch_jpg_compatible)[0]
        return explain_image(run, image, out=out, word=word, top_k=top_k)

    @torch.no_grad()
    def match(self, scan: ScanLike, report: str) -> MatchResult:
        """AdaMatch scores of (scan, report) and the best patch of each report word."""
        report = decode_report(report)
        if not isinstance(report, str) or not report.strip():
            raise InvalidReportError("the report is empty")
        run = self.adamatch
        image = load_scan(scan, run.image_size, jpg_compatible=self._adamatch_jpg_compatible).unsqueeze(0)
        patches = run.encode_images(image)
        tok = run.tokenizer.encode([report])
        tensors = {k: v.to(run.device) for k, v in tok.tensors().items()}
        text = run.model.encode_text(**tensors)
        s_i2t, s_t2i = run.model.scores(patches, text)
        img = F.normalize(patches.features[0], dim=-1)  # (P, D)
        txt = F.normalize(text.features[0], dim=-1)  # (T, D)
        sim = txt @ img.t()  # (T, P)
        words: list[WordMatch] = []
        word_ids = tok.word_ids[0].tolist()
        for pos in torch.nonzero(text.word_mask[0]).flatten().tolist():
            w = tok.words[0][word_ids[pos]]
            best = int(sim[pos].argmax())
            words.append(
                WordMatch(
                    w.text,
                    tuple(float(v) for v in patches.boxes[0, best].tolist()),
                    float(sim[pos, best]),
                    w.negated,
                )
            )
        return MatchResult(float(s_i2t[0, 0]), float(s_t2i[0, 0]), words)


def load(run_dir: str | Path, device: str | None = None) -> Pipeline:
    """Load a demo directory or a run directory (and the runs it was built from) for inference."""
    return Pipeline(find_runs(run_dir), device=device)


def evaluate(
    kind: str,
    run: str | Path,
    data: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    **options,
) -> dict:
    """``medvl evaluate KIND``: :func:`medvl.eval.evaluate`, handed the dataset's evaluation classifier (trained
    once per dataset and cached) when the evaluation scores scans and none is given in ``options``."""
    from medvl.eval import check_runs
    from medvl.eval import evaluate as evaluate_run

    check_runs(kind, run)  # a wrong --run or --device is an error before the classifier is trained
    options["device"] = resolve_device(options.get("device"))
    for option, kinds in (("features", ("diffusion",)), ("labeler", ("report", "cyclic"))):
        if options.get(option) and kind not in kinds:
            raise ConfigError(f"--{option} applies to `medvl evaluate {' | '.join(kinds)}`, not {kind}")
    if registry.evaluation(kind).uses_classifier and "classifier" not in options:
        from medvl.train.classifier import evaluation_classifier

        options["classifier"] = evaluation_classifier(data, device=options["device"])
    return evaluate_run(kind, run=Path(run), data=Path(data), split=split, out=out, **options)


# ---- command-line entry points (``medvl generate-report | synthesize | explain``); the report and the
# diffusion stacks are imported only by the command that uses them (MONAI alone takes seconds).


def generate_report_command(*args, **kwargs) -> int:
    from medvl.inference.generate import generate_report_command as command

    return command(*args, **kwargs)


def synthesize_command(*args, **kwargs) -> int:
    from medvl.inference.synthesize import synthesize_command as command

    return command(*args, **kwargs)


__all__ = [
    "Pipeline",
    "MatchResult",
    "WordMatch",
    "load",
    "evaluate",
    "find_runs",
    "generate_report_command",
    "synthesize_command",
    "explain_command",
]

"""Natural-language generation metrics through pycocoevalcap: BLEU 1-4, METEOR 1.5, ROUGE-L, CIDEr-D.

Tokenisation (stated in every metrics file as :data:`TOKENISATION`): lowercase; tokens are decimal
numbers ("3.5"), runs of letters and digits, and the full stop as its own token (repeats collapsed); every other punctuation mark is dropped;
tokens joined by single spaces. This is R2Gen's cleaning in spirit (lowercase, punctuation removed,
sentences kept apart by " . "), done without the Java PTB tokenizer. References are not truncated.

The scorers get exactly those token strings, one hypothesis and one reference per sample, so the
numbers are pycocoevalcap's own: BLEU with its ``closest`` reference-length option, corpus-level
(not an average of sentence BLEU); METEOR 1.5 through Java (``-l en -norm``); ROUGE-L (beta 1.2,
mean over samples); CIDEr-D with document frequencies from the evaluated references. When Java is
missing or METEOR fails, ``nlg.meteor`` is absent and ``missing["nlg.meteor"]`` says why (never 0).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TOKENISATION = (
    "lowercase; tokens = decimal numbers, runs of [a-z0-9], and '.' as its own token; other "
    "punctuation dropped; repeated '.' collapsed; "
    "space-joined; references not truncated; pycocoevalcap BLEU(closest), METEOR 1.5 (-l en -norm), "
    "ROUGE-L, CIDEr-D"
)

_TOKEN = re.compile(r"\d+\.\d+|[a-z0-9]+|\.")

NLG_KEYS = ("nlg.bleu1", "nlg.bleu2", "nlg.bleu3", "nlg.bleu4", "nlg.meteor", "nlg.rouge_l", "nlg.cider")


def tokenize_report(text: str) -> str:
    """Report text -> the token string the scorers see (see the module docstring)."""
    tokens = _TOKEN.findall(text.lower())
    # Collapse repeated full stops ("..", ". .") into one sentence break.
    out: list[str] = []
    for t in tokens:
        if t == "." and (not out or out[-1] == "."):
            continue
        out.append(t)
    return " ".join(out)


@dataclass
class NLGResult:
    """``scores``: ``nlg.*`` keys -> value in [0, 1] (CIDEr in [0, 10]); ``missing``: key -> reason."""

    scores: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)


def java_problem() -> str | None:
    """None when a working ``java`` is on PATH, else the reason METEOR cannot run."""
    java = shutil.which("java")
    if java is None:
        return "java not found on PATH (METEOR 1.5 runs as a Java program); install a JRE to score METEOR"
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"java at {java} does not run: {exc}"
    if proc.returncode != 0:
        return f"java at {java} exits with status {proc.returncode}"
    return None


class NLGScorer:
    """Scores many (references, hypotheses) sets with one METEOR Java process (it takes ~10 s to start).

    Use as a context manager: ``with NLGScorer() as scorer: scorer.score(refs, hyps)``.
    """

    def __init__(self, meteor: bool = True):
        self._want_meteor = meteor
        self._meteor: Any = None
        self._meteor_problem: str | None = None if meteor else "not requested"

    def __enter__(self) -> NLGScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._meteor is not None:
            scorer, self._meteor = self._meteor, None
            del scorer  # its __del__ stops the Java process

    def _meteor_scorer(self) -> Any:
        if self._meteor is None and self._meteor_problem is None:
            self._meteor_problem = java_problem()
            if self._meteor_problem is None:
                from pycocoevalcap.meteor.meteor import Meteor

                try:
                    self._meteor = Meteor()
                except OSError as exc:
                    self._meteor_problem = f"cannot start METEOR: {exc}"
        return self._meteor

    def score(self, references: Sequence[str], hypotheses: Sequence[str]) -> NLGResult:
        """Score generated reports against references (one reference per sample).

        references, hypotheses: raw report texts, same length N >= 1; they are tokenised here.
        """
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if len(references) != len(hypotheses):
            raise ValueError(f"{len(references)} references but {len(hypotheses)} generated reports")
        if not references:
            raise ValueError("no reports to score")
        gts = {i: [tokenize_report(r)] for i, r in enumerate(references)}
        res = {i: [tokenize_report(h)] for i, h in enumerate(hypotheses)}
        scores: dict[str, float] = {}
        per_sample: dict[str, list[float]] = {}
        missing: dict[str, str] = {}

        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            scores[f"nlg.bleu{n + 1}"] = float(bleu[n])
            per_sample[f"nlg.bleu{n + 1}"] = [float(x) for x in bleu_each[n]]
        meteor = self._meteor_scorer() if self._want_meteor else None
        if meteor is not None:
            try:
                score, each = meteor.compute_score(gts, res)
                scores["nlg.meteor"], per_sample["nlg.meteor"] = float(score), [float(x) for x in each]
            except Exception as exc:  # the Java scorer failing must not sink the other metrics
                missing["nlg.meteor"] = f"METEOR failed: {type(exc).__name__}: {exc}"
                self.close()
                self._meteor_problem = missing["nlg.meteor"]
        else:
            missing["nlg.meteor"] = self._meteor_problem or "not requested"
        rouge, rouge_each = Rouge().compute_score(gts, res)
        scores["nlg.rouge_l"] = float(rouge)
        per_sample["nlg.rouge_l"] = [float(x) for x in rouge_each]
        cider, cider_each = Cider().compute_score(gts, res)
        scores["nlg.cider"] = float(cider)
        per_sample["nlg.cider"] = [float(x) for x in cider_each]
        return NLGResult(scores=scores, missing=missing, per_sample=per_sample)


def nlg_metrics(references: Sequence[str], hypotheses: Sequence[str], *, meteor: bool = True) -> NLGResult:
    """Score one set of generated reports against references (see :class:`NLGScorer`)."""
    with NLGScorer(meteor=meteor) as scorer:
        return scorer.score(references, hypotheses)


def bleu4(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 alone (pure Python, no Java): cheap enough for validation during training."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts = {i: [tokenize_report(r)] for i, r in enumerate(references)}
    res = {i: [tokenize_report(h)] for i, h in enumerate(hypotheses)}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])

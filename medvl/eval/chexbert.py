"""CheXbert (Smit et al. 2020) as a second report labeler for clinical efficacy, read from local disk only.

``--labeler chexbert:CKPT[,bert=DIR]``:

* ``CKPT``: CheXbert's checkpoint as its authors ship it (``chexbert.pth``): a torch dict whose
  ``model_state_dict`` holds ``module.bert.*`` (a BERT encoder) and ``module.linear_heads.<i>.*`` (14 linear heads
  on the [CLS] feature, one per observation in CheXbert's order, 4 classes each: blank, positive, negative,
  uncertain; the No Finding head has fewer, blank and positive). It is read with ``torch.load(weights_only=True)``
  (tensors only) or from a ``.safetensors`` file of the same keys.
* ``DIR``: a local Hugging Face folder of ``bert-base-uncased`` (its ``config.json`` and ``vocab.txt``; no weights
  are read from it, the checkpoint holds them). Without it, the architecture is bert-base's (``BertConfig()``)
  and the vocabulary comes from a ``bert-base-uncased`` already in the local Hugging Face cache; nothing is
  downloaded either way.

Reports are prepared as CheXbert prepares them (stripped, newlines and runs of spaces to one space), tokenized with
[CLS] ... [SEP], at most 512 pieces, and each head's argmax is mapped to CheXpert's values: blank -> NaN,
positive -> 1, negative -> 0, uncertain -> -1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizerFast

from medvl.errors import ConfigError, RunError
from medvl.text.chexpert import CHEXPERT_LABELS

#: CheXbert's observation order (its heads' order): CheXpert's with No Finding moved last.
CHEXBERT_CONDITIONS: tuple[str, ...] = (*CHEXPERT_LABELS[1:], CHEXPERT_LABELS[0])
#: Head class -> CheXpert value (blank, positive, negative, uncertain).
CLASS_VALUES = (np.nan, 1.0, 0.0, -1.0)
MAX_PIECES = 512


@dataclass
class CheXbertSpec:
    checkpoint: Path
    bert: Path | None = None


def parse_labeler(spec: str) -> CheXbertSpec:
    """``chexbert:CKPT[,bert=DIR]`` -> its paths; :class:`ConfigError` for anything else."""
    kind, sep, rest = str(spec).partition(":")
    if kind != "chexbert" or not sep or not rest:
        raise ConfigError(
            f"--labeler {spec!r}: expected chexbert:CKPT or chexbert:CKPT,bert=DIR (CKPT: CheXbert's chexbert.pth, "
            "DIR: a local bert-base-uncased folder)"
        )
    ckpt, _, bert = rest.partition(",bert=")
    return CheXbertSpec(Path(ckpt).expanduser(), Path(bert).expanduser() if bert else None)


class CheXbertModel(nn.Module):
    """CheXbert's ``bert_labeler``: BERT, dropout, and one linear head per observation on the [CLS] feature."""

    def __init__(self, config: BertConfig, head_classes: Sequence[int], pooler: bool = True):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=pooler)
        self.dropout = nn.Dropout(0.1)
        self.linear_heads = nn.ModuleList([nn.Linear(config.hidden_size, int(c)) for c in head_classes])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        cls = self.dropout(cls)
        return [head(cls) for head in self.linear_heads]


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of a CheXbert checkpoint, without the ``module.`` prefix (DataParallel's)."""
    if not path.is_file():
        raise RunError(f"CheXbert checkpoint {path} does not exist (it is read from local disk only)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RunError(f"{path} is not a CheXbert checkpoint of tensors ({type(exc).__name__})") from None
        state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise RunError(f"{path} holds no model_state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("linear_heads.") for k in state):
        raise RunError(f"{path} is not a CheXbert checkpoint (no linear_heads.* weights)")
    return state


def _tokenizer_and_config(spec: CheXbertSpec) -> tuple[BertTokenizerFast, BertConfig]:
    if spec.bert is not None:
        if not (spec.bert / "config.json").is_file():
            raise RunError(
                f"bert={spec.bert}: no config.json there (a local bert-base-uncased folder is expected)"
            )
        if not (spec.bert / "vocab.txt").is_file() and not (spec.bert / "tokenizer.json").is_file():
            raise RunError(f"bert={spec.bert}: no vocab.txt (or tokenizer.json) there")
        config = BertConfig.from_pretrained(str(spec.bert), local_files_only=True)
        tokenizer = BertTokenizerFast.from_pretrained(str(spec.bert), local_files_only=True)
        return tokenizer, config
    from huggingface_hub import try_to_load_from_cache

    vocab = try_to_load_from_cache("bert-base-uncased", "vocab.txt")  # a cache lookup, never a download
    if not isinstance(vocab, str):
        raise RunError(
            "CheXbert needs bert-base-uncased's vocabulary, which is not in the local Hugging Face cache: pass "
            "chexbert:CKPT,bert=DIR with DIR a local folder holding its config.json and vocab.txt"
        )
    return BertTokenizerFast(vocab_file=vocab, do_lower_case=True), BertConfig()


class CheXbertLabeler:
    """CheXbert loaded from local files: ``label_reports(texts)`` -> (N, 14) in CheXpert's label order."""

    name = "chexbert"

    def __init__(self, model: CheXbertModel, tokenizer, source: str, batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.batch_size = batch_size
        self.max_length = min(MAX_PIECES, int(model.bert.config.max_position_embeddings))
        self._columns = [CHEXPERT_LABELS.index(name) for name in CHEXBERT_CONDITIONS]

    @classmethod
    def load(cls, spec: str | CheXbertSpec, device: str | torch.device = "cpu") -> CheXbertLabeler:
        spec = parse_labeler(spec) if isinstance(spec, str) else spec
        state = read_checkpoint(spec.checkpoint)
        tokenizer, config = _tokenizer_and_config(spec)
        heads = sorted({int(k.split(".")[1]) for k in state if k.startswith("linear_heads.")})
        if heads != list(range(len(CHEXBERT_CONDITIONS))):
            raise RunError(f"{spec.checkpoint}: {len(heads)} heads, CheXbert has {len(CHEXBERT_CONDITIONS)}")
        classes = [int(state[f"linear_heads.{i}.weight"].shape[0]) for i in heads]
        rows = state.get("bert.embeddings.word_embeddings.weight")
        if rows is not None and len(tokenizer) != rows.shape[0]:
            raise RunError(
                f"{spec.checkpoint}: its embeddings have {rows.shape[0]} rows, the vocabulary "
                f"{'in ' + str(spec.bert) if spec.bert else 'of bert-base-uncased'} {len(tokenizer)} pieces"
            )
        model = CheXbertModel(config, classes, pooler=any(k.startswith("bert.pooler.") for k in state))
        state = {
            k: v for k, v in state.items() if k != "bert.embeddings.position_ids"
        }  # a buffer, not a weight
        own = model.state_dict()
        wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state and k != "bert.embeddings.position_ids"]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected or wrong:
            raise RunError(
                f"{spec.checkpoint} does not fit the BERT config "
                f"{'of ' + str(spec.bert) if spec.bert else 'bert-base (pass bert=DIR for another)'}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}"
            )
        model.load_state_dict(state, strict=False)
        try:
            model.to(device)
        except RuntimeError as exc:
            raise RunError(f"CheXbert does not fit on {device}: {exc}") from None
        return cls(model, tokenizer, f"{spec.checkpoint.name}" + (f", bert={spec.bert}" if spec.bert else ""))

    @staticmethod
    def prepare(text: str) -> str:
        """CheXbert's cleaning: strip, newlines and runs of whitespace to one space."""
        return re.sub(r"\s+", " ", str(text).replace("\n", " ")).strip()

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each head's logits (N, classes) for ``texts``."""
        device = next(self.model.parameters()).device
        outs: list[list[torch.Tensor]] = [[] for _ in self.model.linear_heads]
        for i in range(0, len(texts), self.batch_size):
            batch = [self.prepare(t) for t in texts[i : i + self.batch_size]]
            enc = self.tokenizer(
                batch, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
            heads = self.model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            for j, h in enumerate(heads):
                outs[j].append(h.float().cpu())
        return [torch.cat(o) if o else torch.zeros(0, 1) for o in outs]

    def label_reports(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 14) float in CheXpert's label order: 1 / 0 / -1, NaN blank."""
        out = np.full((len(texts), len(CHEXPERT_LABELS)), np.nan)
        if not len(texts):
            return out
        values = np.asarray(CLASS_VALUES)
        for head, column in zip(self.logits(list(texts)), self._columns, strict=True):
            out[:, column] = values[head.argmax(1).numpy()]
        return out

    @property
    def convention(self) -> str:
        return (
            f"CheXbert ({self.source}) on generated and reference reports; its heads' argmax: blank -> NaN, positive "
            "-> 1, negative -> 0, uncertain -> -1; then the same R2Gen convention and averages as ce.*"
        )


__all__ = ["CHEXBERT_CONDITIONS", "CheXbertLabeler", "CheXbertModel", "parse_labeler", "read_checkpoint"]

"""``medvl export onnx --run RUN --out DIR``: a report run's networks as ONNX files, checked against PyTorch.

Written to DIR (each with a fixed batch-dynamic signature; all float inputs float32):

* ``image_encoder.onnx``: AdaMatch's image encoder with its adaptive patch layer (``grid_sample``, opset 16+; exported at 18).
  ``images`` (B, 1, S, S) in medvl's [-1024, 1024] at the run's size S (resize before: the export does not
  include the antialiased resize) -> ``patch_features`` (B, P, D), ``patch_boxes`` (B, P, 4) ``x0, y0, x1, y1``
  in [0, 1], ``global_features`` (B, D).
* ``report_conditions.onnx``: the report head's conditioning states. ``patch_features``, ``patch_boxes`` and, for
  a head trained with keyword hints, ``keyword_ids`` (B, K) int64 (0 = none), ``keyword_scores`` (B, K),
  ``keyword_boxes`` (B, K, 4) -> ``conditions`` (B, N, E), ``condition_mask`` (B, N) int64. The keyword hints come
  from AdaMatch's keyword vocabulary (:meth:`medvl.inference.generate.ReportGenerator.conditions`); all zeros
  means no hint.
* ``report_decoder.onnx``: the decoder's full-sequence forward (no key/value cache): ``input_ids`` (B, T) int64
  starting with BOS, ``attention_mask`` (B, T) int64, ``conditions``, ``condition_mask`` -> ``logits`` (B, T, V).
  Greedy decoding calls it once per new token with the sequence so far and takes the argmax of the last
  position's logits (suppressing PAD, BOS and UNK, stopping at EOS), as :func:`greedy_decode` does; T is at most
  the head's ``max_length``.
* ``export.json``: the shapes, the token ids (PAD, BOS, EOS, UNK), the tokenizer folder to decode with (the run's
  ``report_head/tokenizer/``), the opset, the exporter used, and the largest difference to PyTorch per output.

Each file is run with onnxruntime on the CPU on the same inputs as PyTorch and the export fails unless the outputs
agree (``atol``/``rtol``). The exporter is torch's default (dynamo) with the TorchScript exporter as the fallback;
a part neither can export raises :class:`~medvl.errors.ExportError` naming it.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvl.errors import RunError
from medvl.inference.generate import ReportGenerator

logger = logging.getLogger(__name__)

OPSET = 18
ATOL = 1e-3
RTOL = 1e-3
DECODER_FILE = "report_decoder.onnx"
ENCODER_FILE = "image_encoder.onnx"
CONDITIONS_FILE = "report_conditions.onnx"


class ExportError(RunError):
    """A part of a run that cannot be exported to ONNX (or whose ONNX outputs differ from PyTorch's)."""


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise ExportError(
            "ONNX export needs the onnx extra: pip install 'medvl[onnx]' (onnx, onnxruntime, onnxscript)"
        ) from None
    return onnxruntime


class ImageEncoder(nn.Module):
    """AdaMatch's image encoder as a plain tensor function (for export)."""

    def __init__(self, adamatch: nn.Module):
        super().__init__()
        self.adamatch = adamatch

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches = self.adamatch.patches(self.adamatch.backbone(images))
        return patches.features, patches.boxes, patches.global_features


class ReportConditions(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, patch_features, patch_boxes, keyword_ids=None, keyword_scores=None, keyword_boxes=None):
        return self.head.encode_conditions(
            patch_features, patch_boxes, keyword_ids, keyword_scores, keyword_boxes
        )


class ReportDecoder(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, input_ids, attention_mask, conditions, condition_mask):
        out = self.head.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=conditions,
            encoder_attention_mask=condition_mask,
            use_cache=False,
        )
        return out.logits


@dataclass
class Part:
    name: str
    file: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]


def _export(part: Part, path: Path) -> str:
    """Export ``part`` to ``path``; the exporter that worked ("dynamo" or "torchscript")."""
    args = tuple(part.inputs.values())
    names = list(part.inputs)
    errors = []
    for dynamo in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    batch = torch.export.Dim("batch", min=1, max=1024)
                    shapes = {
                        n: {
                            ax: (batch if label == "batch" else torch.export.Dim.AUTO)
                            for ax, label in axes.items()
                        }
                        for n, axes in part.dynamic.items()
                    }
                    options = {
                        "dynamic_shapes": tuple(shapes.get(n) for n in names),
                        "external_data": False,
                        "optimize": True,
                        "verbose": False,
                    }
                else:
                    options = {"dynamic_axes": {**part.dynamic, **{o: {0: "batch"} for o in part.outputs}}}
                torch.onnx.export(
                    part.module,
                    args,
                    str(path),
                    input_names=names,
                    output_names=part.outputs,
                    opset_version=OPSET,
                    dynamo=dynamo,
                    **options,
                )
            return "dynamo" if dynamo else "torchscript"
        except Exception as exc:  # an exporter's failure: try the other, then report both
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {str(exc)[:300]}")
            path.unlink(missing_ok=True)
    raise ExportError(f"the {part.name} cannot be exported to ONNX ({'; '.join(errors)})")


def _check(part: Part, path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Run the ONNX file with onnxruntime (CPU) on ``inputs``; the largest absolute difference per output."""
    ort = _require_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed_names = {i.name for i in session.get_inputs()}
    feed = {k: v.cpu().numpy() for k, v in inputs.items() if k in feed_names}
    got = session.run(part.outputs, feed)
    with torch.no_grad():
        want = part.module(*inputs.values())
    want = want if isinstance(want, (tuple, list)) else (want,)
    diffs = {}
    for name, g, w in zip(part.outputs, got, want, strict=True):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            raise ExportError(f"{path.name}: {name} has shape {g.shape} in ONNX, {w.shape} in PyTorch")
        diffs[name] = float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()) if g.size else 0.0
        if not np.allclose(g, w, atol=ATOL, rtol=RTOL):
            raise ExportError(
                f"{path.name}: {name} differs from PyTorch by up to {diffs[name]:.3g} (atol {ATOL}, rtol {RTOL})"
            )
    return diffs


def _with_batch(inputs: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """The same inputs with batch size ``b`` (rows repeated / cut, float rows perturbed)."""
    out = {}
    for k, v in inputs.items():
        rep = v.repeat(*((b + v.shape[0] - 1) // v.shape[0], *([1] * (v.dim() - 1))))[:b]
        out[k] = rep + 0.01 * torch.randn_like(rep) if rep.is_floating_point() and k != "patch_boxes" else rep
    return out


@torch.no_grad()
def export_onnx(run: str | Path, out: str | Path, *, batch: int = 2) -> dict[str, Any]:
    """Export a report run's image encoder, conditioning and decoder to ``out`` (see the module docstring) and
    check each against PyTorch with onnxruntime on the CPU; returns what ``export.json`` records."""
    _require_onnx()
    run, out = Path(run), Path(out)
    generator = ReportGenerator.load(run, device="cpu")
    adamatch = generator.adamatch_run.model.eval()
    head = generator.head.eval()
    if head.cfg.label_states:
        raise ExportError(
            f"{run}: this report head adds its finding states to every word embedding inside the decoder "
            "(model.label_states), which the exported decoder graph does not carry yet; export a head trained "
            "without model.label_states"
        )
    size = generator.adamatch_run.image_size
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 1, size, size, generator=g) * 2048 - 1024).float()
    feats, boxes, _, _ = generator.conditions(images)
    k = head.cfg.num_keywords
    cond_inputs: dict[str, torch.Tensor] = {"patch_features": feats, "patch_boxes": boxes}
    if head.cfg.use_keywords:
        n_kw = len(head.keyword_vocabulary)
        cond_inputs.update(
            keyword_ids=torch.randint(0, n_kw + 1, (batch, k), generator=g),
            keyword_scores=torch.rand(batch, k, generator=g),
            keyword_boxes=torch.rand(batch, k, 4, generator=g).sort(-1).values,
        )
    conditions, condition_mask = head.encode_conditions(*cond_inputs.values())
    t = min(8, head.cfg.max_length)
    ids = torch.randint(4, head.decoder.config.vocab_size, (batch, t), generator=g)
    ids[:, 0] = head.bos_id
    dec_inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "conditions": conditions,
        "condition_mask": condition_mask,
    }
    parts = [
        Part(
            "image encoder",
            ENCODER_FILE,
            ImageEncoder(adamatch),
            {"images": images},
            ["patch_features", "patch_boxes", "global_features"],
            {"images": {0: "batch"}},
        ),
        Part(
            "report conditioning",
            CONDITIONS_FILE,
            ReportConditions(head),
            cond_inputs,
            ["conditions", "condition_mask"],
            {n: {0: "batch"} for n in cond_inputs},
        ),
        Part(
            "report decoder",
            DECODER_FILE,
            ReportDecoder(head),
            dec_inputs,
            ["logits"],
            {
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "conditions": {0: "batch"},
                "condition_mask": {0: "batch"},
            },
        ),
    ]
    record: dict[str, Any] = {
        "run": str(run),
        "opset": OPSET,
        "image_size": size,
        "num_patches": int(feats.shape[1]),
        "uses_keywords": bool(head.cfg.use_keywords),
        "num_keywords": int(k) if head.cfg.use_keywords else 0,
        "max_length": int(head.cfg.max_length),
        "tokens": {"pad": head.pad_id, "bos": head.bos_id, "eos": head.eos_id, "unk": head.unk_id},
        "tokenizer": str(run / "report_head" / "tokenizer"),
        "tolerance": {"atol": ATOL, "rtol": RTOL},
        "files": {},
    }
    for part in parts:
        path = out / part.file
        exporter = _export(part, path)
        diffs = _check(part, path, part.inputs)
        other = _with_batch(part.inputs, batch + 1)  # another batch size: the batch axis is dynamic
        if part.name == "report decoder":
            other["input_ids"], other["attention_mask"] = (
                other["input_ids"][:, :3],
                other["attention_mask"][:, :3],
            )
        diffs_other = _check(part, path, other)
        record["files"][part.file] = {
            "exporter": exporter,
            "inputs": {n: list(v.shape) for n, v in part.inputs.items()},
            "max_abs_diff": {n: max(diffs[n], diffs_other[n]) for n in diffs},
        }
        logger.info("%s: %s (%s exporter), max |ONNX - PyTorch| %s", part.name, path, exporter, diffs)
    (out / "export.json").write_text(json.dumps(record, indent=2))
    return record


def export_command(run: str | Path, out: str | Path) -> int:
    """``medvl export onnx``: export, then one line per file."""
    record = export_onnx(run, out)
    for name, info in record["files"].items():
        worst = max(info["max_abs_diff"].values())
        print(f"{Path(out) / name}: {info['exporter']} exporter, max |ONNX - PyTorch| {worst:.2e}")
    return 0


def greedy_decode(
    decoder: Callable[[dict[str, np.ndarray]], np.ndarray],
    conditions: np.ndarray,
    condition_mask: np.ndarray,
    *,
    bos: int,
    eos: int,
    suppress: tuple[int, ...] = (),
    max_length: int,
) -> np.ndarray:
    """Greedy decoding with a full-sequence decoder (``report_decoder.onnx``): ``decoder(feed) -> logits (B, T,
    V)``; returns (B, <= max_length - 1) token ids after BOS, EOS kept, PAD (0) after it."""
    b = conditions.shape[0]
    seq = np.full((b, 1), bos, dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    for _ in range(max_length - 1):
        logits = decoder(
            {
                "input_ids": seq,
                "attention_mask": np.ones_like(seq),
                "conditions": conditions,
                "condition_mask": condition_mask,
            }
        )[:, -1].astype(np.float64)
        logits[:, list(suppress)] = -np.inf
        nxt = np.where(done, 0, logits.argmax(-1))
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        done |= nxt == eos
        if done.all():
            break
    return seq[:, 1:]


__all__ = ["ExportError", "export_command", "export_onnx", "greedy_decode"]

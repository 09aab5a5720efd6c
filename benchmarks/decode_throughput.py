"""Report decoding throughput: today's decoding vs earlier ones, same weights and inputs, in one run.

The report head (GPT-2 decoder with cross-attention, shared memory queried by patches *and* by every
decoded word, keyword hints) decodes from fixed random conditioning:

- ``fast`` (today's ``generate()``): beam search stepped directly on the decoder's weights
  (``medvl.models.decoding``: one preallocated KV cache; on the CPU, the memory's answer to each word computed once
  per decode and a report's beams attending to its conditioning as one query group), the frozen memory's keys and
  values projected once;
- ``--grouped``: also ``fast`` with the beams grouped on any device (off by default on a GPU until measured there);
- ``--graphed``: also ``fast`` with fixed-shape steps, which a GPU replays as one CUDA graph per step (off by
  default until measured there; on the CPU the fixed shapes alone, no graph);
- ``--compiled``: also ``fast`` with the fixed-shape step compiled by ``torch.compile`` (tried, not a default);
- ``generate``: the same model through transformers' ``generate()`` (0.3.0's decoding: memory keys and values
  projected once, the beam cache leaving the cross-attention rows in place);
- ``--static-cache``: also ``generate`` with a preallocated self-attention cache, with which transformers compiles
  the decoding step on CUDA;
- ``plain`` (0.2.0): transformers' ``generate()`` with the whole memory matrix re-projected for every decoded
  token and every cache row reordered;
- ``--no-kv-cache``: also the same model without the decoder's KV cache.

Repeats alternate between the variants and the best time of each is kept (a shared machine's load hits both
alike); all variants must give the same sequences. Every report is forced to the full length
(``min_new_tokens = max_new_tokens``) so all do the same number of steps. Time excludes the AdaMatch image
encoder (the decoder's own cost is measured).

Settings:
  anchor  docs/design.md section 9's R2GenCMN comparison: d_model 512, 3 layers, 8 heads, memory 2048 x 512
          top-32, vocabulary 4,000, beam 3, trigram blocking, 100 tokens, batch 8
          (anchor on 2 CPU cores: R2GenCMN's beam search 0.06 reports/s, a GPT-2 decoder 2.27 reports/s)
  demo    configs/report/demo.yaml sizes (d_model 256, memory 512 x 256), same decoding

R2GenCMN's own beam search on 2 CPU cores (anchor size, beam 3, 100 tokens): 9.2 s for one report and 0.116
reports/s at batch 8 (measured side by side with this head's 0.2.0 decoding in one process); the JSON's ``env``
keeps these figures and each row's ratio to them.

Run::

    python benchmarks/decode_throughput.py --settings anchor --batch 1 8       # CPU: one report and batch 8
    python benchmarks/decode_throughput.py --device cuda --batch 1 64 256 512 --static-cache

Writes ``benchmarks/results/decode_throughput_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import kernel_profile  # benchmarks/ (this script's folder)
import torch
from transformers.cache_utils import EncoderDecoderCache

from medvl.models import decoding as dec
from medvl.models import report_head as rh
from medvl.models.memory import MemoryConfig

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = {
    "anchor": {"n_embd": 512, "n_layer": 3, "n_head": 8, "memory": (2048, 512, 8, 32), "vocab": 4000},
    "demo": {"n_embd": 256, "n_layer": 3, "n_head": 8, "memory": (512, 256, 8, 32), "vocab": 2000},
    "tiny": {"n_embd": 32, "n_layer": 2, "n_head": 4, "memory": (64, 32, 4, 8), "vocab": 100},  # tests only
}
PATCHES, VISUAL_DIM, KEYWORDS = 64, 128, 8  # AdaMatch demo: 8 x 8 adaptive patches, 128-d; 8 keyword hints


def build_head(setting: str, tokens: int, device: torch.device):
    s = SETTINGS[setting]
    slots, dim, heads, topk = s["memory"]
    cfg = rh.ReportHeadConfig(
        n_embd=s["n_embd"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        max_length=tokens + 1,
        dropout=0.0,
        num_keywords=KEYWORDS,
        memory=MemoryConfig(num_slots=slots, dim=dim, num_heads=heads, topk=topk, dropout=0.0),
    )
    torch.manual_seed(0)
    keywords = [f"kw{i}" for i in range(200)]
    return (
        rh.ReportHead(cfg, vocab_size=s["vocab"], visual_dim=VISUAL_DIM, keyword_vocabulary=keywords)
        .to(device)
        .eval()
    )


def conditioning(batch: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(batch, PATCHES, VISUAL_DIM, generator=g).to(device)
    boxes = torch.rand(batch, PATCHES, 4, generator=g).sort(-1).values.to(device)
    ids = torch.randint(1, 201, (batch, KEYWORDS), generator=g)
    hints = rh.KeywordHints(
        ids,
        torch.randn(batch, KEYWORDS, generator=g),
        torch.rand(batch, KEYWORDS, 4, generator=g),
        [[] for _ in range(batch)],
    )
    return feats, boxes, hints.to(device)


# R2GenCMN's beam search on 2 CPU cores, anchor size, beam 3, 100 tokens (side by side with 0.2.0's decoding)
R2GENCMN_2CPU = {"one_report_s": 9.2, "batch8_reports_per_s": 0.116}
VARIANTS = ("fast", "grouped", "graphed", "compiled", "generate", "plain", "no_kv_cache", "static")


@contextlib.contextmanager
def plain_decoding(head) -> Iterator[None]:
    """0.2.0's decoding: the memory projected for every query, every cache row reordered by beam search."""
    reorder = dec.BeamCache.reorder_cache
    head.memory.cache_kv = False
    dec.BeamCache.reorder_cache = EncoderDecoderCache.reorder_cache
    try:
        yield
    finally:
        dec.BeamCache.reorder_cache = reorder
        head.memory.cache_kv = True


@contextlib.contextmanager
def on_every_device(switch: dict) -> Iterator[None]:
    """A decoding switch (``dec.GROUPED_BEAMS``: a report's beams as one query group; ``dec.STATIC_STEPS``:
    fixed-shape steps, replayed as CUDA graphs on a GPU) turned on for the CPU and the GPU alike, for a while."""
    before = dict(switch)
    switch.update(cpu=True, gpu=True)
    try:
        yield
    finally:
        switch.update(before)


@contextlib.contextmanager
def compiled_steps() -> Iterator[None]:
    """Fixed-shape steps whose step is compiled by ``torch.compile`` (inductor; the warm-up call compiles)."""
    real = dec.DecoderSteps

    def make(*args, **kw):
        steps = real(*args, **{**kw, "static": True})
        steps.step = torch.compile(steps.step, dynamic=False)
        return steps

    dec.DecoderSteps = make
    try:
        yield
    finally:
        dec.DecoderSteps = real


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_decoding(
    head,
    batch: int,
    *,
    beams: int = 3,
    tokens: int = 100,
    ngram: int = 3,
    repeats: int = 2,
    variants: tuple[str, ...] = ("fast", "generate", "plain"),
    device: torch.device | str = "cpu",
    profile: tuple[str, ...] = (),
) -> dict:
    """Best wall time per batch of each variant (after one warm-up each; repeats alternate between variants), the
    reports/s and whether every variant gave the first one's sequences; for the variants in ``profile``, where one
    call's time goes (``benchmarks/kernel_profile.py``, under ``<variant>_profile``)."""
    device = torch.device(device)
    feats, boxes, hints = conditioning(batch, device)

    def run(variant: str):
        kw = dict(
            patch_features=feats,
            patch_boxes=boxes,
            keywords=hints,
            num_beams=beams,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            no_repeat_ngram_size=ngram,
        )
        if variant == "fast":
            return head.generate(**kw)
        if variant == "grouped":  # a report's beams as one query group also where it is off by default (GPU)
            with on_every_device(dec.GROUPED_BEAMS):
                return head.generate(**kw)
        if variant == "compiled":
            with compiled_steps():
                return head.generate(**kw)
        if variant == "graphed":
            with on_every_device(dec.STATIC_STEPS):
                return head.generate(**kw)
        if variant in ("generate", "static"):
            return head.generate(engine="transformers", static_cache=variant == "static", **kw)
        with plain_decoding(head):
            return head.generate(engine="transformers", use_cache=variant != "no_kv_cache", **kw)

    seqs, errors = {}, {}
    with torch.inference_mode():
        for v in variants:
            try:
                seqs[v] = run(v).sequences
            except Exception as exc:  # e.g. a failed CUDA graph capture: the other variants stand
                if v == variants[0]:
                    raise
                errors[v] = repr(exc)[:1000]
        variants = tuple(v for v in variants if v not in errors)
        best = {v: float("inf") for v in variants}
        for _ in range(repeats):
            for v in variants:
                _sync(device)
                t0 = time.perf_counter()
                run(v)
                _sync(device)
                best[v] = min(best[v], time.perf_counter() - t0)
        profiles = {
            v: kernel_profile.profile_calls(lambda v=v: run(v), device, calls=1) for v in profile if v in best
        }
    first = seqs[variants[0]]
    assert first.shape[1] == tokens, first.shape
    row = {"batch": batch, "beams": beams, "tokens": tokens, "no_repeat_ngram_size": ngram}
    for v in variants:
        row[f"{v}_s_per_batch"] = best[v]
        row[f"{v}_reports_per_s"] = batch / best[v]
    row["same_sequences"] = all(torch.equal(seqs[v], first) for v in variants)
    for v, prof in profiles.items():
        row[f"{v}_profile"] = prof
    if errors:
        row["errors"] = errors
    if "plain" in variants and "fast" in variants:
        row["speedup_over_plain"] = best["plain"] / best["fast"]
    if "generate" in variants and "fast" in variants:
        row["speedup_over_generate"] = best["generate"] / best["fast"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--settings", nargs="+", default=["anchor"], choices=sorted(SETTINGS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--ngram", type=int, default=3, help="no_repeat_ngram_size (0: no blocking)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-kv-cache", action="store_true", help="also time the decoder without its KV cache")
    p.add_argument(
        "--static-cache", action="store_true", help="also the fast variant with a static cache (GPU)"
    )
    p.add_argument("--grouped", action="store_true", help="also fast with grouped beams on any device (GPU)")
    p.add_argument(
        "--graphed", action="store_true", help="also fast with fixed-shape steps (CUDA graphs on a GPU)"
    )
    p.add_argument(
        "--compiled", action="store_true", help="also fast with fixed-shape steps compiled by torch.compile"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = (
        ("fast", "generate", "plain")
        + ("grouped",) * args.grouped
        + ("graphed",) * args.graphed
        + ("compiled",) * args.compiled
        + ("no_kv_cache",) * args.no_kv_cache
        + ("static",) * args.static_cache
    )
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = []
    for setting in args.settings:
        head = build_head(setting, args.tokens, device)
        params = sum(p.numel() for p in head.parameters()) / 1e6
        for batch in args.batch:
            row = measure_decoding(
                head,
                batch,
                beams=args.beams,
                tokens=args.tokens,
                ngram=args.ngram,
                repeats=args.repeats,
                variants=variants,
                device=device,
            )
            row = {"setting": setting, "params_m": round(params, 2), **row}
            if setting == "anchor" and device.type == "cpu" and args.beams == 3 and args.tokens == 100:
                if batch == 1:
                    row["faster_than_r2gencmn"] = R2GENCMN_2CPU["one_report_s"] / row["fast_s_per_batch"]
                if batch == 8:
                    row["faster_than_r2gencmn"] = (
                        row["fast_reports_per_s"] / R2GENCMN_2CPU["batch8_reports_per_s"]
                    )
            rows.append(row)
            print(
                f"{setting:7s} batch {batch:3d}: "
                + " | ".join(
                    f"{v} {row[f'{v}_s_per_batch']:.3f} s ({row[f'{v}_reports_per_s']:.2f}/s)"
                    for v in variants
                )
                + f" | same sequences: {row['same_sequences']}",
                flush=True,
            )
    env = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "python": platform.python_version(),
        "decoding": (
            f"beam {args.beams}, no_repeat_ngram_size {args.ngram}, {args.tokens} tokens forced, length_penalty 1.0"
        ),
        "conditioning": f"{PATCHES} patches x {VISUAL_DIM}-d (+ {PATCHES} memory responses) + {KEYWORDS} keyword hints",
        "variants": {
            "fast": "medvl.models.decoding beam search: preallocated KV cache, memory answer once per word (CPU), a "
            "report's beams attending as one query group (CPU)",
            "grouped": "fast with a report's beams as one query group on any device",
            "graphed": "fast with fixed-shape steps (whole-capacity masked attention), each replayed as a CUDA "
            "graph on a GPU; on the CPU the fixed shapes alone",
            "compiled": "fast with fixed-shape steps compiled by torch.compile (inductor, dynamic=False)",
            "generate": "0.3.0: transformers' generate(), memory keys/values projected once, cross-attention cache "
            "rows left in place",
            "plain": "0.2.0: generate(), memory re-projected for every decoded token, every cache row reordered",
            "no_kv_cache": "plain without the decoder's KV cache",
            "static": "generate with a static self-attention cache (compiled by transformers on CUDA)",
        },
        "r2gencmn_2cpu": R2GENCMN_2CPU,
    }
    print()
    print(
        "| setting | batch | fast (s / batch) | generate() (s / batch) | 0.2.0 (s / batch) | over generate() "
        "| over 0.2.0 | reports/s | same sequences |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['batch']} | {r['fast_s_per_batch']:.3f} | {r['generate_s_per_batch']:.3f} | "
            f"{r['plain_s_per_batch']:.3f} | x{r['speedup_over_generate']:.2f} | x{r['speedup_over_plain']:.1f} | "
            f"{r['fast_reports_per_s']:.2f} | {r['same_sequences']} |"
        )
    out = args.out or RESULTS / f"decode_throughput_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""Report decoding throughput: batched beam search with the KV cache vs the same model without it.

The report head (GPT-2 decoder with cross-attention, shared memory queried by patches *and* by every
decoded word, keyword hints) decodes from fixed random conditioning with ``generate()``, once with
``use_cache=True`` and once with ``use_cache=False``, same weights and inputs, side by side in one
run; the two must give the same sequences. Every report is forced to the full length
(``min_new_tokens = max_new_tokens``) so both sides do the same number of steps. Time excludes the
AdaMatch image encoder (the decoder's own cost is measured).

Settings:
  anchor  docs/design.md section 9's R2GenCMN comparison: d_model 512, 3 layers, 8 heads, memory 2048 x 512
          top-32, vocabulary 4,000, beam 3, trigram blocking, 100 tokens, batch 8
          (anchor on 2 CPU cores: R2GenCMN's beam search 0.06 reports/s, a GPT-2 decoder 2.27 reports/s)
  demo    configs/report/demo.yaml sizes (d_model 256, memory 512 x 256), same decoding

Run::

    python benchmarks/decode_throughput.py                    # CPU, both settings
    python benchmarks/decode_throughput.py --device cuda --batch 16 64

Writes ``benchmarks/results/decode_throughput_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = {
    "anchor": {"n_embd": 512, "n_layer": 3, "n_head": 8, "memory": (2048, 512, 8, 32), "vocab": 4000},
    "demo": {"n_embd": 256, "n_layer": 3, "n_head": 8, "memory": (512, 256, 8, 32), "vocab": 2000},
}
PATCHES, VISUAL_DIM, KEYWORDS = 64, 128, 8  # AdaMatch demo: 8 x 8 adaptive patches, 128-d; 8 keyword hints


def build_head(setting: str, tokens: int, device: torch.device):
    from medvl.models.memory import MemoryConfig
    from medvl.models.report_head import ReportHead, ReportHeadConfig

    s = SETTINGS[setting]
    slots, dim, heads, topk = s["memory"]
    cfg = ReportHeadConfig(
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
        ReportHead(cfg, vocab_size=s["vocab"], visual_dim=VISUAL_DIM, keyword_vocabulary=keywords)
        .to(device)
        .eval()
    )


def conditioning(batch: int, device: torch.device):
    from medvl.models.report_head import KeywordHints

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(batch, PATCHES, VISUAL_DIM, generator=g).to(device)
    boxes = torch.rand(batch, PATCHES, 4, generator=g).sort(-1).values.to(device)
    ids = torch.randint(1, 201, (batch, KEYWORDS), generator=g)
    hints = KeywordHints(
        ids,
        torch.randn(batch, KEYWORDS, generator=g),
        torch.rand(batch, KEYWORDS, 4, generator=g),
        [[] for _ in range(batch)],
    )
    return feats, boxes, hints.to(device)


def time_decode(
    head, feats, boxes, hints, *, beams: int, tokens: int, use_cache: bool, repeats: int, device: torch.device
) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` decodes (after one warm-up) and the sequences."""

    def run():
        return head.generate(
            patch_features=feats,
            patch_boxes=boxes,
            keywords=hints,
            num_beams=beams,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            no_repeat_ngram_size=3,
            use_cache=use_cache,
        )

    out = run()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out.sequences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--settings", nargs="+", default=["anchor", "demo"], choices=sorted(SETTINGS))
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for setting in args.settings:
        head = build_head(setting, args.tokens, device)
        params = sum(p.numel() for p in head.parameters()) / 1e6
        for batch in args.batch:
            feats, boxes, hints = conditioning(batch, device)
            with torch.inference_mode():
                t_cache, seq_cache = time_decode(
                    head,
                    feats,
                    boxes,
                    hints,
                    beams=args.beams,
                    tokens=args.tokens,
                    use_cache=True,
                    repeats=args.repeats,
                    device=device,
                )
                t_plain, seq_plain = time_decode(
                    head,
                    feats,
                    boxes,
                    hints,
                    beams=args.beams,
                    tokens=args.tokens,
                    use_cache=False,
                    repeats=args.repeats,
                    device=device,
                )
            assert seq_cache.shape[1] == args.tokens, seq_cache.shape
            rows.append(
                {
                    "setting": setting,
                    "params_m": round(params, 2),
                    "batch": batch,
                    "beams": args.beams,
                    "tokens": args.tokens,
                    "kv_cache_reports_per_s": batch / t_cache,
                    "no_cache_reports_per_s": batch / t_plain,
                    "speedup": t_plain / t_cache,
                    "same_sequences": bool(torch.equal(seq_cache, seq_plain)),
                    "kv_cache_s_per_batch": t_cache,
                    "no_cache_s_per_batch": t_plain,
                }
            )
            r = rows[-1]
            print(
                f"{setting:7s} batch {batch:3d}: KV cache {r['kv_cache_reports_per_s']:7.2f} reports/s | "
                f"no cache {r['no_cache_reports_per_s']:7.2f} reports/s | x{r['speedup']:.1f} | "
                f"same sequences: {r['same_sequences']}",
                flush=True,
            )
    env = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "decoding": f"beam {args.beams}, no_repeat_ngram_size 3, {args.tokens} tokens forced, length_penalty 1.0",
        "conditioning": f"{PATCHES} patches x {VISUAL_DIM}-d (+ {PATCHES} memory responses) + {KEYWORDS} keyword hints",
        "anchor_2cpu_reports_per_s": {"R2GenCMN beam search": 0.06, "GPT-2 decoder generate()": 2.27},
    }
    print()
    print("| setting | batch | KV cache (reports/s) | no cache (reports/s) | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['batch']} | {r['kv_cache_reports_per_s']:.2f} | "
            f"{r['no_cache_reports_per_s']:.2f} | x{r['speedup']:.1f} |"
        )
    out = args.out or RESULTS / f"decode_throughput_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

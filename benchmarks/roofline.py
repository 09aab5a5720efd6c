"""How fast a training step or a decode could run: its operators' FLOPs and memory traffic against a chip's limits.

    python benchmarks/roofline.py                          # diffusion + AdaMatch at the base presets, H200
    python benchmarks/roofline.py --stage diffusion --device-name H100 --measured 96.8
    python benchmarks/roofline.py --stage diffusion --preset tiny --batch 4 --device-name H200
    python benchmarks/roofline.py --stage decode --batch 512     # report decoding, anchor size, beam 3, 100 tokens

A measured MFU says how far a step is from the chip's peak, not how far it could get. This script records every
operator of one forward + backward (``TorchDispatchMode``: the operators a GPU would launch kernels for, views
left out) with its FLOPs (``torch.utils.flop_counter``'s formulas, the same counts as ``FlopCounterMode``; the
CPU's fused attention operators counted with the same attention formula) and the bytes it reads and writes.
With a chip's peak bf16 rate and memory bandwidth it gives two ceilings:

* ``eager``: every operator its own kernel at the roofline (``max(FLOPs / peak, bytes / bandwidth)``), nothing
  fused, no launch cost: what a perfect eager step could reach;
* ``fused``: only the matrix products, convolutions and attention, at the roofline; normalisation, activations,
  additions and copies fused away for free: the ceiling of a compiler that fuses everything else.

Both assume matrix kernels at the chip's full peak, which real kernels reach only in part (often 60-80% for large
products), so a measured MFU is to be read against them, not against 100%. Beside them: the optimiser step's
floor (AdamW fused: fp32 weights, gradients and two moments read, three written, 28 bytes per weight; the EMA
update, 12 bytes per weight), the operators per step (kernel launches in eager mode) and the time per launch at
which launching alone would take as long as the eager ceiling.

Bytes are counted as in a bf16 step (2 bytes per floating-point element; ``--bytes-per-float 4`` for fp32), or,
with ``--autocast``, as bf16 autocast moves them: the step runs under autocast (the CPU's policy where no GPU
runs it, which like CUDA's keeps the norms in fp32) and each tensor counts at its own dtype, the casts included.
Where no GPU is at hand, the step runs on fake tensors (shapes only, nothing computed), so the base sizes take
seconds on a laptop; on CUDA (``--cuda``) it runs once for real. AdaMatch's forward reads a value on the host, so
it runs for real on the CPU (``--batch`` makes it quicker: FLOPs and bytes per image hardly change with it,
except the batch-squared matching term, reported as measured).

``--stage decode`` counts one ``ReportHead.generate`` of ``--batch`` reports instead (the R2GenCMN comparison
size of ``decode_throughput.py``, beam 3, 100 tokens forced, trigram blocking), run for real on the CPU with the
operators a GPU runs (its decoding switches; each word's memory query made afresh). Its images/s are reports/s;
decoding trains nothing, so there is no optimiser floor, and its operators per token step say how much a launch
may cost before the host, not the chip, sets the pace.

Prints a table and writes ``benchmarks/results/roofline_<stage>_<preset>_b<batch>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_profile  # noqa: E402
import unet_scale_speed  # noqa: E402

#: Dense bf16 tensor-core peak (FLOP/s) and memory bandwidth (bytes/s) from NVIDIA's data sheets (SXM parts).
DEVICES = {
    "H200": {"peak_bf16": 989e12, "bandwidth": 4.8e12},
    "H100": {"peak_bf16": 989e12, "bandwidth": 3.35e12},
    "A100": {"peak_bf16": 312e12, "bandwidth": 2.039e12},
}
STAGES = ("diffusion", "adamatch", "decode")


def chip_named(device_name: str) -> str | None:
    """The :data:`DEVICES` entry whose name is in ``device_name`` ("NVIDIA H100 80GB HBM3" -> "H100"), or None."""
    return next((name for name in DEVICES if name in device_name), None)


DECODE_TOKENS = 100
#: Kinds (``kernel_profile.kind_of``) whose operators a fusing compiler keeps as kernels of their own.
MATRIX_KINDS = ("matmul", "conv", "attention")
#: Operators that move no data besides the views ``OpOverload.is_view`` names (a view not marked as one).
FREE_OPS = {"_unsafe_view"}
# fused AdamW, fp32: weight, gradient, two moments read; weight, two moments written
ADAMW_BYTES_PER_WEIGHT = 28
EMA_BYTES_PER_WEIGHT = 12  # EMA lerp, fp32: average and weight read, average written

CPU_ATTENTION = {  # the CPU's fused attention operators, which flop_counter's registry does not list
    "_scaled_dot_product_flash_attention_for_cpu": lambda q, k, v, *a, **kw: sdpa_flop_count(
        q.shape, k.shape, v.shape
    ),
    "_scaled_dot_product_flash_attention_for_cpu_backward": lambda g, q, k, v, *a, **kw: (
        sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
    ),
}


def tensor_bytes(tree, bytes_per_float: int | None) -> int:
    """Bytes of the tensors in ``tree``: floating-point elements at ``bytes_per_float`` each (None: their own
    dtype's size), others at their dtype's size."""
    return sum(
        t.numel() * (bytes_per_float if bytes_per_float and t.is_floating_point() else t.element_size())
        for t in tree_flatten(tree)[0]
        if isinstance(t, torch.Tensor)
    )


def composite_only(func, args, kwargs) -> bool:
    """Whether ``func`` runs as other operators on the device of its arguments (a composite with no kernel of its
    own for the CPU or CUDA, such as ``linear`` or ``scaled_dot_product_attention``)."""
    name = func.name()
    if func.namespace == "prim" or not torch._C._dispatch_has_kernel_for_dispatch_key(
        name, "CompositeImplicitAutograd"
    ):
        return False
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    key = "CUDA" if any(t.is_cuda for t in tensors) else "CPU"
    return not torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


class OpCounter(TorchDispatchMode):
    """Records ``(name, kind, flops, bytes)`` for every operator that runs under it and moves data."""

    def __init__(self, bytes_per_float: int | None = 2):
        super().__init__()
        self.bytes_per_float = bytes_per_float
        self.rows: list[tuple[str, str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if composite_only(func, args, kwargs):
            # an operator with no kernel of its own for the device (seen here under inference mode) is counted by
            # the operators it runs
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        name = packet.__name__
        if func.namespace == "prim" or func.is_view or name in FREE_OPS:
            return out
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        elif name in CPU_ATTENTION:
            flops = CPU_ATTENTION[name](*args, **kwargs)
        else:
            flops = 0
        moved = tensor_bytes((args, kwargs), self.bytes_per_float) + tensor_bytes(out, self.bytes_per_float)
        self.rows.append((name, kernel_profile.kind_of(f"aten::{name}"), int(flops), moved))
        return out


def count_ops(fn: Callable[[], None], bytes_per_float: int | None = 2) -> list[tuple[str, str, int, int]]:
    counter = OpCounter(bytes_per_float)
    with counter:
        fn()
    return counter.rows


def ceilings(
    rows, weights: int, images: int, peak: float, bandwidth: float, ema: bool, top_ops: int = 12
) -> dict:
    """The eager and fused ceilings of :func:`count_ops`' rows on a chip (``peak`` FLOP/s, ``bandwidth``
    bytes/s), with the optimiser's floor for ``weights`` trained weights, by kind and for the ``top_ops``
    operators that take the most roofline time."""
    flops = sum(r[2] for r in rows)
    compute_s = flops / peak

    def roof(r) -> float:
        return max(r[2] / peak, r[3] / bandwidth)

    eager_s = sum(roof(r) for r in rows)
    fused_s = sum(roof(r) for r in rows if r[1] in MATRIX_KINDS)

    def totals(field: int) -> dict[str, dict]:
        """The rows summed by name (``field`` 0) or kind (1), the largest roofline time first."""
        out: dict[str, dict] = {}
        for r in rows:
            k = out.setdefault(
                r[field], {"kind": r[1], "ops": 0, "tflop": 0.0, "gb": 0.0, "roofline_ms": 0.0}
            )
            k["ops"] += 1
            k["tflop"] += r[2] / 1e12
            k["gb"] += r[3] / 1e9
            k["roofline_ms"] += roof(r) * 1e3
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["roofline_ms"]))

    by_kind = {kind: {k: v for k, v in t.items() if k != "kind"} for kind, t in totals(1).items()}
    for k in by_kind.values():
        k["share_of_eager"] = k["roofline_ms"] / 1e3 / eager_s if eager_s else None
    top = list(totals(0).items())[:top_ops]
    optimiser_s = weights * (ADAMW_BYTES_PER_WEIGHT + (EMA_BYTES_PER_WEIGHT if ema else 0)) / bandwidth
    return {
        "tflop_per_step": flops / 1e12,
        "tflop_per_image": flops / images / 1e12,
        "gb_per_step": sum(r[3] for r in rows) / 1e9,
        "ops_per_step": len(rows),
        "compute_ms": compute_s * 1e3,
        "eager_ms": eager_s * 1e3,
        "fused_ms": fused_s * 1e3,
        "optimiser_ms": optimiser_s * 1e3,
        "mfu_ceiling_eager": compute_s / (eager_s + optimiser_s) if eager_s else None,
        "mfu_ceiling_fused": compute_s / (fused_s + optimiser_s) if fused_s else None,
        "images_per_s_ceiling_eager": images / (eager_s + optimiser_s) if eager_s else None,
        "images_per_s_ceiling_fused": images / (fused_s + optimiser_s) if fused_s else None,
        "launch_us_to_match_eager": (eager_s + optimiser_s) / len(rows) * 1e6 if rows else None,
        "by_kind": by_kind,
        "top_operators": [{"name": name, **k} for name, k in top],
    }


def diffusion_step(preset: str, batch: int | None, device: torch.device):
    """One forward + backward of the diffusion head at ``configs/diffusion/<preset>.yaml`` (random weights), its
    trained weights and batch; on the CPU the step runs on fake tensors (shapes only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    cfg, model, word_dim, keypatch_dim = unet_scale_speed.build(preset, device, 3, preset)
    model.train()
    batch = batch or cfg.train.batch_size
    latent = cfg_latent(preset)
    weights = sum(p.numel() for p in model.denoiser.parameters() if p.requires_grad)

    def step():
        torch.manual_seed(0)  # the same conditioning dropped at every call
        feats = unet_scale_speed.features(cfg, batch, word_dim, keypatch_dim, torch.device("cpu"))
        feats = {k: v.to(device) for k, v in feats.items()}
        mu = torch.randn(batch, 3, latent, latent, device=device)
        model(mu, torch.full_like(mu, 0.05), **feats)["loss"].backward()

    run = step
    if device.type == "cpu":
        fake = FakeTensorMode(allow_non_fake_inputs=True)

        def run():
            with fake:
                step()

    run()  # a training step in the steady state: the frozen shared memory's keys and values are cached from now on
    model.zero_grad(set_to_none=True)
    return run, weights, batch


def cfg_latent(preset: str) -> int:
    """The latent side of ``preset``: the one the GPU suite measures at (base 64, others 16)."""
    return 64 if preset == "base" else 16


def adamatch_step(preset: str, batch: int | None, device: torch.device, tmp: Path):
    """One forward + backward of AdaMatch at ``configs/adamatch/<preset>.yaml`` on a small IU-Phantom (random
    weights, the stage's augmentation and collate)."""
    from accelerate.utils import send_to_device

    from medvl.config import resolve_config_path
    from medvl.data.phantom import prepare_phantom
    from medvl.train.stages.adamatch import build_stage

    data = tmp / "phantom"
    prepare_phantom(data, studies=60, size=256, seed=0, workers=1)
    torch.manual_seed(0)
    stage = build_stage(config_path=resolve_config_path("adamatch", preset), overrides=[], data=data)
    model = stage.build_model().to(device)
    model.train()
    batch = batch or stage.train.batch_size
    ds = stage.train_dataset()
    idx = torch.randint(0, len(ds), (batch,), generator=torch.Generator().manual_seed(0)).tolist()
    inputs = send_to_device(stage.collate([ds[i] for i in idx]), device)
    weights = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step():
        loss, _ = stage.training_step(model, inputs)
        loss.backward()

    return step, weights, batch


def autocast(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            fn()

    return run


def decode_call(
    setting: str, batch: int, device: torch.device, tokens: int = DECODE_TOKENS, as_gpu: bool = True
):
    """One ``ReportHead.generate`` (beam 3, ``tokens`` tokens forced, trigram blocking) at
    ``benchmarks/decode_throughput.py``'s ``setting`` (anchor: the R2GenCMN comparison size), for ``batch``
    reports, running the operators a GPU runs: its decoding switches, and each word's memory query made afresh
    (the CPU memoises it per word, reading the words on the host); ``as_gpu=False``: the CPU's own."""
    import decode_throughput

    from medvl.models import decoding

    head = decode_throughput.build_head(setting, tokens, device)
    feats, boxes, hints = decode_throughput.conditioning(batch, device)

    real_step = decoding.DecoderSteps.step

    def counted_step(self, ids):
        """The step, and under :func:`count_ops` the number of its operators (what a CUDA graph would replay in
        one launch), read off the counter's rows."""
        counter = _get_current_dispatch_mode()
        before = len(counter.rows) if isinstance(counter, OpCounter) else None
        out = real_step(self, ids)
        if before is not None:
            run.step_ops.append(len(counter.rows) - before)
        return out

    def run():
        run.step_ops = []
        kind = decoding._kind
        if as_gpu:
            decoding._kind = lambda d: "gpu"
        decoding.DecoderSteps.step = counted_step
        try:
            with torch.inference_mode():
                out = head.generate(
                    patch_features=feats,
                    patch_boxes=boxes,
                    keywords=hints,
                    num_beams=3,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    no_repeat_ngram_size=3,
                )
        finally:
            decoding._kind = kind
            decoding.DecoderSteps.step = real_step
        assert out.sequences.shape == (batch, tokens), out.sequences.shape

    run()  # the steady state: the frozen memory's keys and values are projected once, by this first call
    return run, 0, batch


def report(stage: str, preset: str, batch: int, weights: int, rows, args) -> dict:
    chip = DEVICES[args.device_name]
    out = {
        "benchmark": "roofline",
        "stage": stage,
        "preset": preset,
        "batch": batch,
        "trained_weights": weights,
        "bytes_per_float": None if args.autocast else args.bytes_per_float,
        "autocast": args.autocast,
        "device": args.device_name,
        **chip,
        **ceilings(rows, weights, batch, chip["peak_bf16"], chip["bandwidth"], ema=stage == "diffusion"),
        "torch": torch.__version__,
    }
    if stage == "decode":  # one call decodes `batch` reports: per minute, and per decoded token step
        out["reports_per_min_ceiling_eager"] = 60 * out["images_per_s_ceiling_eager"]
        out["reports_per_min_ceiling_fused"] = 60 * out["images_per_s_ceiling_fused"]
        out["tokens"] = args.tokens
        out["ops_per_token_step"] = out["ops_per_step"] / args.tokens
    if args.measured is not None:
        step_s = batch / args.measured
        out["measured_images_per_s"] = args.measured
        out["measured_mfu"] = out["tflop_per_step"] * 1e12 / step_s / chip["peak_bf16"]
        out["measured_over_eager_ceiling"] = args.measured / out["images_per_s_ceiling_eager"]
    return out


def print_table(r: dict) -> None:
    print(
        f"\n{r['stage']} ({r['preset']}, batch {r['batch']}, {r['trained_weights'] / 1e6:.1f} M weights) "
        f"on {r['device']}: {r['tflop_per_step']:.2f} TFLOP and {r['gb_per_step']:.1f} GB per step, "
        f"{r['ops_per_step']} operators"
    )
    print("| kind | operators | TFLOP | GB | roofline ms | share of eager |\n|---|---:|---:|---:|---:|---:|")
    for kind, k in r["by_kind"].items():
        print(
            f"| {kind} | {k['ops']} | {k['tflop']:.3f} | {k['gb']:.2f} | {k['roofline_ms']:.2f} | "
            f"{k['share_of_eager']:.0%} |"
        )
    print(
        f"compute at peak {r['compute_ms']:.1f} ms; optimiser floor {r['optimiser_ms']:.2f} ms; "
        f"eager ceiling {r['eager_ms']:.1f} ms -> MFU {r['mfu_ceiling_eager']:.0%} "
        f"({r['images_per_s_ceiling_eager']:.0f} images/s); fused ceiling {r['fused_ms']:.1f} ms -> MFU "
        f"{r['mfu_ceiling_fused']:.0%} ({r['images_per_s_ceiling_fused']:.0f} images/s); launch-bound above "
        f"{r['launch_us_to_match_eager']:.1f} us per operator"
    )
    print(
        "top operators: "
        + ", ".join(f"{t['name']} {t['roofline_ms']:.2f} ms" for t in r["top_operators"][:8])
    )
    if "measured_mfu" in r:
        print(
            f"measured {r['measured_images_per_s']:.1f} images/s: MFU {r['measured_mfu']:.1%}, "
            f"{r['measured_over_eager_ceiling']:.0%} of the eager ceiling"
        )


def result_name(r: dict) -> str:
    tail = "_autocast" if r["autocast"] else ""
    return f"roofline_{r['stage']}_{r['preset']}_b{r['batch']}_{r['device'].lower()}{tail}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", nargs="+", choices=STAGES, default=["diffusion", "adamatch"])
    ap.add_argument(
        "--preset", default="base", help="a preset name; for decode, a decode_throughput.py setting"
    )
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's (decode: 64)")
    ap.add_argument("--tokens", type=int, default=DECODE_TOKENS, help="decode: tokens per report")
    ap.add_argument("--device-name", choices=sorted(DEVICES), default="H200")
    ap.add_argument("--bytes-per-float", type=int, choices=(2, 4), default=2)
    ap.add_argument(
        "--autocast",
        action="store_true",
        help="run the step under bf16 autocast and count each tensor at its own dtype (casts and fp32 norms included)",
    )
    ap.add_argument(
        "--measured", type=float, default=None, help="a measured images/s to set beside the ceilings"
    )
    ap.add_argument(
        "--cuda", action="store_true", help="run the step on the GPU instead of fake tensors / CPU"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON path (one stage) or folder (several)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.cuda else "cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stage:
            t0 = time.perf_counter()
            if stage == "diffusion":
                fn, weights, batch = diffusion_step(args.preset, args.batch, device)
            elif stage == "adamatch":
                fn, weights, batch = adamatch_step(args.preset, args.batch, device, Path(tmp))
            else:
                setting = "anchor" if args.preset == "base" else args.preset
                fn, weights, batch = decode_call(setting, args.batch or 64, device, args.tokens)
            counted = fn
            if args.autocast:  # bytes as bf16 autocast moves them, each tensor at its own dtype
                fn = autocast(fn, device)
            rows = count_ops(fn, None if args.autocast else args.bytes_per_float)
            r = report(stage, args.preset, batch, weights, rows, args)
            if stage == "decode":  # the operators outside the decoder's steps stay launches of their own
                inside = sum(counted.step_ops) / args.tokens
                r["ops_per_token_step_in_decoder"] = inside
                r["ops_per_token_step_outside_decoder"] = r["ops_per_token_step"] - inside
            r["count_seconds"] = time.perf_counter() - t0
            print_table(r)
            results.append(r)
    for r in results:
        if args.out is None:
            path = REPO / "benchmarks" / "results" / result_name(r)
        else:
            path = args.out if len(results) == 1 else args.out / result_name(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

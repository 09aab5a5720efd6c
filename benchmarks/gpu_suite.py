"""The GPU figures in one command, every row side by side in one run (about 6-8 minutes on one H200).

    python benchmarks/gpu_suite.py                  # CUDA: base preset sizes
    python benchmarks/gpu_suite.py --tiny           # CPU: tiny presets, a few steps (run by tests/test_gpu_suite.py)

Each finished row is written at once to ``<out>.partial.json`` (removed when the whole JSON is written), so a run
cut short keeps what it measured; ``--skip ROW ...`` then leaves those rows out of a second run, and
``--summarize FIRST.partial.json SECOND.json`` writes the JSON of both, running nothing. On a device lent for a
fixed time, ``--budget-s SECONDS`` bounds the run: every row's essential part (what the top-level keys read) runs
first, its optional parts (larger batches, compiled variants, profiles, roofline counts, extra samplers, decode's
comparison variants, the static cache, the learn row's training time) only while their estimates and the rest's
essentials fit, and an alarm stops the row in flight at the end, keeping what it measured. The JSON's ``budget``
lists what was cut.

Rows (random weights: speed does not depend on them):

* ``diffusion_train``: the diffusion head at ``configs/diffusion/<preset>.yaml`` sizes (UNet + report conditioner +
  frozen shared memory, from ``benchmarks/unet_scale_speed.py``): forward, backward, AdamW and EMA update in bf16
  at the preset's batch, as the training loop runs it (``loop``) and with ``train.speed`` channels-last, fused
  AdamW and cuDNN autotuning (``fast``); ``fast`` again at 2, 4 and 8 times the preset's batch up to the first
  that runs out of memory (``batch_sweep``); then compiled (``compiled``, with ``--compile``, the default on CUDA) at the batch that
  trained fastest (``best_batch``). Images/s and MFU: the FLOPs of one forward + backward at the preset's batch
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (per image, times the batch), over the device's peak
  bf16 rate (``roofline.DEVICES``; unknown devices and the CPU: null). ``profile``: where the eager ``fast`` step's
  time goes at the preset's and the fastest batch (``benchmarks/kernel_profile.py``: the device's busy share of
  the wall time, busy time by kind of kernel, the top kernels), so that a low MFU comes with its reason.
  ``roofline``: the same step's operators counted by ``benchmarks/roofline.py`` (bytes as the autocast step moves
  them) and, on a chip it knows, the MFU an eager and a fused step could reach at most.
* ``adamatch_train``: AdaMatch at ``configs/adamatch/<preset>.yaml`` sizes on batches of the suite's prepared
  dataset (augmentation and tokenising in the stage's collate), ``loop``, ``fast`` and ``compiled`` (as above, at
  the preset's batch); images/s, MFU, the ``fast`` step's ``profile`` and the ``roofline``.
* ``sampling``: seconds per image at batch 8 and 64 (UNet only): the MONAI recipe (DDIM 50, fp32, guidance
  batched), the preset's default sampler, DPM-Solver++(2M) 10 steps in bf16 with guidance (``dpm_solver_10``),
  and the fastest sampler medvl has, a distilled student's (``fastest``: consistency sampling, ``--fast-steps``
  steps, bf16, guidance built in so one pass per step; same UNet); on CUDA also the fastest with the denoiser
  replayed from CUDA graphs (``fastest_graphed``, off by default until measured here; its first call's seconds
  include the capture; whether its latents equal the eager ones). ``sampling_speedup_b8`` / ``_b64``: recipe
  seconds over fastest seconds (eager). ``sampling_equal_auroc`` needs trained weights: it is read from ``--quality``
  (default ``benchmarks/results/sampling_speed_seed7_validate_cpu.json``, written by ``benchmarks/sampling_speed.py --run RUN
  --student RUN_FAST``: whether the student's label AUROC lies inside the recipe's interval on the demo run);
  null with ``--tiny`` or without that file.
* ``decode``: the report head at ``benchmarks/decode_throughput.py``'s anchor size, beam 3, 100 tokens forced,
  trigram blocking: reports/min at batch 64, 256 and 512 (``decode_reports_per_min``: the best), the latency of
  one report (batch 1), today's decoding beside transformers' ``generate()`` and, per batch, with a report's beams
  attending as one query group (``grouped``: on by default on the CPU, measured here before a GPU default), with
  fixed-shape steps replayed as CUDA graphs (``graphed``, batch 1 and per batch: off by default until measured
  here), and the static-cache variant (compiled by transformers on CUDA), each with its sameness; the profile
  of one report's and the first batch's decoding (``fast_profile``: how busy the device is between launches).
* ``loader``: the prepared-dataset loader (the training loop's micro-batch loader with AdaMatch's collate) with
  the preset's ``train.num_workers``, images/s beside AdaMatch's training rate.
* ``prepare``: ``medvl prepare mimic-cxr`` (``prepare_mimic``) on a generated MIMIC-CXR tree of full-size
  (2500 x 3000) JPGs with 12-bit DICOMs spread among them, at 256 px with one worker per CPU
  (``benchmarks/prepare_scale.py``): images/s, the anonymous memory of the process and its workers over the run
  (``memory``: flat when the second half peaks no higher than the first, ``growth_mb``), and a resume (``resume``):
  the same command killed with SIGKILL once half its chunks are done, run again, decodes only the rest and writes
  the same ``images.npy`` and ``index.csv`` byte for byte.
* ``learn`` (``--learn-seconds``, 0 skips it): whether the presets learn. IU-Phantom built at 256 px (``--tiny``:
  60 studies at 64 px), then AdaMatch, the report head, the autoencoder and the diffusion head, each trained by
  ``medvl train`` with the preset for ``--learn-seconds`` (``train.max_seconds``; warm-up shortened to 50 steps, no
  mid-run validation or checkpoints) and validated at the end: each stage's first and last 20 step losses from
  its ``stage.json`` (``loss_curve``), whether they are finite and whether the last are lower, and AdaMatch's
  validation pointing game beside its text-only prior.

Writes ``benchmarks/results/gpu_suite_<device>.json``: the top-level keys :data:`KEYS` (a value a row could not
measure is null, with the reason under ``notes``), the device, torch version, sizes and batches, and every row.
``python benchmarks/suite_table.py RESULT.json`` writes the speed table of README and docs/results.md from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from accelerate.utils import send_to_device
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the sibling benchmarks, imported as modules

import decode_throughput  # noqa: E402
import kernel_profile  # noqa: E402
import prepare_scale  # noqa: E402
import prepare_throughput  # noqa: E402
import roofline  # noqa: E402
import unet_scale_speed  # noqa: E402

from medvl.config import resolve_config_path  # noqa: E402
from medvl.models.diffusion import autocast_context  # noqa: E402
from medvl.train.batches import MicroBatches, micro_batch_loader  # noqa: E402
from medvl.train.distributed import SpeedConfig, adamw_options, apply_speed_options  # noqa: E402
from medvl.train.stages.adamatch import build_stage  # noqa: E402

RESULTS = BENCH / "results"
KEYS = (
    "device",
    "diffusion_train_images_per_s",
    "diffusion_train_mfu",
    "adamatch_train_mfu",
    "sampling_speedup_b8",
    "sampling_speedup_b64",
    "sampling_equal_auroc",
    "decode_reports_per_min",
    "decode_one_report_s",
    "loader_images_per_s",
    "prepare_images_per_s",
)

FULL = {
    "preset": "base",
    "latent": 64,
    "train_steps": 20,
    "warmup": 3,
    "train_batch_factors": (2, 4, 8),  # the diffusion row's larger batches, up to the first that does not fit
    "sample_batches": (8, 64),
    "sample_repeats": 1,
    "decode_setting": "anchor",
    "decode_tokens": 100,
    "decode_batches": (64, 256, 512),
    "decode_variants": ("fast", "grouped", "graphed"),
    "prepare_images": 512,
    "prepare_dicoms": 128,
    "prepare_distinct": 4,
    "prepare_shape": (prepare_throughput.H, prepare_throughput.W),
    "prepare_size": 256,
    "loader_batches": 12,
    "learn_studies": None,  # every study
    "learn_size": 256,
    # --budget-s: guessed seconds on one H200 of each row's essential part (what the top-level keys read) and of
    # each optional part (see Budget)
    "essential_s": {
        "prepare": 60,
        "adamatch_train": 45,
        "loader": 10,
        "diffusion_train": 45,
        "sampling": 110,
        "decode": 40,
    },
    "extra_s": {
        "roofline": 20,
        "profile": 15,
        "batch": 15,  # one larger batch of the diffusion sweep
        "diffusion_compiled": 150,
        "adamatch_compiled": 90,
        "samplers": 30,  # one batch's extra samplers (DPM-Solver++ 10, CUDA graphs)
        "decode_variants": 25,  # one batch's comparison variants (generate(), grouped, graphed)
        "decode_static": 120,
        "learn_fixed": 150,  # the learn row less its training: the phantom, the stages' start-up, evaluation
        "learn_stage": 10,  # the least training per stage worth a learn row
    },
}
TINY = {
    "preset": "tiny",
    "latent": 16,
    "train_steps": 2,
    "warmup": 1,
    "train_batch_factors": (2,),
    "sample_batches": (2, 4),
    "sample_repeats": 1,
    "decode_setting": "tiny",
    "decode_tokens": 8,
    "decode_batches": (2, 4),
    "decode_variants": ("fast", "grouped", "graphed", "generate"),
    "prepare_images": 24,
    "prepare_dicoms": 8,
    "prepare_distinct": 2,
    "prepare_shape": (1200, 1000),  # large enough that the killed run is still running at half its chunks
    "prepare_size": 64,
    "loader_batches": 2,
    "learn_studies": 60,
    "learn_size": 64,
    "essential_s": {
        "prepare": 20,
        "adamatch_train": 5,
        "loader": 2,
        "diffusion_train": 10,
        "sampling": 10,
        "decode": 10,
    },
    "extra_s": {
        "roofline": 2,
        "profile": 2,
        "batch": 3,
        "diffusion_compiled": 60,
        "adamatch_compiled": 30,
        "samplers": 2,
        "decode_variants": 3,
        "decode_static": 10,
        "learn_fixed": 40,
        "learn_stage": 1,
    },
}
LEARN_STAGES = ("adamatch", "report", "autoencoder", "diffusion")


class OutOfTime(BaseException):
    """The suite's time (``--budget-s``) ran out: raised by :meth:`Budget.alarm` in the row in flight. Not an
    ``Exception``, so that a row's handlers of one failed variant let it through."""


class Budget:
    """``--budget-s``: the seconds the whole suite may take (a device lent for a fixed time; no limit without).

    The essential part of each row (what the top-level keys read) starts whenever time is left. An optional part
    (the roofline count, a profile, a larger batch, a compiled variant, the extra samplers, decode's comparison
    variants, the static cache, the learn row) starts only when the time left covers its estimate
    (``extra_s``) and the estimated essentials (``essential_s``) of the rows still to come (``to_come``); what is
    left out is listed in ``cut``. At the end :meth:`alarm` stops the row in flight; what it measured stays."""

    def __init__(self, seconds: float | None, s: dict, clock=time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.deadline = None if seconds is None else clock() + seconds
        self.essential, self.extra = s["essential_s"], s["extra_s"]
        self.to_come: list[str] = []
        self.cut: list[str] = []

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def spare(self) -> float:
        """The time left less the estimated essentials of the rows still to come."""
        return self.left() - sum(self.essential.get(row, 0.0) for row in self.to_come)

    def allows(self, part: str, kind: str | None = None, times: float = 1.0, keep: float = 0.0) -> bool:
        """Whether the optional ``part`` (estimated at ``times`` x ``extra_s[kind or part]``) fits in
        :meth:`spare` less ``keep`` (seconds held for a later part that matters more); a part that does not is
        named in ``cut``."""
        if self.deadline is None or self.spare() - keep >= times * self.extra[kind or part]:
            return True
        self.cut.append(part)
        return False

    def hold(self, kind: str, wanted: bool = True) -> float:
        """Seconds to ``keep`` for the later part ``kind`` (a compiled variant): its estimate, if it fits now."""
        if not wanted or self.deadline is None:
            return 0.0
        return self.extra[kind] if self.spare() >= self.extra[kind] else 0.0

    @contextmanager
    def alarm(self):
        """Within: :class:`OutOfTime` at the deadline (SIGALRM: the main thread only; no alarm without a limit)."""
        if self.deadline is None:
            yield
            return

        def ring(signum, frame):
            raise OutOfTime(f"the time budget ({self.seconds:g} s, --budget-s) ran out")

        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 1e-3))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


UNLIMITED = Budget(None, {"essential_s": {}, "extra_s": {}})


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the chip :func:`roofline.chip_named` finds in ``device_name``, or None."""
    chip = roofline.chip_named(device_name)
    return roofline.DEVICES[chip]["peak_bf16"] if chip else None


def roofline_row(s: dict, fn, weights: int, images: int, device: torch.device, ema: bool) -> dict:
    """One call of ``fn`` (a forward + backward) counted as ``benchmarks/roofline.py`` counts it, each tensor at
    its own dtype (bytes as the autocast step moves them), and, on a chip :data:`roofline.DEVICES` knows, the MFU
    an eager and a fused step could reach at most, to read the measured MFU against. A failure (not with --tiny)
    is recorded and leaves the row standing."""
    try:
        ops = roofline.count_ops(fn, None)
    except Exception as exc:
        if s is TINY:
            raise
        return {"error": repr(exc)[:1000]}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    chip = roofline.chip_named(name)
    out = {"operators": len(ops), "gb_per_step": sum(r[3] for r in ops) / 1e9, "chip": chip}
    if chip is not None:
        spec = roofline.DEVICES[chip]
        c = roofline.ceilings(ops, weights, images, spec["peak_bf16"], spec["bandwidth"], ema=ema)
        keep = ("eager_ms", "fused_ms", "optimiser_ms", "mfu_ceiling_eager", "mfu_ceiling_fused")
        out.update({k: c[k] for k in keep}, launch_us_to_match_eager=c["launch_us_to_match_eager"])
    return out


def device_slug(device_name: str) -> str:
    """ "NVIDIA H200" -> "h200"; "cpu" stays."""
    name = re.sub(r"^nvidia\s+", "", device_name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "device"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as ``FlopCounterMode`` counts them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def optimiser_step(step, params, speed: SpeedConfig, device: torch.device):
    """One call: ``step()`` (forward + backward, returns nothing), then AdamW over ``params`` (its own)."""
    opt = torch.optim.AdamW(params, lr=1e-5, **adamw_options(speed, device))

    def full_step():
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return full_step


def train_rate(step, params, speed: SpeedConfig, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per optimiser step of ``step()`` with AdamW over ``params`` (:func:`optimiser_step`)."""
    full_step = optimiser_step(step, params, speed, device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        full_step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def train_profile(step, params, speed: SpeedConfig, device: torch.device, calls: int = 3) -> dict:
    """:func:`kernel_profile.profile_calls` of whole optimiser steps (:func:`optimiser_step`)."""
    return kernel_profile.profile_calls(optimiser_step(step, params, speed, device), device, calls=calls)


def variants(compile_: bool) -> list[tuple[str, SpeedConfig]]:
    fast = {"channels_last": True, "fused_adamw": True, "cudnn_benchmark": True}
    out = [("loop", SpeedConfig()), ("fast", SpeedConfig(**fast))]
    if compile_:
        out.append(("compiled", SpeedConfig(**fast, compile=True)))
    return out


def speed_up(model: torch.nn.Module, speed: SpeedConfig, device: torch.device) -> None:
    """``apply_speed_options``, with cuDNN's process-wide autotuning set to this variant's choice (on or off), so
    that a variant measured after another is not timed with the other's setting."""
    torch.backends.cudnn.benchmark = speed.on(device).cudnn_benchmark
    apply_speed_options(model, speed, device)


def compiled_row(s: dict, measure, speed: SpeedConfig, **fields) -> dict:
    """``measure()``'s row for the compiled variant, or, when compiling fails (not with --tiny), a row that says
    why with null rates: the other variants stand."""
    try:
        return measure()
    except Exception as exc:
        if s is TINY:
            raise
        return {
            "speed": speed.__dict__,
            **fields,
            "images_per_s": None,
            "mfu": None,
            "error": repr(exc)[:1000],
        }


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (CUDA's error, or one a backend words that way)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def batch_sweep(
    measure, batches: list[int], out: dict | None = None, fits=lambda batch: True
) -> dict[str, dict]:
    """``measure(batch)`` at each of ``batches`` in turn (into ``out``), up to the first that runs out of memory
    (recorded as such; the larger ones are not tried) or that ``fits(batch)`` turns down. Other errors
    propagate."""
    out = {} if out is None else out
    for batch in batches:
        if not fits(batch):
            break
        oom = None
        try:
            out[f"batch_{batch}"] = measure(batch)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            oom = f"{type(exc).__name__}: {str(exc)[:300]}"
        if oom is not None:  # outside the handler: the failed step's tensors are free by now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            out[f"batch_{batch}"] = {"batch": batch, "images_per_s": None, "out_of_memory": oom}
            break
    return out


def diffusion_train(
    s: dict,
    device: torch.device,
    precision: str,
    compile_: bool,
    peak: float | None,
    budget: Budget = UNLIMITED,
    live: dict | None = None,
) -> dict:
    """The UNet's training rate: ``loop`` and ``fast`` at the preset's batch; then, as ``budget`` allows,
    ``fast`` at larger batches up to the first that does not fit (``batch_sweep``), the eager step's profile,
    ``compiled`` at the batch that trained fastest and the roofline count. Filled into ``live`` as measured."""
    torch.manual_seed(0)
    cfg, model, word_dim, keypatch_dim = unet_scale_speed.build(s["preset"], device, 3, s["preset"])
    preset_batch = cfg.train.batch_size
    model.train()
    params = [p for p in model.denoiser.parameters() if p.requires_grad]

    def stepper(batch: int):
        feats = unet_scale_speed.features(cfg, batch, word_dim, keypatch_dim, device)
        mu = torch.randn(batch, 3, s["latent"], s["latent"], device=device)
        sigma = torch.full_like(mu, 0.05)

        def step():
            with autocast_context(device, precision):
                loss = model(mu, sigma, **feats)["loss"]
            loss.backward()
            model.update_ema(0.9999)

        def fwd_bwd():
            with autocast_context(device, precision):
                model(mu, sigma, **feats)["loss"].backward()
            model.zero_grad(set_to_none=True)

        return step, fwd_bwd

    fwd_bwd = stepper(preset_batch)[1]
    flops = count_flops(fwd_bwd)
    per_image = flops / preset_batch  # FLOPs grow with the batch, image by image

    def measure(speed: SpeedConfig, batch: int) -> dict:
        t0 = time.perf_counter()
        speed_up(model.denoiser, speed, device)
        steps = max(3, round(s["train_steps"] * preset_batch / batch))  # about as many images at every batch
        try:
            seconds = train_rate(stepper(batch)[0], params, speed, device, steps, s["warmup"])
        finally:  # also after running out of memory halfway through a backward
            model.zero_grad(set_to_none=True)
        return {
            "speed": speed.__dict__,
            "batch": batch,
            "images_per_s": batch / seconds,
            "s_per_step": seconds,
            "mfu": per_image * batch / seconds / peak if peak else None,
            "wall_s": time.perf_counter() - t0,
        }

    out = {} if live is None else live
    rows: dict[str, dict] = {}
    sweep: dict[str, dict] = {}
    out.update(
        preset=s["preset"],
        batch=preset_batch,
        best_batch=preset_batch,
        precision=precision,
        latent=[3, s["latent"], s["latent"]],
        flops_per_step=flops,
        tflop_per_image=per_image / 1e12,
        variants=rows,
        batch_sweep=sweep,
        profile={},
    )
    named = dict(variants(compile_))
    for name in ("loop", "fast"):
        rows[name] = measure(named[name], preset_batch)
    keep = budget.hold("diffusion_compiled", compile_)  # the compiled variant before the other optional parts
    batch_sweep(
        lambda b: measure(named["fast"], b),
        [preset_batch * f for f in s["train_batch_factors"]],
        sweep,
        fits=lambda b: budget.allows(f"diffusion_train.batch_{b}", "batch", b / preset_batch, keep),
    )
    fitted = [r for r in [rows["fast"], *sweep.values()] if r["images_per_s"] is not None]
    out["best_batch"] = best_batch = max(fitted, key=lambda r: r["images_per_s"])["batch"]
    for b in dict.fromkeys([preset_batch, best_batch]):  # where the eager step's time goes
        if budget.allows(f"diffusion_train.profile_batch_{b}", "profile", b / preset_batch, keep):
            out["profile"][f"fast_batch_{b}"] = train_profile(stepper(b)[0], params, named["fast"], device)
    model.zero_grad(set_to_none=True)
    if budget.allows(
        "diffusion_train.roofline", "roofline", keep=keep
    ):  # before compiling the model in place
        weights = sum(p.numel() for p in params)
        out["roofline"] = roofline_row(s, fwd_bwd, weights, preset_batch, device, True)
    if compile_ and budget.allows("diffusion_train.compiled", "diffusion_compiled"):
        compiled = named["compiled"]
        rows["compiled"] = compiled_row(s, lambda: measure(compiled, best_batch), compiled, batch=best_batch)
    return out


def make_prepared(s: dict, tmp: Path) -> dict:
    """A generated MIMIC-CXR tree of JPGs and DICOMs (a quarter of it in the validate split) prepared with a worker
    per CPU into ``tmp / "prepared"``: rate, memory and a killed-and-resumed run (``prepare_scale.measure``)."""
    _, _, root = prepare_throughput.make_data(
        tmp,
        s["prepare_images"],
        s["prepare_dicoms"],
        shape=s["prepare_shape"],
        distinct=s["prepare_distinct"],
        dicoms_in_tree=True,
    )
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    table = pd.read_csv(split, dtype=str)
    table.loc[table.index % 4 == 3, "split"] = "validate"
    table.to_csv(split, index=False)
    reports = [
        "Heart size is normal. The lungs are clear.",
        "Small left pleural effusion. Mild cardiomegaly.",
    ]
    for i, txt in enumerate(sorted(root.glob("files/*/*/*.txt"))):
        txt.write_text(f" FINAL REPORT\n FINDINGS: {reports[i % 2]} Finding number {i % 17}.\n")
    row = prepare_scale.measure(root, tmp, s["prepare_size"], os.cpu_count() or 1)
    return {
        **row,
        "jpgs": s["prepare_images"],
        "dicoms": s["prepare_dicoms"],
        "distinct": s["prepare_distinct"],
        "source_shape": list(s["prepare_shape"]),
    }


def adamatch_train(
    s: dict,
    data: Path,
    device: torch.device,
    precision: str,
    compile_: bool,
    peak: float | None,
    budget: Budget = UNLIMITED,
    live: dict | None = None,
) -> tuple[dict, object]:
    """AdaMatch's training rate, ``loop`` and ``fast``; then, as ``budget`` allows, the ``fast`` step's profile,
    the roofline count and ``compiled``. Filled into ``live`` as measured; returns it and the stage."""
    torch.manual_seed(0)
    stage = build_stage(config_path=resolve_config_path("adamatch", s["preset"]), overrides=[], data=data)
    model = stage.build_model().to(device)
    model.train()
    bs = stage.train.batch_size
    ds = stage.train_dataset()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(ds), (bs,), generator=g).tolist()
    batch = send_to_device(stage.collate([ds[i] for i in idx]), device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with autocast_context(device, precision):
            loss, _ = stage.training_step(model, batch)
        loss.backward()

    def fwd_bwd():
        step()
        model.zero_grad(set_to_none=True)

    flops = count_flops(fwd_bwd)

    def measure(speed: SpeedConfig) -> dict:
        t0 = time.perf_counter()
        speed_up(model, speed, device)
        seconds = train_rate(step, params, speed, device, s["train_steps"], s["warmup"])
        return {
            "speed": speed.__dict__,
            "images_per_s": bs / seconds,
            "s_per_step": seconds,
            "mfu": flops / seconds / peak if peak else None,
            "wall_s": time.perf_counter() - t0,
        }

    out = {} if live is None else live
    rows: dict[str, dict] = {}
    out.update(
        preset=s["preset"],
        batch=bs,
        precision=precision,
        image_size=stage.config.model.image_size,
        flops_per_step=flops,
        variants=rows,
        profile={},
    )
    named = dict(variants(compile_))
    for name in ("loop", "fast"):
        rows[name] = measure(named[name])
    keep = budget.hold("adamatch_compiled", compile_)
    # where the eager step's time goes and the roofline count, before the model is compiled in place
    if budget.allows("adamatch_train.profile", "profile", keep=keep):
        out["profile"]["fast"] = train_profile(step, params, named["fast"], device)
    model.zero_grad(set_to_none=True)
    if budget.allows("adamatch_train.roofline", "roofline", keep=keep):
        out["roofline"] = roofline_row(s, fwd_bwd, sum(p.numel() for p in params), bs, device, False)
    if compile_ and budget.allows("adamatch_train.compiled", "adamatch_compiled"):
        rows["compiled"] = compiled_row(s, lambda: measure(named["compiled"]), named["compiled"])
    return out, stage


def loader_rate(s: dict, stage, device: torch.device) -> dict:
    bs, workers, n = stage.train.batch_size, stage.train.num_workers, s["loader_batches"]
    micro = MicroBatches(
        stage.train_dataset(), stage.collate, seed=0, rank=0, world_size=1, batch_size=bs, total=n + 1
    )
    loader = micro_batch_loader(micro, start=0, num_workers=workers, pin_memory=device.type == "cuda", seed=0)
    it = iter(loader)
    next(it)  # worker start-up excluded
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    seconds = time.perf_counter() - t0
    del it, loader
    return {"batch": bs, "num_workers": workers, "batches": n, "images_per_s": bs * n / seconds}


def learn(s: dict, tmp: Path, seconds: float, live: dict | None = None) -> dict:
    """Each stage of :data:`LEARN_STAGES` trained with the preset for ``seconds`` on a fresh IU-Phantom (filled
    into ``live`` stage by stage)."""
    import math

    from medvl import registry
    from medvl.data.phantom import prepare_phantom
    from medvl.eval import evaluate
    from medvl.runs import read_stage_info
    from medvl.train.stages import run_stage

    data, runs = tmp / "learn_phantom", tmp / "learn_runs"
    t0 = time.perf_counter()
    built = prepare_phantom(
        data, studies=s["learn_studies"], size=s["learn_size"], seed=0, workers=os.cpu_count() or 1
    )
    out = {} if live is None else live
    out |= {
        "phantom": {
            "size": s["learn_size"],
            "seconds": time.perf_counter() - t0,
            "images": built.prepared.kept,
        },
        "seconds_per_stage": seconds,
    }
    overrides = [
        f"train.max_seconds={seconds}",
        "train.warmup_steps=50",
        "train.eval_every=0",
        "train.checkpoint_every=0",
    ]
    for stage in LEARN_STAGES:
        t0 = time.perf_counter()
        run_stage(
            stage,
            config=s["preset"],
            data=data,
            out=runs / stage,
            from_runs=[runs / src for src in registry.stage(stage).sources if (runs / src).is_dir()],
            overrides=overrides,
        )
        info = read_stage_info(runs / stage)
        first, last = info["loss_curve"]["first"], info["loss_curve"]["last"]
        finite = all(math.isfinite(v) for v in first + last)
        out[stage] = {
            "steps": info["steps"],
            "stopped_by_time": info["stopped_by_time"],
            "wall_s": time.perf_counter() - t0,
            "images_per_s": info["images_per_second"],
            "loss_first": first,
            "loss_last": last,
            "finite": finite,
            "loss_first_mean": sum(first) / max(len(first), 1),
            "loss_last_mean": sum(last) / max(len(last), 1),
            "validation": info["best_metrics"],
        }
        out[stage]["learned"] = finite and out[stage]["loss_last_mean"] < out[stage]["loss_first_mean"]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (the evaluation's own default is the CPU)
    rec = evaluate("adamatch", run=runs / "adamatch", data=data, split="validate", device=device)
    out["adamatch"]["val_pointing_game"] = rec.get("localization.pointing_game")
    out["adamatch"]["val_pointing_game_prior"] = rec.get("localization.pointing_game_prior")
    out["adamatch"]["val_pointing_game_chance"] = rec.get("localization.pointing_game_chance")
    return out


def equal_auroc_from(path: Path | None) -> tuple[bool | None, str]:
    """(whether the distilled student's label AUROC lies inside the MONAI recipe's interval, where that comes from)
    from ``benchmarks/sampling_speed.py``'s JSON; (None, why) without one."""
    how = (
        "benchmarks/sampling_speed.py --run RUN --student RUN_FAST --data DATA measures it on trained weights"
    )
    if path is None or not Path(path).is_file():
        return None, f"needs a trained diffusion run, a distilled student and its dataset: {how}"
    data = json.loads(Path(path).read_text())
    found = [(b, rows["student"]) for b, rows in data.get("rows", {}).items() if "student" in rows]
    if not found:
        return None, f"{path} has no student row: {how}"
    batch, row = found[0]
    return bool(row["equal_auroc"]), (
        f"from {Path(path).name} ({data.get('device')}, {data.get('split')} split of {data.get('data')}, batch "
        f"{batch}): student label AUROC {row['label_auroc']:.3f}, recipe interval "
        f"{rows_ci(data['rows'][batch])}"
    )


def rows_ci(rows: dict) -> str:
    ci = rows["monai_recipe"].get("label_auroc_ci")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "none"


def sampling(
    s: dict, device: torch.device, fast_steps: int, budget: Budget = UNLIMITED, live: dict | None = None
) -> dict:
    """Seconds per image of the MONAI recipe, the preset's default sampler and the fastest at every batch; then,
    as ``budget`` allows, batch by batch, DPM-Solver++(2M) 10 steps and (on CUDA) the fastest replayed from CUDA
    graphs. Filled into ``live`` as measured."""
    torch.manual_seed(0)
    cfg, model, word_dim, keypatch_dim = unet_scale_speed.build(s["preset"], device, 3, s["preset"])
    latent = (3, s["latent"], s["latent"])
    g = float(cfg.sampler.guidance)
    half = "bf16" if device.type == "cuda" else "fp32"
    specs = {
        "monai_recipe": ("ddim", 50, "fp32", g),
        "default": (cfg.sampler.name.value, cfg.sampler.steps, cfg.sampler.precision.value, g),
        # a distilled student (medvl train distill): the same UNet, guidance built in (one pass per step)
        "fastest": ("consistency", fast_steps, half, 1.0),
    }
    extras = {"dpm_solver_10": ("dpm_solver_2m", min(10, cfg.sampler.steps), half, g)}
    # the fastest sampler also with the denoiser replayed from CUDA graphs (with --tiny on the CPU, where there is
    # no graph, this runs the row's bookkeeping only)
    graphed = {"fastest_graphed": specs["fastest"]} if device.type == "cuda" or s is TINY else {}
    out = {} if live is None else live
    feats, latents = {}, {}

    def measure(batch: int, name: str, spec: tuple) -> None:
        sampler, steps, precision, guidance = spec
        row = unet_scale_speed.sample_row(
            cfg,
            model,
            feats[batch],
            latent,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            precision=precision,
            repeats=s["sample_repeats"],
            device=device,
            graphs=name in graphed,
            keep_latents=True,
        )
        latents[batch, name] = row.pop("latents")
        keys = ("sampler", "steps", "guidance", "precision", "s_per_image", "first_call_s", "finite")
        rows = out[f"batch_{batch}"]
        rows[name] = {k: row[k] for k in keys}
        if name != "monai_recipe":  # the recipe is measured first at every batch
            rows[f"speedup_recipe_over_{name}"] = rows["monai_recipe"]["s_per_image"] / row["s_per_image"]

    for batch in s["sample_batches"]:
        feats[batch] = unet_scale_speed.features(cfg, batch, word_dim, keypatch_dim, device, seed=1)
        out[f"batch_{batch}"] = {}
        for name, spec in specs.items():
            measure(batch, name, spec)
    for batch in s["sample_batches"]:
        rows = out[f"batch_{batch}"]
        if not budget.allows(f"sampling.batch_{batch}.extra_samplers", "samplers", batch / 8):
            continue
        for name, spec in {**extras, **graphed}.items():
            try:
                measure(batch, name, spec)
            except Exception as exc:  # a failed capture leaves the other rows standing (--tiny: raise)
                if name not in graphed or s is TINY:
                    raise
                rows[name] = {"error": repr(exc)[:1000]}
                continue
            if name in graphed:  # the same latents as without the graphs?
                eager = latents[batch, name.removesuffix("_graphed")]
                rows[name]["same_latents"] = bool(torch.equal(latents[batch, name], eager))
                rows[name]["max_abs_diff"] = float((latents[batch, name] - eager).abs().max())
    return out


def decoding(
    s: dict, device: torch.device, static: bool, budget: Budget = UNLIMITED, live: dict | None = None
) -> dict:
    """Report decoding: one report with every variant, then each batch of ``decode_batches``, with the comparison
    variants as ``budget`` allows (else today's decoding alone), and the static cache's row. Filled into ``live``
    as measured; the rates read from it by :func:`decode_rates`."""
    tokens = s["decode_tokens"]
    head = decode_throughput.build_head(s["decode_setting"], tokens, device)
    common = dict(beams=3, tokens=tokens, ngram=3, repeats=2, device=device)
    one = ("fast", "graphed", "generate", "plain")
    out = {} if live is None else live
    rows: dict[str, dict] = {}
    out.update(setting=s["decode_setting"], beams=3, tokens=tokens, no_repeat_ngram_size=3, rows=rows)
    rows["one_report"] = decode_throughput.measure_decoding(
        head, 1, variants=one, profile=("fast",), **common
    )
    for i, batch in enumerate(s["decode_batches"]):
        scale = batch / s["decode_batches"][0]
        full = budget.allows(f"decode.batch_{batch}.variants", "decode_variants", scale)
        rows[f"batch_{batch}"] = decode_throughput.measure_decoding(
            head,
            batch,
            variants=s["decode_variants"] if full else ("fast",),
            profile=("fast",) if i == 0 else (),
            **common,
        )
    b = s["decode_batches"][0]
    if static and budget.allows("decode.static", "decode_static"):
        try:  # the static cache (compiled by transformers on CUDA) beside the dynamic one, same sequences?
            rows[f"static_batch_{b}"] = decode_throughput.measure_decoding(
                head, b, variants=("fast", "generate", "static"), **common
            )
        except Exception as exc:
            if s is TINY:
                raise
            rows[f"static_batch_{b}"] = {"error": repr(exc)[:1000]}
    out.update(decode_rates(out))
    return out


def decode_rates(dec: dict) -> dict:
    """The decode row's rates from its measured ``rows`` (also a row stopped part way): reports/min per batch
    (``best_batch``: the fastest), with a report's beams as one query group (``grouped``: off by default on a GPU
    until these figures show it exact and faster) and with fixed-shape steps replayed as CUDA graphs
    (``graphed``: likewise), and the graphed latency of one report."""
    rows = dec.get("rows", {})
    per_min = {k: 60 * r["fast_reports_per_s"] for k, r in rows.items() if k.startswith("batch_")}
    grouped = {k: 60 * r["grouped_reports_per_s"] for k, r in rows.items() if "grouped_reports_per_s" in r}
    graphed = {k: 60 * r["graphed_reports_per_s"] for k, r in rows.items() if "graphed_reports_per_s" in r}
    return {
        "reports_per_min": per_min,
        "grouped_reports_per_min": grouped,
        "graphed_reports_per_min": graphed,
        "graphed_one_report_s": rows.get("one_report", {}).get("graphed_s_per_batch"),
        "best_batch": int(max(per_min, key=per_min.get).split("_")[1]) if per_min else None,
    }


ROWS = ("diffusion_train", "sampling", "decode", "prepare", "adamatch_train", "loader", "learn")  # run order


def merge_partials(states: list[dict]) -> dict:
    """One run's state from several runs on one device (their ``.partial.json`` or finished JSON): each row from
    the last run that measured it (or failed it, when none measured it), with its wall time and note; a row stays
    skipped only when every run skipped it; ``command`` lists the runs' commands. Notes on the top-level keys are
    left to :func:`summarize`."""
    if len({(st["device"], st["tiny"]) for st in states}) != 1:
        raise SystemExit("--summarize: the files come from different devices or sizes")
    merged = {**states[-1], "rows": {}, "notes": {}, "wall_s": {}}
    source: dict[str, int] = {}
    for i, st in enumerate(states):
        for name in ROWS:
            if name in st["rows"]:
                row = st["rows"][name]
                if row is not None or merged["rows"].get(name) is None:
                    merged["rows"][name] = row
                    source[name] = i
                    merged["wall_s"][name] = st["wall_s"].get(name)
                    merged["notes"].pop(name, None)
                    if name in st["notes"]:
                        merged["notes"][name] = st["notes"][name]
            elif name in st["notes"] and name not in merged["rows"]:
                merged["notes"].setdefault(name, st["notes"][name])
    merged["skip"] = sorted(set.intersection(*(set(st["skip"]) for st in states)) - set(merged["rows"]))
    for name in list(merged["notes"]):
        if merged["notes"][name] == "left out (--skip)" and name not in merged["skip"]:
            del merged["notes"][name]
    merged["command"] = " ; ".join(st["command"] for st in states)
    budgets = [st.get("budget", {"seconds": None, "cut": []}) for st in states]
    merged["budget"] = {  # what the time budget cut from the rows kept, run by run
        "seconds": [b["seconds"] for b in budgets],
        "cut": [
            part for i, b in enumerate(budgets) for part in b["cut"] if source.get(part.split(".")[0]) == i
        ],
    }
    return merged


def summarize(state: dict, quality: Path | None) -> dict:
    """The suite's JSON from a run's ``state`` (what ``<out>.partial.json`` holds: device, torch, rows, notes,
    wall_s, tiny, precision, compile, skip, command): the top-level :data:`KEYS`, then everything else."""
    rows, notes, walls = state["rows"], dict(state["notes"]), state["wall_s"]
    s, skip, device_name = (TINY if state["tiny"] else FULL), set(state["skip"]), state["device"]
    peak = peak_flops(device_name) if device_name != "cpu" else None

    def best(row: str, key: str):
        r = rows.get(row)
        if not r:
            return None
        values = [v[key] for v in r.get("variants", {}).values() if v.get(key) is not None]
        return max(values) if values else None

    result: dict[str, object] = {k: None for k in KEYS}
    result["device"] = device_name
    result["diffusion_train_images_per_s"] = best("diffusion_train", "images_per_s")
    result["diffusion_train_mfu"] = best("diffusion_train", "mfu")
    result["adamatch_train_mfu"] = best("adamatch_train", "mfu")
    if peak is None:
        why = "no peak bf16 rate for this device (benchmarks/roofline.py DEVICES)"
        notes.setdefault("diffusion_train_mfu", why)
        notes.setdefault("adamatch_train_mfu", why)
    sampled = rows.get("sampling") or {}
    for b, key in zip(s["sample_batches"], ("sampling_speedup_b8", "sampling_speedup_b64"), strict=True):
        result[key] = sampled.get(f"batch_{b}", {}).get("speedup_recipe_over_fastest")
    quality = quality or (None if state["tiny"] else RESULTS / "sampling_speed_seed7_validate_cpu.json")
    equal, why = equal_auroc_from(quality)
    result["sampling_equal_auroc"] = equal
    notes["sampling_equal_auroc"] = why
    if rows.get("decode"):
        dec = rows["decode"]
        dec.update(decode_rates(dec))  # a row stopped part way has its rows only
        if dec["best_batch"] is not None:
            result["decode_reports_per_min"] = dec["reports_per_min"][f"batch_{dec['best_batch']}"]
        result["decode_one_report_s"] = dec["rows"].get("one_report", {}).get("fast_s_per_batch")
    if rows.get("loader"):
        result["loader_images_per_s"] = rows["loader"]["images_per_s"]
        train = best("adamatch_train", "images_per_s")
        rows["loader"]["adamatch_train_images_per_s"] = train
        rows["loader"]["loader_over_training"] = result["loader_images_per_s"] / train if train else None
    if rows.get("prepare"):
        prep = rows["prepare"]
        result["prepare_images_per_s"] = prep["images_per_s"]
        resume = prep["resume"]
        result["prepare"] = {
            "workers": prep["workers"],
            "memory_peak_mb": prep["memory"].get("peak_mb"),
            "memory_growth_mb": prep["memory"].get("growth_mb"),
            "resumed_after_kill": resume["killed"] and resume["same_images"] and resume["same_index"],
            "decoded_again": resume["decoded_again"],
            "reused": resume["reused"],
        }
    if rows.get("learn"):
        result["learn"] = {
            stage: {k: rows["learn"][stage][k] for k in ("steps", "finite", "learned")}
            for stage in LEARN_STAGES
            if "learned" in rows["learn"].get(stage, {})
        }
    source = {
        "diffusion_train_images_per_s": "diffusion_train",
        "diffusion_train_mfu": "diffusion_train",
        "adamatch_train_mfu": "adamatch_train",
        "sampling_speedup_b8": "sampling",
        "sampling_speedup_b64": "sampling",
        "decode_reports_per_min": "decode",
        "decode_one_report_s": "decode",
        "loader_images_per_s": "loader",
        "prepare_images_per_s": "prepare",
    }
    for k in KEYS:
        if result[k] is None and k not in notes:
            row = source.get(k)
            if row in skip:
                notes[k] = f"its row ({row}) was left out (--skip)"
            elif rows.get(row) and "stopped" in rows[row]:
                notes[k] = f"its row ({row}) was stopped before measuring it: {rows[row]['stopped']}"
            else:
                notes[k] = f"its row ({row}) did not run or failed: see notes"
    result.update(
        {
            "torch": state["torch"],
            "python": state["python"],
            "cpus": state["cpus"],
            "tiny": state["tiny"],
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
            "batches": {
                "diffusion_train": (rows.get("diffusion_train") or {}).get("batch"),
                "adamatch_train": (rows.get("adamatch_train") or {}).get("batch"),
                "sampling": list(s["sample_batches"]),
                "decode": [1, *s["decode_batches"]],
                "loader": (rows.get("loader") or {}).get("batch"),
            },
            "precision": state["precision"],
            "peak_bf16_flops": peak,
            "compile": state["compile"],
            "budget": state.get("budget", {"seconds": None, "cut": []}),
            "skip": sorted(skip),
            "notes": notes,
            "wall_s": {**walls, "total": sum(walls.values())},
            "rows": rows,
            "command": state["command"],
        }
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tiny", action="store_true", help="tiny presets, a few steps (a check that the suite runs)"
    )
    p.add_argument("--device", default=None, help="default: cuda when available (--tiny: cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument(
        "--static-decode", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA"
    )
    p.add_argument("--fast-steps", type=int, default=4, help="steps of the fastest sampler (a student's)")
    p.add_argument(
        "--quality",
        type=Path,
        default=None,
        help="sampling_speed.py's JSON with a student row, for sampling_equal_auroc (default: "
        "benchmarks/results/sampling_speed_seed7_validate_cpu.json; never with --tiny)",
    )
    p.add_argument(
        "--learn-seconds",
        type=float,
        default=None,
        help="seconds of training per stage in the learn row (default 45; --tiny: 3; 0: skip the row)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds the whole run may take (default: no limit): the rows' optional parts run only while their "
        "estimates and the essentials of the rows still to come fit, and the row in flight at the end is stopped "
        "(what it measured stays); the JSON lists what was cut",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=ROWS,
        help="rows to leave out (e.g. the ones a first, interrupted run already wrote to its .partial.json)",
    )
    p.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        default=None,
        metavar="PARTIAL",
        help="run nothing: write the suite's JSON from the .partial.json (or finished JSON) files of earlier "
        "runs on one device, a later file's rows winning: e.g. a run cut short and a second run with --skip",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.summarize:
        state = merge_partials([json.loads(Path(f).read_text()) for f in args.summarize])
        result = summarize(state, args.quality)
        slug = device_slug(state["device"])
        out = args.out or RESULTS / f"gpu_suite_{slug}{'_tiny' if state['tiny'] else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps({k: result[k] for k in KEYS}, indent=1))
        print(f"wrote {out}")
        return 0
    s = TINY if args.tiny else FULL
    learn_seconds = (3.0 if args.tiny else 45.0) if args.learn_seconds is None else args.learn_seconds
    if args.tiny:
        torch.set_num_threads(
            1
        )  # tiny ops on a shared CPU: one thread (OpenMP threads spin-wait on each other)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    cuda = device.type == "cuda"
    compile_ = cuda if args.compile is None else args.compile
    static = cuda if args.static_decode is None else args.static_decode
    precision = "bf16" if cuda else "fp32"
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_flops(device_name) if cuda else None
    started = time.perf_counter()
    notes: dict[str, str] = {}
    rows: dict[str, object] = {}
    walls: dict[str, float] = {}
    command = "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or RESULTS / f"gpu_suite_{device_slug(device_name)}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")

    skip = set(args.skip)
    if not {"adamatch_train", "loader"} <= skip:
        skip.discard("prepare")  # their data is the prepare row's
    notes.update({name: "left out (--skip)" for name in skip})
    state = {
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "tiny": args.tiny,
        "precision": precision,
        "compile": compile_,
        "skip": sorted(skip),
        "command": command,
        "rows": rows,
        "notes": notes,
        "wall_s": walls,
    }

    budget = Budget(args.budget_s, s)
    budget.to_come = [r for r in ROWS if r not in skip and (r != "learn" or learn_seconds > 0)]
    state["budget"] = {"seconds": args.budget_s, "cut": budget.cut}

    def run(name: str, fn, missing: str | None = None):
        """Row ``name`` (``missing``: why it cannot run, its input row having failed)."""
        if name in skip:
            return None
        budget.to_come.remove(name)
        if missing:
            notes[name] = missing
            return None
        t0 = time.perf_counter()
        live: dict = {}
        if budget.left() <= 0:
            rows[name] = None
            notes[name] = f"not run: the time budget ({args.budget_s:g} s, --budget-s) ran out"
        else:
            try:
                with budget.alarm():
                    rows[name] = fn(live)
            except OutOfTime as exc:  # what the row measured stays, marked
                rows[name] = {**live, "stopped": str(exc)} if live else None
                notes[name] = f"stopped part way: {exc}"
            except Exception as exc:  # a row that fails is recorded, the others still run (--tiny: raise)
                if args.tiny:
                    raise
                rows[name] = None
                notes[name] = f"{type(exc).__name__}: {exc}"[:2000]
        walls[name] = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - started:6.1f} s] {name}: {walls[name]:.1f} s", flush=True)
        # every finished row on disk at once: a run cut short by a time limit keeps what it measured
        partial.write_text(json.dumps(state, indent=1, default=str))
        return rows[name]

    def learn_row(live: dict) -> dict:
        fixed, least = s["extra_s"]["learn_fixed"], s["extra_s"]["learn_stage"]
        seconds = min(learn_seconds, (budget.left() - fixed) / len(LEARN_STAGES))
        if seconds < least:
            budget.cut.append("learn")
            notes["learn"] = (
                f"not run: too little of the time budget ({args.budget_s:g} s, --budget-s) was left"
            )
            return None
        return learn(s, tmp, seconds, live)

    tmp = Path(tempfile.mkdtemp(prefix="medvl_gpu_suite_"))
    try:
        # the headline rows first: their optional parts get the spare time first
        run(
            "diffusion_train",
            lambda live: diffusion_train(s, device, precision, compile_, peak, budget, live),
        )
        run("sampling", lambda live: sampling(s, device, args.fast_steps, budget, live))
        run("decode", lambda live: decoding(s, device, static, budget, live))
        prepared = run("prepare", lambda live: make_prepared(s, tmp))
        data = tmp / "prepared"
        stage_box: list = []

        def adamatch_row(live: dict) -> dict:
            info, stage = adamatch_train(s, data, device, precision, compile_, peak, budget, live)
            stage_box.append(stage)
            return info

        no_data = None if prepared is not None else "not run: it reads the prepare row's data"
        run("adamatch_train", adamatch_row, no_data)
        no_stage = None if stage_box else "not run: it reads the adamatch_train row's stage"
        run("loader", lambda live: loader_rate(s, stage_box[0], device), no_data or no_stage)
        if learn_seconds > 0:
            run("learn", learn_row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = summarize(state, args.quality)
    out.write_text(json.dumps(result, indent=1, default=str))
    partial.unlink(missing_ok=True)
    print(json.dumps({k: result[k] for k in KEYS}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

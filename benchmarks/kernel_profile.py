"""Where a step's time goes: a few calls under ``torch.profiler``, summed by kernel (CUDA) or operator (CPU).

Used by ``gpu_suite.py`` beside its training rates, so that a low MFU comes with its reason: the share of the
wall time the device was busy at all (a launch-bound step leaves it idle between kernels), and the busy time
split into matrix products, convolutions, attention, normalisation, the optimiser and the rest, with the top
kernels by name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

#: Kernel / operator name patterns of each kind, tried in order (first match wins; lower-case names).
KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("optimizer", r"adam|multi_tensor|foreach|fused_adamw"),
    ("conv", r"conv|cudnn|winograd|implicit|fprop|dgrad|wgrad"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|matmul|\bmm\b|addmm|bmm|::mm|linear|sm80_|sm90_"),
    ("norm", r"norm|moments"),  # GroupNorm's CUDA kernels are named RowwiseMoments..., ...FusedParams...
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def timed_rows(events, cuda: bool, calls: int) -> list[tuple[str, str, float, int]]:
    """(name, kind, seconds per call, count per call) of the profiler's averaged ``events``: on CUDA the kernels
    alone (a CPU operator's device time is its kernels', already counted, and a user annotation such as the
    optimiser's step range spans kernels counted too); on the CPU the aten operators' own time."""
    rows = []
    for event in events:
        if cuda:
            kernel = getattr(event, "device_type", None) == DeviceType.CUDA
            if not kernel or getattr(event, "is_user_annotation", False):
                continue
            us = event.self_device_time_total
        elif event.key.startswith("aten::"):
            us = event.self_cpu_time_total
        else:
            continue
        if us > 0:
            rows.append((event.key, kind_of(event.key), us / 1e6 / calls, event.count // calls))
    return rows


def profile_calls(fn: Callable[[], None], device: torch.device, calls: int = 3, top: int = 12) -> dict:
    """``fn()`` called ``calls`` times under the profiler (after one call outside it): wall seconds per call,
    the device's busy share of the wall time (CUDA; null on the CPU), busy time by kind and the top names.

    On CUDA the times are the kernels' own (``self_device_time_total``); on the CPU the operators' own CPU time
    (``self_cpu_time_total``), where nested operators are counted once each."""
    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    rows = timed_rows(prof.key_averages(), cuda, calls)
    busy = sum(r[2] for r in rows)
    by_kind: dict[str, float] = {}
    for _, kind, seconds, _ in rows:
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    rows.sort(key=lambda r: -r[2])
    return {
        "calls": calls,
        "wall_s_per_call": wall / calls,
        "measured": "kernels (device time)" if cuda else "aten operators (self CPU time)",
        "busy_s_per_call": busy,
        "device_busy_share": busy / (wall / calls) if cuda and wall > 0 else None,
        "share_by_kind": {k: v / busy for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
        if busy
        else {},
        "top": [
            {
                "name": name[:160],
                "kind": kind,
                "s_per_call": seconds,
                "share": seconds / busy,
                "count": n,
            }
            for name, kind, seconds, n in rows[:top]
        ],
    }

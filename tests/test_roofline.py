"""benchmarks/roofline.py: operators counted with their FLOPs and bytes, views free, and the ceilings computed
from them as the roofline says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import roofline  # noqa: E402


def test_views_move_nothing_and_an_addition_reads_two_and_writes_one():
    x, y = torch.randn(8, 16), torch.randn(8, 16)

    def fn():
        v = x.view(16, 8).t().reshape(8, 16)
        v.detach().add(y)

    rows = roofline.count_ops(fn)
    assert [r[0] for r in rows] == ["add"]
    assert rows[0][2] == 0 and rows[0][3] == 3 * 8 * 16 * 2  # bf16 bytes
    assert roofline.count_ops(fn, bytes_per_float=4)[0][3] == 3 * 8 * 16 * 4


def test_flops_are_flop_counter_mode_s_and_cpu_attention_is_counted_as_on_cuda():
    lin = torch.nn.Linear(32, 64)
    q, k, v = (torch.randn(2, 4, 10, 8, requires_grad=True) for _ in range(3))

    def linear():
        lin(torch.randn(5, 32)).sum().backward()

    def attention():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    with FlopCounterMode(display=False) as counter:
        linear()
    rows = roofline.count_ops(linear)
    assert sum(r[2] for r in rows) == counter.get_total_flops() > 0
    # the CPU's fused attention kernel, absent from flop_counter's registry, counted with the formulas it
    # applies to CUDA's flash attention: the product of the forward and four in the backward, plus the
    # backward's recomputation of the scores
    rows = roofline.count_ops(attention)
    by_name = {r[0]: r for r in rows}
    product = 2 * 4 * 10 * 10 * 8 * 2  # one (10 x 8) @ (8 x 10) per batch and head
    assert by_name["_scaled_dot_product_flash_attention_for_cpu"][2] == 2 * product
    assert by_name["_scaled_dot_product_flash_attention_for_cpu_backward"][2] == 5 * product
    assert {r[1] for r in rows if "attention" in r[0]} == {"attention"}


def test_operators_with_a_kernel_stay_whole_and_composites_are_counted_by_their_parts():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def train():
        F.silu(lin(x)).sum().backward()

    names = [r[0] for r in roofline.count_ops(train)]
    assert "silu_backward" in names and "sigmoid" not in names  # its own kernel: one operator
    with torch.inference_mode():  # linear reaches the counter whole here: counted as the addmm it runs
        names = [r[0] for r in roofline.count_ops(lambda: lin(torch.randn(4, 8)))]
    assert "addmm" in names and "linear" not in names


def test_ceilings_follow_the_roofline():
    peak, bw = 100e12, 1e12
    rows = [
        ("mm", "matmul", 200e12 // 100, 10**9),  # 2 TFLOP: 20 ms of compute, 1 ms of traffic
        ("silu", "other", 0, 4 * 10**9),  # 4 ms of traffic
    ]
    c = roofline.ceilings(rows, weights=10**6, images=4, peak=peak, bandwidth=bw, ema=True)
    opt_ms = 10**6 * (28 + 12) / bw * 1e3
    assert c["compute_ms"] == pytest.approx(20.0)
    assert c["eager_ms"] == pytest.approx(24.0) and c["fused_ms"] == pytest.approx(20.0)
    assert c["optimiser_ms"] == pytest.approx(opt_ms)
    assert c["mfu_ceiling_eager"] == pytest.approx(20 / (24 + opt_ms))
    assert c["mfu_ceiling_fused"] == pytest.approx(20 / (20 + opt_ms))
    assert c["images_per_s_ceiling_eager"] == pytest.approx(4 / ((24 + opt_ms) / 1e3))
    assert c["by_kind"]["other"]["share_of_eager"] == pytest.approx(4 / 24)
    no_ema = roofline.ceilings(rows, weights=10**6, images=4, peak=peak, bandwidth=bw, ema=False)
    assert no_ema["optimiser_ms"] == pytest.approx(10**6 * 28 / bw * 1e3)


def test_tiny_diffusion_step_on_fake_tensors(tmp_path):
    out = tmp_path / "r.json"
    assert roofline.main(["--stage", "diffusion", "--preset", "tiny", "--batch", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["stage"] == "diffusion" and r["batch"] == 2 and r["device"] == "H200"
    assert r["tflop_per_step"] > 0 and r["ops_per_step"] > 100
    assert {"conv", "norm"} <= set(r["by_kind"])
    assert r["compute_ms"] <= r["fused_ms"] <= r["eager_ms"]
    assert 0 < r["mfu_ceiling_eager"] <= r["mfu_ceiling_fused"] < 1
    # with attention through the math path, FlopCounterMode sees the same operators
    fn, _, _ = roofline.diffusion_step("tiny", 2, torch.device("cpu"))
    with sdpa_kernel(SDPBackend.MATH):
        rows = roofline.count_ops(fn)
        with FlopCounterMode(display=False) as counter:
            fn()
    assert sum(x[2] for x in rows) == counter.get_total_flops() > 0
    assert not any("flash" in x[0] for x in rows)
    # the tiny preset's attention takes the math path on the CPU anyway: main's count is the same
    assert r["tflop_per_step"] * 1e12 == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_autocast_counts_each_tensor_at_its_own_dtype(tmp_path):
    out = tmp_path / "a.json"
    args = ["--stage", "diffusion", "--preset", "tiny", "--batch", "2", "--autocast", "--out", str(out)]
    assert roofline.main(args) == 0
    r = json.loads(out.read_text())
    assert r["autocast"] and r["bytes_per_float"] is None
    fn, _, _ = roofline.diffusion_step("tiny", 2, torch.device("cpu"))
    rows = roofline.count_ops(roofline.autocast(fn, torch.device("cpu")), None)
    assert "_to_copy" in {x[0] for x in rows}  # autocast's casts are operators of their own
    plain = roofline.count_ops(fn, 2)
    assert len(rows) > len(plain) and sum(x[3] for x in rows) > sum(x[3] for x in plain)
    assert r["ops_per_step"] == len(rows)


def test_decode_counts_the_operators_a_gpu_runs(tmp_path):
    out = tmp_path / "d.json"
    args = ["--stage", "decode", "--preset", "tiny", "--batch", "2", "--tokens", "12", "--out", str(out)]
    assert roofline.main(args) == 0
    r = json.loads(out.read_text())
    assert r["stage"] == "decode" and r["trained_weights"] == 0 and r["optimiser_ms"] == 0
    assert r["reports_per_min_ceiling_eager"] == pytest.approx(60 * r["images_per_s_ceiling_eager"])
    assert r["tokens"] == 12 and r["ops_per_token_step"] == r["ops_per_step"] / 12
    # the decoder's own steps (what a CUDA graph replays) and the search's bookkeeping around them
    inside, outside = r["ops_per_token_step_in_decoder"], r["ops_per_token_step_outside_decoder"]
    assert inside > 10 and outside > 10 and inside + outside == pytest.approx(r["ops_per_token_step"])
    # composite operators (inference mode) are counted by what they run, as FlopCounterMode counts them
    gpu, _, _ = roofline.decode_call("tiny", 2, torch.device("cpu"), tokens=12)
    with sdpa_kernel(SDPBackend.MATH):
        rows = roofline.count_ops(gpu)
        with FlopCounterMode(display=False) as counter:
            gpu()
    assert sum(x[2] for x in rows) == counter.get_total_flops() > 0
    assert not {"linear", "scaled_dot_product_attention", "einsum"} & {x[0] for x in rows}
    # the CPU's own decoding memoises each word's memory query: fewer products than the GPU's path
    cpu, _, _ = roofline.decode_call("tiny", 2, torch.device("cpu"), tokens=12, as_gpu=False)
    assert sum(x[2] for x in roofline.count_ops(cpu)) < sum(x[2] for x in roofline.count_ops(gpu))

"""benchmarks/gpu_suite.py --tiny runs end to end on the CPU and writes the suite's JSON: every top-level key, with
the type it has on a GPU (speeds are not checked), and nulls only where the CPU cannot measure (MFU: no peak rate;
equal AUROC: no trained run), each with its reason under ``notes``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBERS = (
    "diffusion_train_images_per_s",
    "sampling_speedup_b8",
    "sampling_speedup_b64",
    "decode_reports_per_min",
    "decode_one_report_s",
    "loader_images_per_s",
    "prepare_images_per_s",
)
NULL_ON_CPU = ("diffusion_train_mfu", "adamatch_train_mfu", "sampling_equal_auroc")


def run_tiny_suite(out: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """``gpu_suite.py --tiny`` writing ``out``, which it returns read (its stderr under ``"stderr"``)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**json.loads(out.read_text()), "stderr": proc.stderr}


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory) -> dict:
    return run_tiny_suite(tmp_path_factory.mktemp("suite") / "suite.json")


def test_gpu_suite_tiny_writes_every_key(tiny_suite):
    result = tiny_suite
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_suite import KEYS

    assert set(KEYS) <= set(result) and len(KEYS) == 11
    assert result["device"] == "cpu" and result["torch"] and result["tiny"] is True
    for key in NUMBERS:
        assert isinstance(result[key], float) and result[key] > 0, key
    for key in NULL_ON_CPU:
        assert result[key] is None and result["notes"][key], key
    rows = result["rows"]
    assert rows["decode"]["rows"]["one_report"]["same_sequences"]  # fast decoding = 0.2.0's, in the suite too
    assert rows["decode"]["rows"]["one_report"]["fast_profile"]["top"]  # where one report's time goes
    batch_rows = [r for k, r in rows["decode"]["rows"].items() if k.startswith("batch_")]
    assert batch_rows and all(r["same_sequences"] and "grouped_s_per_batch" in r for r in batch_rows)
    assert all("graphed_s_per_batch" in r for r in [*batch_rows, rows["decode"]["rows"]["one_report"]])
    for batch in (
        "batch_2",
        "batch_4",
    ):  # the graphed row's bookkeeping (no graph on a CPU: the same latents)
        assert rows["sampling"][batch]["fastest_graphed"]["same_latents"], batch
    assert set(rows["diffusion_train"]["variants"]) == {"loop", "fast"}
    sweep = rows["diffusion_train"]["batch_sweep"]  # the fast variant at twice the preset's batch
    assert set(sweep) == {"batch_16"} and sweep["batch_16"]["images_per_s"] > 0
    assert rows["diffusion_train"]["best_batch"] in (8, 16)
    assert rows["diffusion_train"]["flops_per_step"] > 0 and rows["adamatch_train"]["flops_per_step"] > 0
    for row in ("diffusion_train", "adamatch_train"):  # counted as roofline.py counts; no chip, no ceiling
        ceiling = rows[row]["roofline"]
        assert ceiling["operators"] > 50 and ceiling["gb_per_step"] > 0 and ceiling["chip"] is None, row
        assert "mfu_ceiling_eager" not in ceiling
    for prof in [*rows["diffusion_train"]["profile"].values(), rows["adamatch_train"]["profile"]["fast"]]:
        assert (
            abs(sum(prof["share_by_kind"].values()) - 1) < 1e-6 and prof["top"]
        )  # where the step's time goes
        assert prof["share_by_kind"]["conv"] > 0 and prof["device_busy_share"] is None  # the CPU: no device
    assert result["batches"]["diffusion_train"] == 8 and result["batches"]["sampling"] == [2, 4]
    # the prepare row: a tree of JPGs and DICOMs, its memory sampled, then killed at half its chunks and resumed
    prep = rows["prepare"]
    assert prep["images"] == 32 and prep["skipped"] == 0 and prep["memory"]["peak_mb"] > 0
    resume = prep["resume"]
    assert resume["killed"] and 0 < resume["reused"] < 32, resume  # the rerun decoded only what was left
    assert resume["decoded_again"] + resume["reused"] == 32 and resume["same_images"] and resume["same_index"]
    assert result["prepare"]["resumed_after_kill"] is True
    # the learn row: every stage trained by `medvl train` on a fresh phantom, its loss curve finite
    learn = rows["learn"]
    for stage in ("adamatch", "report", "autoencoder", "diffusion"):
        assert result["learn"][stage]["finite"] is True and learn[stage]["steps"] >= 1, stage
        assert learn[stage]["loss_first"] and learn[stage]["loss_last"], stage
    assert 0.0 <= learn["adamatch"]["val_pointing_game"] <= 1.0
    assert 0.0 <= learn["adamatch"]["val_pointing_game_prior"] <= 1.0


def test_speed_table_reads_every_figure_from_the_json(tiny_suite):
    """benchmarks/suite_table.py: README's speed table, each figure read from the suite's JSON."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from suite_table import table

    text = table(tiny_suite)
    rows = tiny_suite["rows"]
    assert text.count("\n|") == 9 and "not measured" not in text  # after the header: a rule and 8 figures
    assert f"{tiny_suite['decode_reports_per_min']:,.0f} reports/min" in text
    assert f"**{tiny_suite['sampling_speedup_b8']:.1f}x**" in text
    assert f"**{tiny_suite['sampling_speedup_b64']:.1f}x**" in text
    assert f"{tiny_suite['diffusion_train_images_per_s']:,.1f} images/s" in text
    assert (
        f"{tiny_suite['prepare_images_per_s']:,.0f} images/s with 2 workers" in text
        and "the same bytes" in text
    )
    assert f"{rows['learn']['report']['loss_last_mean']:.3f}" in text
    assert tiny_suite["command"] in text


def test_peak_rate_and_file_name_of_a_device():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_suite import device_slug, peak_flops

    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA L4") is None
    assert device_slug("NVIDIA H200") == "h200" and device_slug("cpu") == "cpu"


def test_roofline_row_reads_the_chip_and_survives_a_failure(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import roofline
    import torch
    from gpu_suite import FULL, TINY, roofline_row

    lin = torch.nn.Linear(8, 8)

    def step():
        lin(torch.randn(4, 8)).sum().backward()
        lin.zero_grad(set_to_none=True)

    # a chip named like the device: the ceilings, from the same operators
    monkeypatch.setitem(roofline.DEVICES, "cpu", {"peak_bf16": 1e12, "bandwidth": 1e11})
    r = roofline_row(TINY, step, 72, 4, torch.device("cpu"), ema=False)
    assert r["chip"] == "cpu" and r["operators"] == len(roofline.count_ops(step, None))
    assert 0 < r["mfu_ceiling_eager"] <= r["mfu_ceiling_fused"] < 1

    def broken():
        raise RuntimeError("no meta kernel")

    assert "no meta kernel" in roofline_row(FULL, broken, 72, 4, torch.device("cpu"), ema=False)["error"]
    with pytest.raises(RuntimeError):  # the tiny run in the test suite fails loudly
        roofline_row(TINY, broken, 72, 4, torch.device("cpu"), ema=False)


def test_gpu_suite_leaves_out_rows_on_request(tmp_path, tiny_suite):
    """--skip: the rows left out are named in the notes, the others measured; the partial file goes once the
    whole JSON is written; --summarize joins the rows of two runs."""
    out = tmp_path / "suite.json"
    skip = ["prepare", "adamatch_train", "loader", "diffusion_train", "sampling", "learn"]
    result = run_tiny_suite(out, "--skip", *skip)
    assert all(result["notes"][row] == "left out (--skip)" for row in skip)
    assert result["rows"]["decode"]["rows"]["one_report"]["same_sequences"]
    assert result["decode_reports_per_min"] > 0 and result["sampling_speedup_b8"] is None
    assert not out.with_suffix(".partial.json").exists()
    from suite_table import table

    assert table(result).count("not measured: left out (--skip)") == 7  # 6 figures' rows and learn's

    # --summarize: one JSON from two runs, each row from the later run that measured it
    full = tmp_path / "full.json"
    full.write_text(json.dumps({k: v for k, v in tiny_suite.items() if k != "stderr"}))
    merged_out = tmp_path / "merged.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--summarize", str(full), str(out)]
        + ["--out", str(merged_out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(merged_out.read_text())
    assert merged["rows"]["decode"] == result["rows"]["decode"]  # the second run's
    assert merged["rows"]["diffusion_train"] == tiny_suite["rows"]["diffusion_train"]  # the first run's
    assert merged["sampling_speedup_b8"] == tiny_suite["sampling_speedup_b8"]
    assert merged["decode_reports_per_min"] == result["decode_reports_per_min"]
    assert merged["skip"] == [] and not any("left out" in note for note in merged["notes"].values())
    assert merged["command"].count("gpu_suite.py") == 2


def test_batch_sweep_stops_at_the_first_batch_that_does_not_fit():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from gpu_suite import batch_sweep

    tried = []

    def measure(batch):
        tried.append(batch)
        if batch >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch": batch, "images_per_s": float(batch)}

    out = batch_sweep(measure, [32, 64, 128])
    assert tried == [32, 64]  # 128 is not tried after 64 ran out of memory
    assert out["batch_32"]["images_per_s"] == 32.0
    assert out["batch_64"]["images_per_s"] is None and "out of memory" in out["batch_64"]["out_of_memory"]

    def broken(batch):
        raise ValueError("a shape mismatch")

    with pytest.raises(
        ValueError, match="shape mismatch"
    ):  # only running out of memory ends the sweep quietly
        batch_sweep(broken, [32])


@pytest.mark.slow
def test_gpu_suite_tiny_compiled_training_rows(tmp_path):
    """The compiled variants of both training rows (the GPU default) run on the CPU, and no step recompiles: a
    value read into Python inside the forward (AdaMatch's logs, once) is a guard that recompiled every step."""
    result = run_tiny_suite(
        tmp_path / "suite.json",
        *("--compile", "--skip", "loader", "sampling", "decode", "learn"),
        env={"TORCH_LOGS": "recompiles"},
    )
    for row in ("adamatch_train", "diffusion_train"):
        variants = result["rows"][row]["variants"]
        assert set(variants) == {"loop", "fast", "compiled"}, row
        assert variants["compiled"]["images_per_s"] > 0, row
    assert "Recompiling" not in result["stderr"], result["stderr"][-3000:]
    assert (
        result["rows"]["diffusion_train"]["variants"]["compiled"]["batch"]
        == (result["rows"]["diffusion_train"]["best_batch"])
    )


def test_kernel_kinds_of_typical_names():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from kernel_profile import kind_of

    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv"
    assert kind_of("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert (
        kind_of("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>") == "norm"
    )
    assert (
        kind_of("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamW>")
        == "optimizer"
    )
    assert kind_of("aten::native_group_norm") == "norm" and kind_of("aten::addmm") == "matmul"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>") == "other"


def test_budget_keeps_time_for_the_essentials_still_to_come():
    """--budget-s: an optional part starts only when its estimate and the essentials of the rows after it fit;
    what does not fit is listed; without a limit everything fits."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_suite import UNLIMITED, Budget

    now = [0.0]
    s = {"essential_s": {"sampling": 100, "decode": 40}, "extra_s": {"compiled": 50, "batch": 10}}
    budget = Budget(200, s, clock=lambda: now[0])
    budget.to_come = ["sampling", "decode"]
    assert budget.spare() == 60 and budget.allows("diffusion_train.compiled", "compiled")
    now[0] = 20.0  # 180 s left, 140 of them for the rows to come: 40 spare
    assert not budget.allows("diffusion_train.compiled", "compiled")
    assert budget.allows("diffusion_train.batch_32", "batch", times=4)  # four times 10 s
    assert not budget.allows("diffusion_train.batch_64", "batch", times=8.0)
    budget.to_come = ["decode"]  # once sampling has started, its reserve is free
    assert budget.allows("sampling.extra", "compiled")
    assert budget.cut == ["diffusion_train.compiled", "diffusion_train.batch_64"]
    # time held for a compiled variant, when it fits, turns down the parts before it
    budget.to_come, now[0] = ["decode"], 90.0  # 110 s left, 70 spare
    assert budget.hold("compiled") == 50 and budget.hold("compiled", wanted=False) == 0
    assert not budget.allows("diffusion_train.batch_32", "batch", times=4, keep=budget.hold("compiled"))
    now[0] = 115.0  # 45 spare: the compiled variant no longer fits, nothing is held for it
    assert budget.hold("compiled") == 0 and budget.allows("diffusion_train.batch_32", "batch", times=4)
    assert UNLIMITED.hold("compiled") == 0
    assert UNLIMITED.left() == float("inf") and UNLIMITED.allows("anything") and UNLIMITED.cut == []


def test_budget_alarm_stops_what_runs_past_the_deadline():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import time

    from gpu_suite import TINY, Budget, OutOfTime

    budget = Budget(0.2, TINY)
    measured = {}
    with pytest.raises(OutOfTime, match="time budget"):
        with budget.alarm():
            measured["first"] = 1.0
            try:  # a row's own handler of a failed variant does not swallow the alarm
                time.sleep(5)
            except Exception:
                measured["swallowed"] = True
    assert measured == {"first": 1.0}
    with Budget(None, TINY).alarm():  # no limit: no alarm
        time.sleep(0.01)


def test_rows_measure_their_essentials_when_the_budget_allows_nothing_more():
    """With no time for optional parts, each row still measures what the top-level keys read."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from gpu_suite import TINY, Budget, decoding, diffusion_train, sampling

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    budget = Budget(3600, {**TINY, "extra_s": {k: 1e9 for k in TINY["extra_s"]}})
    live: dict = {}
    train = diffusion_train(TINY, cpu, "fp32", False, None, budget, live)
    assert train is live and set(train["variants"]) == {"loop", "fast"}
    assert train["variants"]["fast"]["images_per_s"] > 0 and train["batch_sweep"] == {}
    assert train["profile"] == {} and "roofline" not in train and train["best_batch"] == train["batch"]
    sampled = sampling(TINY, cpu, 2, budget)
    for batch in ("batch_2", "batch_4"):
        assert set(sampled[batch]) == {
            "monai_recipe",
            "default",
            "fastest",
            "speedup_recipe_over_fastest",
            "speedup_recipe_over_default",
        }
    dec = decoding(TINY, cpu, True, budget)
    assert dec["rows"]["one_report"]["same_sequences"] and "static_batch_2" not in dec["rows"]
    for batch in ("batch_2", "batch_4"):
        assert (
            dec["rows"][batch]["fast_reports_per_s"] > 0 and "generate_s_per_batch" not in dec["rows"][batch]
        )
    assert dec["best_batch"] in (2, 4) and set(dec["reports_per_min"]) == {"batch_2", "batch_4"}
    assert budget.cut == [
        "diffusion_train.batch_16",
        "diffusion_train.profile_batch_8",
        "diffusion_train.roofline",
        "sampling.batch_2.extra_samplers",
        "sampling.batch_4.extra_samplers",
        "decode.batch_2.variants",
        "decode.batch_4.variants",
        "decode.static",
    ]


def test_gpu_suite_out_of_time_still_writes_its_json(tmp_path):
    """The row in flight at the end of --budget-s is stopped, the rows after it are not run, and the JSON says so
    under every key's note."""
    out = tmp_path / "suite.json"
    result = run_tiny_suite(
        out, "--budget-s", "0.5", "--skip", "prepare", "adamatch_train", "loader", "learn"
    )
    notes, rows = result["notes"], result["rows"]
    assert notes["diffusion_train"].startswith("stopped part way: the time budget (0.5 s")
    stopped = rows["diffusion_train"]
    if stopped is None:  # stopped before it measured anything
        assert result["diffusion_train_images_per_s"] is None
    else:  # what it measured before the alarm stays, and the keys read it
        measured = [v["images_per_s"] for v in stopped.get("variants", {}).values()]
        assert "time budget" in stopped["stopped"]
        assert result["diffusion_train_images_per_s"] == (max(measured) if measured else None)
    for row in ("sampling", "decode"):
        assert rows[row] is None and notes[row].startswith("not run: the time budget"), row
    assert result["budget"]["seconds"] == 0.5
    assert "sampling" in notes["sampling_speedup_b8"] and result["decode_reports_per_min"] is None
    assert not out.with_suffix(".partial.json").exists()


def test_training_rows_and_bf16_sampling_under_cuda_autocast(tmp_path):
    """The suite's bf16 paths as a GPU runs them (tests.cuda_autocast: softmax, norms and losses in float32)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    import unet_scale_speed
    from gpu_suite import TINY, Budget, adamatch_train, diffusion_train

    from tests.cuda_autocast import cuda_autocast
    from tests.toydata import make_tiny_prepared

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    budget = Budget(3600, {**TINY, "extra_s": {k: 1e9 for k in TINY["extra_s"]}})
    data = make_tiny_prepared(tmp_path / "prepared")
    with cuda_autocast():
        train = diffusion_train(TINY, cpu, "bf16", False, None, budget)
        ada, _ = adamatch_train(TINY, data, cpu, "bf16", False, None, budget)
        cfg, model, word_dim, keypatch_dim = unet_scale_speed.build("tiny", cpu, 3, "tiny")
        feats = unet_scale_speed.features(cfg, 2, word_dim, keypatch_dim, cpu)
        row = unet_scale_speed.sample_row(
            cfg,
            model,
            feats,
            (3, 16, 16),
            sampler="consistency",
            steps=2,
            guidance=1.0,
            precision="bf16",
            repeats=1,
            device=cpu,
        )
    assert train["variants"]["fast"]["images_per_s"] > 0 and ada["variants"]["fast"]["images_per_s"] > 0
    assert row["finite"]


def test_a_cuda_profile_counts_each_kernel_once():
    """The profiler lists a CPU operator with its kernels' device time, the kernels themselves, and user ranges
    (the optimiser's step): only the kernels count, else the busy time comes out two or three times over."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "benchmarks"))
    from kernel_profile import timed_rows
    from torch.autograd import DeviceType

    def event(key, device, device_us, cpu_us=0.0, annotation=False):
        return SimpleNamespace(
            key=key,
            device_type=device,
            self_device_time_total=device_us,
            self_cpu_time_total=cpu_us,
            is_user_annotation=annotation,
            count=6,
        )

    events = [
        event("aten::cudnn_convolution", DeviceType.CPU, 300.0, cpu_us=40.0),
        event("sm90_xmma_fprop_implicit_gemm_bf16", DeviceType.CUDA, 300.0),
        event("Optimizer.step#AdamW.step", DeviceType.CUDA, 120.0, annotation=True),
        event("multi_tensor_apply_kernel<FusedAdamW>", DeviceType.CUDA, 100.0),
    ]
    rows = timed_rows(events, cuda=True, calls=3)
    assert [r[0] for r in rows] == [
        "sm90_xmma_fprop_implicit_gemm_bf16",
        "multi_tensor_apply_kernel<FusedAdamW>",
    ]
    assert abs(sum(r[2] for r in rows) - 400e-6 / 3) < 1e-12 and rows[0][1] == "conv" and rows[0][3] == 2
    cpu = timed_rows(events, cuda=False, calls=3)  # the CPU: aten operators' own time
    assert [r[0] for r in cpu] == ["aten::cudnn_convolution"] and abs(cpu[0][2] - 40e-6 / 3) < 1e-12

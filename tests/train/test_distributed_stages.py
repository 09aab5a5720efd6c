"""The report and diffusion stages on two CPU processes (gloo, torchrun) end with the weights of one process
with the same global batch: both ranks identical, and equal to the one-process run up to float rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.diffusion_fixtures import finish_run, make_report_run, train_plain
from tests.models.report_fixtures import make_tiny_adamatch_run
from tests.train.test_distributed import check, torchrun_env

WORKER = Path(__file__).with_name("stage_ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # two launches each (about a minute per stage on 2 shared cores)


def launch(processes: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKER), *args]
    if processes > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
        ]
        cmd += [str(WORKER), *args]
    return subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def one_vs_two(tmp_path: Path, stage: str, from_runs: list[Path], data: Path, sets: list[str], *extra: str):
    """Weights of rank 0 and 1 of a two-process run (batch 4 each) and of a one-process run (batch 8)."""
    dumps = {}
    for processes, batch in ((2, 4), (1, 8)):
        root = tmp_path / f"p{processes}"
        (root / "dump").mkdir(parents=True)
        args = [
            "--stage",
            stage,
            "--data",
            str(data),
            "--out",
            str(root / "run"),
            "--dump",
            str(root / "dump"),
        ]
        args += ["--from", *map(str, from_runs), "--set", *sets, f"train.batch_size={batch}", *extra]
        check(launch(processes, *args))
        info = json.loads((root / "run" / "stage.json").read_text())
        assert info["world_size"] == processes
        dumps[processes] = [torch.load(root / "dump" / f"rank_{r}.pt") for r in range(processes)]
    (r0, r1), (single,) = dumps[2], dumps[1]
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    return r0


def test_report_stage_two_processes_match_one(tmp_path, tiny_prepared):
    adamatch = make_tiny_adamatch_run(tiny_prepared, tmp_path / "adamatch")
    sets = ["train.steps=3", "train.eval_every=0", "train.checkpoint_every=0", "train.warmup_steps=1"]
    weights = one_vs_two(tmp_path, "report", [adamatch], tiny_prepared, sets)
    assert any("decoder" in k for k in weights)


def test_diffusion_stage_two_processes_match_one(tmp_path, tiny_prepared):
    from medvl.train.stages.autoencoder import build_autoencoder_stage

    ae_stage = build_autoencoder_stage(config_path="tiny", overrides=[], data=tiny_prepared)
    ae = finish_run(ae_stage, train_plain(ae_stage, 2)[0], tmp_path / "ae")
    adamatch = make_tiny_adamatch_run(tiny_prepared, tmp_path / "adamatch")
    report = make_report_run(tmp_path / "report")
    sets = ["train.steps=3", "train.eval_every=0", "train.checkpoint_every=0", "train.warmup_steps=1"]
    weights = one_vs_two(tmp_path, "diffusion", [adamatch, report, ae], tiny_prepared, sets, "--tied-noise")
    assert any("unet" in k for k in weights)

"""Two CPU processes (gloo) through torchrun: both ranks end with identical weights, the same
weights (up to float rounding) as one process with twice the batch, and (slow) a resumed
two-process run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from medvl.train.loop import TrainConfig, fit
from tests.train.toy_stage import ToyConfig, ToyModelConfig, ToyStage

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def torchrun_env() -> dict[str, str]:
    """The environment of a CPU-only two-process launch on the loopback interface."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even on a GPU machine
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    return env


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = torchrun_env()
    # --standalone: torchrun picks a free localhost port itself (no race with other test runs)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def check(proc: subprocess.CompletedProcess) -> None:
    """A launch ended well; else its whole output is kept in a file (a rank's traceback can lie far above the
    launcher's tail, which the message shows)."""
    if proc.returncode != 0:
        fd, path = tempfile.mkstemp(prefix="medvl_failed_launch_", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{proc.args}\n== stdout\n{proc.stdout}\n== stderr\n{proc.stderr}")
        raise AssertionError(f"the launch failed; its whole output: {path}\n" + proc.stderr[-3000:])


def load_ranks(dump: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return torch.load(dump / "rank_0.pt"), torch.load(dump / "rank_1.pt")


def test_two_processes_hold_identical_weights(tmp_path):
    straight = tmp_path / "straight"
    (straight / "dump").mkdir(parents=True)

    # both ranks end with identical weights
    check(torchrun("--out", str(straight / "run"), "--dump", str(straight / "dump")))
    r0, r1 = load_ranks(straight / "dump")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    info = json.loads((straight / "run" / "stage.json").read_text())
    assert info["world_size"] == 2 and info["steps"] == 4

    # rank r takes slice r of each global batch: 2 x 4 per step is the same data as 1 x 8, so one
    # process with batch 8 ends at the same weights up to float rounding (its only validation is at
    # the end, so save_run receives the step-4 weights)
    single = ToyStage(
        ToyConfig(
            model=ToyModelConfig(dropout=0.0, samples=40),
            train=TrainConfig(
                steps=4, batch_size=8, lr=1e-2, warmup_steps=1, checkpoint_every=0, eval_every=0, log_every=1
            ),
        )
    )
    fit(single, tmp_path / "single")
    for k in r0:
        torch.testing.assert_close(r0[k], single.saved[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    """Crash after the step-2 checkpoint, resume on two processes: the same weights on each rank as an
    uninterrupted two-process run (per-rank RNG and data position). Three launches: marked slow."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for d in (straight, resumed):
        (d / "dump").mkdir(parents=True)
    check(torchrun("--out", str(straight / "run"), "--dump", str(straight / "dump")))
    r0, r1 = load_ranks(straight / "dump")
    crash = torchrun("--out", str(resumed / "run"), "--dump", str(resumed / "dump"), "--interrupt-at", "3")
    assert crash.returncode != 0 and "simulated crash" in crash.stdout + crash.stderr
    check(torchrun("--out", str(resumed / "run"), "--dump", str(resumed / "dump"), "--resume"))
    b0, b1 = load_ranks(resumed / "dump")
    for k in r0:
        assert torch.equal(r0[k], b0[k]) and torch.equal(r1[k], b1[k]), k


def test_a_rank_that_reaches_fit_late_finds_no_run_begun(tmp_path):
    """Every rank checks the run folder before rank 0 writes into it: a rank that starts late (a slow import, a
    busy core) found rank 0's config there and refused the run as an unfinished one."""
    (tmp_path / "dump").mkdir()
    check(torchrun("--out", str(tmp_path / "run"), "--dump", str(tmp_path / "dump"), "--late-rank1", "3"))
    assert json.loads((tmp_path / "run" / "stage.json").read_text())["world_size"] == 2


def test_stages_run_on_the_cpu_under_accelerate_launch_cpu_even_with_a_gpu():
    """``accelerate launch --cpu`` sets ACCELERATE_USE_CPU: a stage's own models (the diffusion stage's frozen
    autoencoder and AdaMatch, the report stage's) then stay on the CPU where a GPU is present. Run in a fresh
    process, since Accelerate keeps the first answer for the whole process."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from medvl.train.distributed import stage_device\n"
        "print(stage_device())\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    env.pop("LOCAL_RANK", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "cpu"

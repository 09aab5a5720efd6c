"""benchmarks/prepare_scale.py's memory reading: a process tree's anonymous memory counts its children's, and the
summary compares the peaks of a run's two halves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")


def test_tree_memory_counts_a_child_process():
    from prepare_scale import tree_anon_mb

    alone = tree_anon_mb(os.getpid())
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; b = bytearray(200 << 20); print(1, flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "1"  # its 200 MB are allocated and written
        with_child = tree_anon_mb(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert with_child - alone > 180, (alone, with_child)
    time.sleep(0.1)
    assert tree_anon_mb(os.getpid()) - alone < 100  # gone with the child


def test_memory_summary_compares_the_two_halves():
    from prepare_scale import MemorySampler

    sampler = MemorySampler(os.getpid())
    sampler.samples = [(0.0, 100.0), (1.0, 300.0), (2.0, 150.0), (3.0, 320.0), (4.0, 120.0)]
    summary = sampler.summary()
    assert summary["peak_mb"] == 320.0 and summary["first_half_peak_mb"] == 300.0
    assert summary["second_half_peak_mb"] == 320.0 and summary["growth_mb"] == 20.0
    assert MemorySampler(os.getpid()).summary() == {"samples": 0}

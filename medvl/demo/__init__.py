"""``medvl demo``: the whole system on the embedded IU-Phantom dataset, in one command (see :mod:`medvl.demo.run`)."""

from __future__ import annotations

from medvl.demo.run import PRESETS, Step, build_steps, merge_metrics, run_demo

__all__ = ["PRESETS", "Step", "build_steps", "merge_metrics", "run_demo"]

"""The stages of the shared training loop, one module each, and the entry point ``medvl train`` calls.

Each stage module exposes ``build_stage(*, config_path, overrides, data, from_runs) -> Stage``,
registered in :data:`medvl.registry.STAGES`. :func:`run_stage` resolves the config, builds the
stage and runs :func:`medvl.train.loop.fit`.
"""

from __future__ import annotations

from pathlib import Path

import medvl.registry as registry
from medvl.config import resolve_config_path
from medvl.errors import DataError
from medvl.runs import describe_data, read_stage_info
from medvl.train.loop import FitResult, fit


def run_stage(
    stage: str,
    *,
    config: str | Path,
    data: str | Path,
    out: str | Path,
    from_runs: list[Path] | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
) -> FitResult:
    """``medvl train STAGE --config C --data D --out RUN [--from RUN...] [--set k=v] [--resume]``."""
    builder = registry.builder(stage)
    config_path = resolve_config_path(stage, config)
    data = Path(data)
    if data.exists() and not data.is_dir():
        raise DataError(
            f"--data {data} is a file; it takes a prepared dataset directory (made by `medvl prepare ...`)"
        )
    if not data.is_dir():
        raise DataError(f"prepared dataset {data} does not exist (make one with `medvl prepare ...`)")
    from_runs = [Path(r) for r in from_runs or []]
    for run in from_runs:
        read_stage_info(run)
    built = builder(config_path=config_path, overrides=list(overrides or []), data=data, from_runs=from_runs)
    return fit(built, Path(out), resume=resume, from_runs=from_runs, data_info=describe_data(data))

"""Stage registry and the entry point ``medvl train`` calls.

Each stage module exposes ``build_stage(*, config_path, overrides, data, from_runs) -> Stage``;
:data:`STAGE_BUILDERS` maps stage names to ``"module:function"``. :func:`run_stage` resolves
the config, builds the stage and runs :func:`medvl.train.loop.fit`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medvl.config import resolve_config_path
from medvl.errors import ConfigError, DataError, RunError
from medvl.train.loop import STAGE_FILE, FitResult, Stage, fit

STAGE_BUILDERS: dict[str, str] = {
    "adamatch": "medvl.train.stages.adamatch:build_stage",
    "report": "medvl.train.stages.report:build_stage",
    "autoencoder": "medvl.train.stages.diffusion:build_autoencoder_stage",
    "diffusion": "medvl.train.stages.diffusion:build_diffusion_stage",
}


def load_builder(stage: str) -> Callable[..., Stage]:
    """The ``build_stage`` function registered for ``stage``.

    Raises :class:`ConfigError` for an unknown stage and :class:`RunError` when the stage's
    module is not part of this version of medvl.
    """
    if stage not in STAGE_BUILDERS:
        raise ConfigError(f"unknown stage '{stage}' (stages: {', '.join(STAGE_BUILDERS)})")
    module_name, func_name = STAGE_BUILDERS[stage].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise RunError(f"stage '{stage}' is not available in this version of medvl "
                           f"(module {module_name} is missing)") from None
        raise  # a dependency of the stage module is missing: a real error, keep its message
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise RunError(f"stage '{stage}' is not available in this version of medvl "
                       f"({module_name} has no {func_name})")
    return builder


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/stage.json`` of a finished run; :class:`RunError` if ``run_dir`` is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    path = run_dir / STAGE_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a finished medvl run (no {STAGE_FILE}); train it to the end first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON: {exc}") from None


def find_from_run(from_runs: list[Path] | None, stage: str) -> Path:
    """The run among ``--from`` runs whose stage is ``stage``; :class:`RunError` if none or several."""
    found = [Path(r) for r in from_runs or [] if read_run_info(r).get("stage") == stage]
    if not found:
        given = ", ".join(str(r) for r in from_runs or []) or "none"
        raise RunError(f"this stage needs a finished '{stage}' run given with --from (given: {given})")
    if len(found) > 1:
        raise RunError(f"several '{stage}' runs given with --from: {', '.join(map(str, found))}; give one")
    return found[0]


def run_stage(stage: str, *, config: str | Path, data: str | Path, out: str | Path,
              from_runs: list[Path] | None = None, overrides: list[str] | None = None,
              resume: bool = False) -> FitResult:
    """``medvl train STAGE --config C --data D --out RUN [--from RUN...] [--set k=v] [--resume]``."""
    builder = load_builder(stage)
    config_path = resolve_config_path(stage, config)
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"prepared dataset {data} does not exist (make one with `medvl prepare ...`)")
    from_runs = [Path(r) for r in from_runs or []]
    for run in from_runs:
        read_run_info(run)
    built = builder(config_path=config_path, overrides=list(overrides or []), data=data, from_runs=from_runs)
    return fit(built, Path(out), resume=resume, from_runs=from_runs)

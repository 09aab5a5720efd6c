"""The run directory while a stage trains: full-state checkpoints, exact resume, best weights.

    RUN/config.yaml            resolved config of the stage
    RUN/checkpoints/step_N/    full training state: Accelerate's model, optimiser, scheduler, stage state and
                               RNG per rank, plus ``loop_state.json`` (:class:`LoopState`); kept: the newest
                               ``train.keep_checkpoints``
    RUN/best/step_N/           best weights by validation so far (``model.pt``, ``metrics.json``); removed
                               when the run ends
    RUN/logs/                  TensorBoard event files
    RUN/...                    inference artifacts written by ``Stage.save_run`` from the best weights
    RUN/stage.json             {"stage", "medvl_version", "from", "data", "best_step", "best_metrics", "steps",
                                "seconds", "images_per_second", "peak_memory_mb", ...}; written last, its
                               presence marks a finished run

Every directory is written under a ``.tmp_`` name and renamed into place, so a checkpoint that
exists is complete; a run resumes from the newest one. The data position is a count of consumed
micro-batches, so resuming skips exactly those batches without loading them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from medvl.errors import RunError
from medvl.runs import CONFIG_FILE, STAGE_FILE, read_stage_info, write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
LOG_DIR = "logs"
LOOP_STATE_FILE = "loop_state.json"
BEST_WEIGHTS_FILE = "model.pt"

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = frozenset(
    {
        "train.num_workers",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
    }
)

RunKind = Literal["new", "finished", "partial"]


@dataclass
class LoopState:
    """What a checkpoint records besides model, optimiser, scheduler and RNG (``loop_state.json``)."""

    step: int = 0  # optimiser steps done
    micro_batches: int = 0  # micro-batches consumed per rank
    epoch: int = 0  # data position, for people reading the file: epoch ...
    batch_in_epoch: int = 0  # ... and micro-batch offset inside it
    world_size: int = 1
    batch_size: int = 1
    grad_accum: int = 1
    num_samples: int = 0  # training-set size: resuming on other data would not be exact
    best_step: int = -1
    best_value: float | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    seconds: float = 0.0  # wall-clock seconds of earlier launches

    @classmethod
    def read(cls, path: Path) -> LoopState:
        return cls(**json.loads(path.read_text()))


# ----------------------------------------------------------------------------- the run directory


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint ``RUN/checkpoints/step_N`` (complete ones are renamed into place)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = [
        (int(p.name.split("_", 1)[1]), p)
        for p in root.glob("step_*")
        if p.name.split("_", 1)[1].isdigit() and (p / LOOP_STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def run_kind(run_dir: Path) -> RunKind:
    """``new`` (absent or empty), ``finished`` (has stage.json) or ``partial``; :class:`RunError`
    for a path that is not a directory or holds files that are not a medvl run."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} exists and is not a directory")
    if (run_dir / STAGE_FILE).is_file():
        return "finished"
    if any((run_dir / name).exists() for name in (CONFIG_FILE, CHECKPOINT_DIR, LOG_DIR, BEST_DIR)):
        return "partial"
    if any(run_dir.iterdir()):
        raise RunError(f"{run_dir} already holds files that are not a medvl run; choose another --out")
    return "new"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dumps, except :data:`RESUMABLE_KEYS`."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS)


def check_run_dir(out: Path, resume: bool, config_dump: dict[str, Any]) -> RunKind:
    """What ``out`` holds, or :class:`RunError` when training into it is refused: a finished run (medvl never
    overwrites one), an unfinished run without ``resume``, or one whose saved config differs in a key that
    changes what is trained."""
    kind = run_kind(out)
    if kind == "finished":
        info = read_stage_info(out)
        if resume:
            raise RunError(f"{out} holds a finished '{info.get('stage')}' run; there is nothing to resume")
        raise RunError(
            f"{out} already holds a finished '{info.get('stage')}' run; choose another --out "
            "(medvl never overwrites a run)"
        )
    if kind == "partial" and not resume:
        ckpt = latest_checkpoint(out)
        where = f"last checkpoint: step {ckpt.name.split('_')[1]}" if ckpt else "no checkpoint yet"
        raise RunError(
            f"{out} holds an unfinished run ({where}); pass --resume to continue it, or choose another --out"
        )
    saved_cfg = out / CONFIG_FILE
    if kind == "partial" and saved_cfg.is_file():
        changes = config_changes(yaml.safe_load(saved_cfg.read_text()) or {}, config_dump)
        if changes:
            raise RunError(
                f"cannot resume {out}: the config differs from the run's in {', '.join(changes)}; "
                "start a new run (or restore those values)"
            )
    return kind


def clear_unfinished_writes(out: Path) -> None:
    """Remove checkpoint directories whose writing was interrupted (rank 0)."""
    root = out / CHECKPOINT_DIR
    for tmp in root.glob(".tmp_*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def open_run_dir(
    accelerator: Accelerator, out: Path, kind: RunKind, *, resume: bool, config_dump: dict[str, Any]
) -> Path | None:
    """Write the resolved config and clear interrupted checkpoint writes (rank 0); the checkpoint to resume
    from, if any (``kind`` from :func:`check_run_dir`)."""
    checkpoint = latest_checkpoint(out) if kind == "partial" else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(config_dump, sort_keys=False))
        clear_unfinished_writes(out)
    accelerator.wait_for_everyone()
    if resume and kind == "partial" and checkpoint is None and accelerator.is_main_process:
        logger.warning("%s has no complete checkpoint yet; training starts from step 0", out)
    return checkpoint


def prune_best(out: Path, keep_step: int) -> None:
    """Remove the best-weight directories other than ``step_<keep_step>`` (rank 0)."""
    root = out / BEST_DIR
    for p in root.glob("step_*") if root.is_dir() else []:
        if p.name != f"step_{keep_step}":
            shutil.rmtree(p, ignore_errors=True)


def best_weights_file(out: Path, step: int) -> Path:
    return out / BEST_DIR / f"step_{step}" / BEST_WEIGHTS_FILE


def save_best_weights(
    out: Path, step: int, state_dict: dict[str, torch.Tensor] | None, metrics: dict[str, float]
) -> None:
    """``RUN/best/step_N/``: the weights and validation metrics of a new best step (rank 0)."""
    root = out / BEST_DIR
    target = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state_dict, tmp / BEST_WEIGHTS_FILE)
    (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# ----------------------------------------------------------------------------- checkpoints


def write_checkpoint_state(accelerator: Accelerator, out: Path, step: int) -> Path:
    """Accelerate's full state (every rank's part) into ``RUN/checkpoints/.tmp_step_N``; returns that path.
    :func:`commit_checkpoint` completes it."""
    tmp = out / CHECKPOINT_DIR / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    return tmp


def commit_checkpoint(tmp: Path, state: LoopState, *, keep: int) -> None:
    """Add ``loop_state.json`` to the written state ``tmp``, rename it to ``step_N``, keep the newest ``keep``
    checkpoints and only the best weights of ``state.best_step`` (rank 0)."""
    write_json_atomic(tmp / LOOP_STATE_FILE, asdict(state))
    root = tmp.parent
    final = root / f"step_{state.step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted((int(p.name[5:]), p) for p in root.glob("step_*") if p.name[5:].isdigit())
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    prune_best(root.parent, state.best_step)


def restore_checkpoint(
    accelerator: Accelerator, checkpoint: Path, *, out: Path, num_samples: int, batches_per_epoch: int
) -> LoopState:
    """Load model, optimiser, scheduler, stage state and RNG per rank from ``checkpoint``; returns its loop state.

    :class:`RunError` when the launch has another number of processes or the training set another size
    (the resumed run would not be exact). Best weights written after the checkpoint are not on this run's
    timeline and are removed; missing best weights restart model selection.
    """
    saved = LoopState.read(checkpoint / LOOP_STATE_FILE)
    world = accelerator.num_processes
    if saved.world_size != world:
        raise RunError(
            f"cannot resume {out}: it was trained on {saved.world_size} process(es), "
            f"this launch has {world}; resume with the same number of processes"
        )
    if saved.num_samples != num_samples:
        raise RunError(
            f"cannot resume {out}: its training set had {saved.num_samples} samples, this one has "
            f"{num_samples}; resume with the same --data"
        )
    accelerator.load_state(str(checkpoint))  # model, optimiser, scheduler, stage state, RNG per rank
    state = saved
    if accelerator.is_main_process:
        if state.best_step >= 0 and not best_weights_file(out, state.best_step).is_file():
            logger.warning("best weights of step %d are missing; model selection restarts", state.best_step)
            state.best_step, state.best_value, state.best_metrics = -1, None, {}
        prune_best(out, state.best_step)  # written after the checkpoint: not on this timeline
        tqdm.write(
            f"resuming {out} from {checkpoint.name} (epoch {state.epoch}, micro-batch "
            f"{state.batch_in_epoch} of {batches_per_epoch})"
        )
    return state

"""The run directory while a stage trains: full-state checkpoints, exact resume, best weights.

    RUN/config.yaml            resolved config of the stage
    RUN/checkpoints/step_N/    full training state, kept: the newest ``train.keep_checkpoints``:
        model.safetensors      weights
        optimizer.safetensors  optimiser state, scheduler.safetensors the learning-rate schedule,
                               stage_state.safetensors a stage's own state (e.g. an EMA), when it has one
        rng_<rank>.safetensors Python, NumPy and torch (CPU and accelerator) random states of each rank
        loop_state.json        :class:`LoopState`: step, data position, model selection so far
        manifest.json          name, size and SHA-256 of every file above; written last
    RUN/best/step_N/           best weights by validation so far (``model.safetensors``, ``metrics.json``);
                               removed when the run ends
    RUN/logs/                  TensorBoard event files (scalars; images only with ``train.log_images``)
    RUN/...                    inference artifacts written by ``Stage.save_run`` from the best weights
    RUN/stage.json             {"stage", "medvl_version", "from", "data", "best_step", "best_metrics", "steps",
                                "seconds", "images_per_second", "peak_memory_mb", ...}; written last, its
                               presence marks a finished run

No file is a pickle: the states are tensors in safetensors files with their plain-data structure as JSON
(:mod:`medvl.train.state_files`), so reading a checkpoint never runs code, whatever it holds. Every
directory is written under a ``.tmp_`` name and renamed into place. A resume checks the newest checkpoint
against its manifest and, when a file is missing, truncated or changed, says so and falls back to the
newest checkpoint that verifies. The data position is a count of consumed micro-batches, so resuming
skips exactly those batches without loading them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from medvl.errors import RunError
from medvl.runs import CONFIG_FILE, STAGE_FILE, read_stage_info, write_json_atomic
from medvl.train.distributed import broadcast_from_main, is_sharded, unwrap
from medvl.train.state_files import (
    MANIFEST_FILE,
    StateFileError,
    load_state,
    read_manifest,
    save_state,
    verify_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
LOG_DIR = "logs"
LOOP_STATE_FILE = "loop_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
STAGE_STATE_FILE = "stage_state.safetensors"
BEST_WEIGHTS_FILE = "model.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_{rank}.safetensors"


# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = frozenset(
    {
        "train.num_workers",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.log_images",
        "train.max_seconds",  # a time budget per launch
        "train.speed.channels_last",  # speed options change how fast, not what is trained
        "train.speed.fused_adamw",
        "train.speed.compile",
        "train.speed.compile_mode",
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


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Every ``RUN/checkpoints/step_N`` directory, newest first (complete or not)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(p.name[5:]), p) for p in root.glob("step_*") if p.name[5:].isdigit() and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint ``RUN/checkpoints/step_N`` that has its manifest (written last); its files are
    checked against the manifest only when a resume reads them (:func:`choose_checkpoint`)."""
    return next((p for p in all_checkpoints(run_dir) if (p / MANIFEST_FILE).is_file()), None)


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
        try:
            saved = yaml.safe_load(saved_cfg.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RunError(
                f"{saved_cfg} is not readable YAML ({exc}); restore it or choose another --out"
            ) from None
        if not isinstance(saved, dict):
            raise RunError(
                f"{saved_cfg} is not a medvl config (not a mapping); restore it or choose another --out"
            )
        changes = config_changes(saved, config_dump)
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
    accelerator: Accelerator,
    out: Path,
    kind: RunKind,
    *,
    resume: bool,
    config_dump: dict[str, Any],
    with_stage_state: bool = False,
) -> Path | None:
    """Write the resolved config and clear interrupted checkpoint writes (rank 0); the checkpoint to resume
    from, if any (``kind`` from :func:`check_run_dir`): the newest one that verifies, chosen on rank 0
    (:func:`choose_checkpoint`) for every rank."""
    choice: tuple[str, str | None] = ("none", None)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(config_dump, sort_keys=False))
        clear_unfinished_writes(out)
        if kind == "partial":
            try:
                found = choose_checkpoint(out, with_stage_state)
                choice = ("checkpoint", str(found)) if found is not None else ("none", None)
            except RunError as exc:
                choice = ("error", str(exc))
    choice = broadcast_from_main(choice, accelerator.num_processes)
    accelerator.wait_for_everyone()
    if choice[0] == "error":
        raise RunError(choice[1])
    if resume and kind == "partial" and choice[0] == "none" and accelerator.is_main_process:
        logger.warning("%s has no complete checkpoint yet; training starts from step 0", out)
    return Path(choice[1]) if choice[0] == "checkpoint" else None


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
    save_weights(state_dict, tmp / BEST_WEIGHTS_FILE)
    (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# ----------------------------------------------------------------------------- checkpoints


def _weights_for_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: tied weights (one storage under two names) are stored twice."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        t = v.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    save_file(_weights_for_file(sd), str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file (CPU); :class:`RunError` naming the file when it is not one."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        raise RunError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _readable_weights(path: Path) -> bool:
    try:
        load_weights(path)
    except RunError:
        return False
    return True


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device, path: Path) -> None:
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], device)
        elif device.type == "mps":
            torch.mps.set_rng_state(state["mps"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise RunError(
            f"{path} does not hold the random states this run needs ({exc}); remove its checkpoint"
        ) from None


def _model_and_optimizer_state(
    accelerator: Accelerator, model: nn.Module, optimizer: Any
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Full weights and optimiser state on rank 0 (None elsewhere); a collective under FSDP."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=opts)
        return (msd, osd) if accelerator.is_main_process else (None, None)
    if not accelerator.is_main_process:
        return None, None
    return unwrap(model).state_dict(), optimizer.state_dict()


def write_checkpoint_state(
    accelerator: Accelerator,
    out: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    stage: Any | None,
) -> Path:
    """The full training state (every rank's random states) into ``RUN/checkpoints/.tmp_step_N``; returns that
    path. :func:`commit_checkpoint` completes it."""
    tmp = out / CHECKPOINT_DIR / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    msd, osd = _model_and_optimizer_state(accelerator, model, optimizer)
    if accelerator.is_main_process:
        save_weights(msd, tmp / MODEL_FILE)
        save_state(osd, tmp / OPTIMIZER_FILE)
        save_state(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if stage is not None:
            save_state(stage.state_dict(), tmp / STAGE_STATE_FILE)
    save_state(_rng_state(accelerator.device), tmp / rng_file(accelerator.process_index))
    accelerator.wait_for_everyone()
    return tmp


def commit_checkpoint(tmp: Path, state: LoopState, *, keep: int) -> None:
    """Add ``loop_state.json`` and the manifest to the written state ``tmp``, rename it to ``step_N``, keep the
    newest ``keep`` checkpoints and only the best weights of ``state.best_step`` (rank 0)."""
    write_json_atomic(tmp / LOOP_STATE_FILE, asdict(state))
    write_manifest(tmp, state.step)
    root = tmp.parent
    final = root / f"step_{state.step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted((int(p.name[5:]), p) for p in root.glob("step_*") if p.name[5:].isdigit())
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    prune_best(root.parent, state.best_step)


def has_stage_state(stage: Any) -> bool:
    """Whether a stage keeps state outside the model that checkpoints carry (``state_dict`` / ``load_state_dict``)."""
    return callable(getattr(stage, "state_dict", None)) and callable(getattr(stage, "load_state_dict", None))


def required_files(with_stage_state: bool) -> list[str]:
    """The files every checkpoint must list (a run on N processes also has ``rng_1`` ... ``rng_<N-1>``, checked
    against the loop state when resuming)."""
    names = [MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, LOOP_STATE_FILE, rng_file(0)]
    return names + ([STAGE_STATE_FILE] if with_stage_state else [])


def choose_checkpoint(out: Path, with_stage_state: bool = False) -> Path | None:
    """The newest checkpoint of ``out`` whose files match its manifest, saying (log line) which newer ones are
    damaged and skipped; None when there are none. :class:`RunError` naming each damaged file when there
    are checkpoints and none verifies."""
    damaged: list[str] = []
    for ckpt in all_checkpoints(out):
        try:
            verify_manifest(ckpt, required_files(with_stage_state))
        except StateFileError as exc:
            damaged.append(str(exc))
            logger.warning("checkpoint %s is damaged and skipped: %s", ckpt.name, exc)
            continue
        if damaged:
            logger.warning("resuming from %s, the newest checkpoint whose files match its manifest", ckpt)
        return ckpt
    if damaged:
        raise RunError(
            f"cannot resume {out}: no checkpoint is complete ({'; '.join(damaged)}); restore those files, or "
            f"remove {out / CHECKPOINT_DIR} to train from step 0 with the run's config"
        )
    return None


def restore_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    *,
    out: Path,
    num_samples: int,
    batches_per_epoch: int,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    stage: Any | None,
) -> LoopState:
    """Load model, optimiser, scheduler, stage state and this rank's random states from ``checkpoint`` (verified
    by :func:`choose_checkpoint`); returns its loop state.

    :class:`RunError` when the launch has another number of processes or the training set another size
    (the resumed run would not be exact), or a file cannot be read. Best weights written after the checkpoint
    are not on this run's timeline and are removed; missing best weights restart model selection.
    """
    path = checkpoint / LOOP_STATE_FILE
    try:
        saved = LoopState.read(path)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise RunError(
            f"{path} is not a loop state written by medvl ({exc}); remove its checkpoint"
        ) from None
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
    if rng_file(accelerator.process_index) not in read_manifest(checkpoint)["files"]:
        raise RunError(f"{checkpoint} holds no random states of rank {accelerator.process_index}; remove it")
    # read everything before changing anything
    try:
        weights = load_weights(checkpoint / MODEL_FILE)
    except RunError as exc:
        raise RunError(f"{exc}; remove the checkpoint {checkpoint}") from None
    states = {}
    for name in (OPTIMIZER_FILE, SCHEDULER_FILE, rng_file(accelerator.process_index)) + (
        (STAGE_STATE_FILE,) if stage is not None else ()
    ):
        try:
            states[name] = load_state(checkpoint / name)
        except StateFileError as exc:
            raise RunError(f"{exc}; remove the checkpoint {checkpoint}") from None
    try:
        if is_sharded(accelerator):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                model,
                getattr(optimizer, "optimizer", optimizer),
                model_state_dict=weights,
                optim_state_dict=states[OPTIMIZER_FILE],
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
            )
        else:
            unwrap(model).load_state_dict(weights)
            optimizer.load_state_dict(states[OPTIMIZER_FILE])
        scheduler.load_state_dict(states[SCHEDULER_FILE])
        if stage is not None:
            stage.load_state_dict(states[STAGE_STATE_FILE])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise RunError(
            f"cannot resume {out} from {checkpoint}: its state does not fit this model ({exc}); start a new run"
        ) from None
    _set_rng_state(states[rng_file(accelerator.process_index)], accelerator.device, checkpoint)
    state = saved
    if accelerator.is_main_process:
        if state.best_step >= 0 and not _readable_weights(best_weights_file(out, state.best_step)):
            logger.warning(
                "best weights of step %d are missing or unreadable; model selection restarts", state.best_step
            )
            state.best_step, state.best_value, state.best_metrics = -1, None, {}
        prune_best(out, state.best_step)  # written after the checkpoint: not on this timeline
        tqdm.write(
            f"resuming {out} from {checkpoint.name} (epoch {state.epoch}, micro-batch "
            f"{state.batch_in_epoch} of {batches_per_epoch})"
        )
    return state

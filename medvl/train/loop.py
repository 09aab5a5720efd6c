"""The one training loop every stage shares.

A stage (AdaMatch, report head, autoencoder, diffusion) supplies its model, datasets, one
training step and a validation pass through the :class:`Stage` protocol; this module owns
everything else: Accelerate (bf16 autocast, DDP/FSDP under ``torchrun`` / ``accelerate launch``),
gradient accumulation, AdamW with cosine schedule and warmup, atomic full-state checkpoints
(model, optimiser, scheduler, RNG, data position), exact ``--resume``, validation-only model
selection, TensorBoard logs and a progress bar.

Run directory written by :func:`fit`::

    RUN/config.yaml            resolved config of the stage
    RUN/stage.json             {"stage", "medvl_version", "from", "data", "best_step", "best_metrics", "steps",
                                "seconds", "images_per_second", "peak_memory_mb", ...}; written last,
                               its presence marks a finished run
    RUN/checkpoints/step_N/    full training state (kept: the newest ``keep_checkpoints``)
    RUN/best/step_N/           best weights by validation so far (internal; removed when the run ends)
    RUN/logs/                  TensorBoard event files
    RUN/...                    inference artifacts written by ``Stage.save_run`` from the best weights

Data order is the loop's own: for each epoch a permutation drawn from ``(seed, epoch)``, cut into
global batches of ``world_size * batch_size`` (the tail that does not fill one is dropped); rank
``r`` takes slice ``r`` of each global batch. A run on 2 processes with batch 4 therefore sees the
same samples per optimiser step as a run on 1 process with batch 8. The data position is a count
of consumed micro-batches, so resuming skips exactly those batches without loading them.

Model selection: validation runs on rank 0 every ``eval_every`` steps and at the end; a strictly
better ``select_metric`` (ties keep the earlier step; NaN never wins) becomes the best, and
``save_run`` receives those weights. Validation draws from isolated random streams, so
``eval_every`` changes which weights are kept, never how training goes. Under ``torchrun`` the
run directory must be on a filesystem every rank sees (each rank writes its own RNG state), and
a run resumes only with the same number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from medvl.errors import ConfigError, DataError, RunError
from medvl.runs import CONFIG_FILE, STAGE_FILE, read_stage_info

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
LOG_DIR = "logs"
LOOP_STATE_FILE = "loop_state.json"
BEST_WEIGHTS_FILE = "model.pt"

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = frozenset(
    {"train.num_workers", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints"}
)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (the ``train:`` section of a stage config)."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 200  # 0: no checkpoints (the run cannot be resumed)
    keep_checkpoints: int = 1
    eval_every: int = 200  # 0: validate only at the end
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    select_metric: str = "val_loss"  # a key returned by Stage.validate
    select_mode: Literal["min", "max"] = "min"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible value."""
        positive = ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'train.{name}' must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "num_workers", "weight_decay",
                     "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key 'train.{name}' must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"config key 'train.lr' must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key 'train.min_lr_ratio' must lie in [0, 1], got {self.min_lr_ratio}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"config key 'train.adam_betas' must be two numbers in [0, 1), got {self.adam_betas}")
        if not self.select_metric:
            raise ConfigError("config key 'train.select_metric' must name a validation metric")


@runtime_checkable
class Stage(Protocol):
    """What a stage gives the loop.

    ``training_step`` returns ``(loss, logs)``: a scalar tensor to backpropagate and floats
    to log. It may receive a DDP-wrapped model, so the whole training computation must go
    through ``model(...)``; use :func:`unwrap` for anything else. Its batch has been moved
    to the training device (tensors inside dicts, lists and tuples; strings stay as they are).
    ``validate`` runs on rank 0 on the validation split; the loop hands it the bare model in
    eval mode under ``torch.no_grad`` (and bf16 autocast when training in bf16), isolated from
    the training random streams, and it returns metrics, one of which is ``train.select_metric``.
    ``save_run`` writes the self-contained inference artifacts (weights as safetensors,
    config, tokenizer, ...) of the given (best) model into the run directory (rank 0 only).

    Optional methods the loop calls when present: ``param_groups(model) -> list[dict]`` (AdamW
    groups with ``params`` and optional ``lr`` / ``weight_decay``), ``on_step_end(model, step)``
    after each optimiser step (bare model, ``step`` counted from 1), ``log_images(model, step) ->
    dict[str, Tensor]`` at each validation ((C,H,W) or (N,C,H,W) in [0, 1]), and
    ``state_dict()`` / ``load_state_dict(state)`` for stage state outside the model (e.g. an EMA)
    that checkpoints must carry for an exact resume.
    """

    name: str
    train: TrainConfig

    def build_model(self) -> nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def collate(self, items: list[Any]) -> Any: ...

    def training_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def validate(self, model: nn.Module) -> dict[str, float]: ...

    def save_run(self, model: nn.Module, run_dir: Path) -> None: ...


@dataclass
class FitResult:
    run_dir: Path
    steps: int
    best_step: int
    best_metrics: dict[str, float]
    seconds: float
    images_per_second: float
    peak_memory_mb: float


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / FSDP / ``torch.compile`` wrappers.

    Accelerate's bf16 autocast wrapper on ``forward`` is kept, so calls through the result
    still run in the training precision.
    """
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=True)


# ----------------------------------------------------------------------------- schedule


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate before optimiser step ``step`` (counted from 0).

    Linear warmup over ``warmup_steps`` (the first step already gets ``1 / warmup_steps``), then
    a cosine from 1 down to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and kernels, none on biases, norms and scalars
    (a learnable temperature, for instance). Frozen parameters are left out."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _param_groups(stage: Stage, model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    hook = getattr(stage, "param_groups", None)
    groups = hook(model) if callable(hook) else default_param_groups(model, cfg.weight_decay)
    cleaned = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            cleaned.append({**group, "params": params})
    if not cleaned:
        raise ConfigError(f"stage '{stage.name}' has no trainable parameters")
    return cleaned


# ----------------------------------------------------------------------------- data order


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _keep(batch: Any) -> Any:
    return batch


class MicroBatches(Dataset):
    """Item ``c`` is the collated ``c``-th micro-batch of this rank over the whole run.

    Micro-batch ``c`` belongs to epoch ``c // batches_per_epoch``; its samples are rank
    ``rank``'s slice of global batch ``c % batches_per_epoch`` of that epoch's permutation
    (drawn from ``(seed, epoch)`` only). Inside DataLoader worker processes the Python, NumPy
    and torch generators are reseeded from ``(seed, rank, c)`` before loading, so random
    augmentation in a dataset depends on the batch, not on which worker loads it: a resumed
    run gets the same augmentations as an uninterrupted one. With ``num_workers=0`` the dataset
    draws from the main process's generators, which checkpoints restore.
    """

    def __init__(self, dataset: Dataset, collate: Callable[[list[Any]], Any], *, seed: int, rank: int,
                 world_size: int, batch_size: int, total: int) -> None:
        self.dataset = dataset
        self.collate = collate
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.total = total
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise DataError("the training set must be a map-style dataset (with __len__ and __getitem__)")
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = self.num_samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training set has {self.num_samples} samples, fewer than one global batch "
                f"({world_size} process(es) x train.batch_size {batch_size}); lower train.batch_size"
            )
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.total

    def position(self, c: int) -> tuple[int, int]:
        """(epoch, micro-batch offset within the epoch) of micro-batch ``c``."""
        return divmod(c, self.batches_per_epoch)

    def indices(self, c: int) -> list[int]:
        epoch, k = self.position(c)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._epoch = epoch
        start = (k * self.world_size + self.rank) * self.batch_size
        return self._perm[start:start + self.batch_size].tolist()

    def __getitem__(self, c: int) -> Any:
        idx = self.indices(c)
        if get_worker_info() is not None:
            _seed_all(((self.seed * 1_000_003 + c) * 8191 + self.rank) % 2**63)
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(idx) if callable(getitems) else [self.dataset[i] for i in idx]
        return self.collate(items)


# ----------------------------------------------------------------------------- run directory


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
    seconds: float = 0.0  # wall-clock seconds of earlier sessions

    @classmethod
    def read(cls, path: Path) -> LoopState:
        return cls(**json.loads(path.read_text()))


RunKind = Literal["new", "finished", "partial"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint ``RUN/checkpoints/step_N`` (complete ones are renamed into place)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = [(int(p.name.split("_", 1)[1]), p) for p in root.glob("step_*")
             if p.name.split("_", 1)[1].isdigit() and (p / LOOP_STATE_FILE).is_file()]
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


def _check_run_dir(out: Path, resume: bool) -> RunKind:
    kind = run_kind(out)
    if kind == "finished":
        info = read_stage_info(out)
        if resume:
            raise RunError(f"{out} holds a finished '{info.get('stage')}' run; there is nothing to resume")
        raise RunError(f"{out} already holds a finished '{info.get('stage')}' run; choose another --out "
                       "(medvl never overwrites a run)")
    if kind == "partial" and not resume:
        ckpt = latest_checkpoint(out)
        where = f"last checkpoint: step {ckpt.name.split('_')[1]}" if ckpt else "no checkpoint yet"
        raise RunError(f"{out} holds an unfinished run ({where}); pass --resume to continue it, "
                       "or choose another --out")
    return kind


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old or {}), _flatten(new or {})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- helpers


@contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Run a block (validation) without advancing the training random streams, so training is the
    same whatever ``eval_every`` is."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _log_images(writer: Any, images: dict[str, torch.Tensor], step: int) -> None:
    for tag, img in images.items():
        img = img.detach().float().cpu().clamp(0, 1)
        if img.ndim == 2:
            img = img[None]
        if img.ndim == 4:
            writer.add_images(f"images/{tag}", img, step)
        else:
            writer.add_image(f"images/{tag}", img, step)


def _as_float(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


# ----------------------------------------------------------------------------- fit


def finish_distributed_process(code: int = 0) -> None:
    """End a process that joined a torch.distributed group: destroy the group, flush, and exit with ``code``
    without the interpreter's teardown. With torch 2.14's gloo backend, that teardown aborts a rank now and then
    ("terminate called without an active exception", SIGABRT, no Python frame) after all work is saved, and
    torchrun / ``mp.spawn`` then report a finished job as failed. Returns (does nothing) in a process that never
    joined a group."""
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fit(stage: Stage, out: Path, *, resume: bool = False, config_dump: dict | None = None,
        from_runs: list[Path] | None = None, data_info: dict | None = None) -> FitResult:
    """Train ``stage`` into the run directory ``out``; see the module docstring.

    Raises :class:`RunError` if ``out`` holds a finished run, or an unfinished one without
    ``resume``; with ``resume`` it continues from the newest complete checkpoint (or starts
    afresh when there is none) and ends with the same weights as an uninterrupted run.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        InitProcessGroupKwargs,
        broadcast_object_list,
        send_to_device,
        set_seed,
    )
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from medvl.version import __version__

    started = time.perf_counter()
    cfg = stage.train
    out = Path(out)
    if config_dump is None:
        from medvl.config import to_dict

        config_dump = to_dict(stage.config) if getattr(stage, "config", None) is not None else {}
    from_abs = [str(Path(p).resolve()) for p in (from_runs or [])]
    config_dump = json.loads(json.dumps(config_dump, default=str))  # plain data (paths as strings)
    kind = _check_run_dir(out, resume)  # every rank checks before anyone writes
    saved_cfg = out / CONFIG_FILE
    if kind == "partial" and saved_cfg.is_file():
        changes = _config_changes(yaml.safe_load(saved_cfg.read_text()) or {}, config_dump)
        if changes:
            raise RunError(f"cannot resume {out}: the config differs from the run's in {', '.join(changes)}; "
                           "start a new run (or restore those values)")

    # Accelerate keeps process-wide singletons; several fits in one process (tests, the demo)
    # may differ in precision or accumulation, so start each from a clean state. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.grad_accum,
        kwargs_handlers=[
            # validation and save_run run on rank 0 while the others wait at a barrier
            InitProcessGroupKwargs(timeout=timedelta(hours=2)),
            DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters),
        ],
    )
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(f"{accelerator.distributed_type.value} launches are not supported by medvl's training "
                          "loop; launch with DDP (the default of torchrun / accelerate launch) or FSDP")
    # FSDP shards the weights: validation and save_run then need them gathered on rank 0
    sharded = accelerator.distributed_type == DistributedType.FSDP
    ckpt_root, best_root = out / CHECKPOINT_DIR, out / BEST_DIR
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    checkpoint = latest_checkpoint(out) if kind == "partial" else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        saved_cfg.write_text(yaml.safe_dump(config_dump, sort_keys=False))
        for tmp in ckpt_root.glob(".tmp_*") if ckpt_root.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted checkpoint write
    accelerator.wait_for_everyone()
    if resume and kind == "partial" and checkpoint is None and main:
        logger.warning("%s has no complete checkpoint yet; training starts from step 0", out)

    # ---- model, data, optimiser (the same on every rank; DDP also broadcasts rank 0's weights)
    set_seed(cfg.seed)
    model = stage.build_model()
    dataset = stage.train_dataset()
    micro = MicroBatches(dataset, stage.collate, seed=cfg.seed, rank=rank, world_size=world,
                         batch_size=cfg.batch_size, total=cfg.steps * cfg.grad_accum)
    optimizer = torch.optim.AdamW(_param_groups(stage, model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    # Not handed to accelerator.prepare: Accelerate would step a prepared scheduler once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                           min_lr_ratio=cfg.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if callable(getattr(stage, "state_dict", None)) and callable(getattr(stage, "load_state_dict", None)):
        accelerator.register_for_checkpointing(stage)
    set_seed(cfg.seed, device_specific=True)  # different dropout masks on each rank

    state = LoopState(world_size=world, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                      num_samples=micro.num_samples)
    if checkpoint is not None:
        saved = LoopState.read(checkpoint / LOOP_STATE_FILE)
        if saved.world_size != world:
            raise RunError(f"cannot resume {out}: it was trained on {saved.world_size} process(es), "
                           f"this launch has {world}; resume with the same number of processes")
        if saved.num_samples != micro.num_samples:
            raise RunError(f"cannot resume {out}: its training set had {saved.num_samples} samples, this one has "
                           f"{micro.num_samples}; resume with the same --data")
        accelerator.load_state(str(checkpoint))  # model, optimiser, scheduler, stage state, RNG per rank
        state = saved
        if main:
            if state.best_step >= 0 and not (best_root / f"step_{state.best_step}" / BEST_WEIGHTS_FILE).is_file():
                logger.warning("best weights of step %d are missing; model selection restarts", state.best_step)
                state.best_step, state.best_value, state.best_metrics = -1, None, {}
            for p in best_root.glob("step_*") if best_root.is_dir() else []:
                if p.name != f"step_{state.best_step}":
                    shutil.rmtree(p, ignore_errors=True)  # written after the checkpoint: not on this timeline
            tqdm.write(f"resuming {out} from {checkpoint.name} (epoch {state.epoch}, micro-batch "
                       f"{state.batch_in_epoch} of {micro.batches_per_epoch})")
    start_step = state.step

    loader = DataLoader(micro, batch_size=None, sampler=range(state.micro_batches, len(micro)),
                        num_workers=cfg.num_workers, collate_fn=_keep, pin_memory=device.type == "cuda",
                        # its own generator: creating the iterator must not draw from the global one
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)

    writer = SummaryWriter(str(out / LOG_DIR), purge_step=start_step if checkpoint is not None else None) \
        if main else None
    pbar = tqdm(total=cfg.steps, initial=start_step, disable=not main, desc=f"train {stage.name}",
                unit="step", dynamic_ncols=True)

    eval_model: nn.Module | None = None

    def full_state_dict() -> dict[str, torch.Tensor] | None:
        """Full weights as CPU tensors on rank 0 (a collective under FSDP)."""
        sd = accelerator.get_state_dict(model) if sharded else (unwrap(model).state_dict() if main else None)
        if not main or sd is None:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def model_for_eval(sd: dict[str, torch.Tensor] | None) -> nn.Module:
        nonlocal eval_model
        if not sharded:
            return unwrap(model)
        if eval_model is None:
            eval_model = stage.build_model().to(device)
        eval_model.load_state_dict(sd)
        return eval_model

    def evaluate() -> None:
        sd = full_state_dict() if sharded else None
        if main:
            net = model_for_eval(sd)
            was_training = net.training
            net.eval()
            with _isolated_rng(device), torch.no_grad(), accelerator.autocast():
                metrics = {k: _as_float(v) for k, v in stage.validate(net).items()}
                images = stage.log_images(net, state.step) if callable(getattr(stage, "log_images", None)) else {}
            net.train(was_training)
            if cfg.select_metric not in metrics:
                raise ConfigError(f"train.select_metric '{cfg.select_metric}' is not among the validation metrics "
                                  f"of stage '{stage.name}': {', '.join(sorted(metrics)) or 'none'}")
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, state.step)
            _log_images(writer, images, state.step)
            value = metrics[cfg.select_metric]
            if _is_better(value, state.best_value, cfg.select_mode):
                target = best_root / f"step_{state.step}"
                tmp = best_root / f".tmp_step_{state.step}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                torch.save(sd if sd is not None else full_state_dict(), tmp / BEST_WEIGHTS_FILE)
                (tmp / "metrics.json").write_text(json.dumps({"step": state.step, **metrics}, indent=2))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
                state.best_step, state.best_value, state.best_metrics = state.step, value, metrics
            pbar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
                       + (" (best)" if state.best_step == state.step else ""))
        state.last_eval_step = state.step
        accelerator.wait_for_everyone()

    def save_checkpoint() -> None:
        tmp = ckpt_root / f".tmp_step_{state.step}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            state.epoch, state.batch_in_epoch = micro.position(state.micro_batches)
            state.seconds = session_seconds_before + (time.perf_counter() - started)
            _write_json_atomic(tmp / LOOP_STATE_FILE, asdict(state))
            final = ckpt_root / f"step_{state.step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = sorted((int(p.name[5:]), p) for p in ckpt_root.glob("step_*") if p.name[5:].isdigit())
            for _, old in done[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            for p in best_root.glob("step_*") if best_root.is_dir() else []:
                if p.name != f"step_{state.best_step}":
                    shutil.rmtree(p, ignore_errors=True)
        accelerator.wait_for_everyone()

    session_seconds_before = state.seconds
    train_seconds, samples = 0.0, 0
    loss_sum, loss_steps = torch.zeros((), device=device), 0  # since the last log line
    model.train()
    try:
        while state.step < cfg.steps:
            tick = time.perf_counter()
            step_loss = torch.zeros((), device=device)
            step_logs: dict[str, float] = {}
            for i in range(cfg.grad_accum):
                batch = send_to_device(next(batches), device, non_blocking=True)
                sync = i == cfg.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, logs = stage.training_step(model, batch)
                    if loss.ndim != 0:
                        raise RunError(f"stage '{stage.name}': training_step must return a scalar loss, "
                                       f"got shape {tuple(loss.shape)}")
                    accelerator.backward(loss)  # divides by grad_accum
                step_loss += loss.detach().float() / cfg.grad_accum
                for k, v in logs.items():
                    step_logs[k] = step_logs.get(k, 0.0) + _as_float(v) / cfg.grad_accum
                state.micro_batches += 1
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) \
                if cfg.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if callable(getattr(stage, "on_step_end", None)):
                stage.on_step_end(unwrap(model), state.step)
            loss_sum += step_loss
            loss_steps += 1
            train_seconds += time.perf_counter() - tick
            samples += cfg.batch_size * cfg.grad_accum * world

            checkpoint_due = cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0
            if state.step % cfg.log_every == 0 or state.step == cfg.steps or checkpoint_due:
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / loss_steps
                loss_sum.zero_()
                loss_steps = 0
                if not math.isfinite(mean_loss):
                    raise RunError(f"training of stage '{stage.name}' diverged: loss is {mean_loss} at step "
                                   f"{state.step}; lower train.lr, raise train.warmup_steps or use fp32")
                if main:
                    lr = scheduler.get_last_lr()[0]
                    writer.add_scalar("train/loss", mean_loss, state.step)
                    writer.add_scalar("train/lr", lr, state.step)
                    if grad_norm is not None:
                        writer.add_scalar("train/grad_norm", _as_float(grad_norm), state.step)
                    for k, v in step_logs.items():
                        writer.add_scalar(f"train/{k}", v, state.step)
                    pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            pbar.update(1)
            if cfg.eval_every > 0 and state.step % cfg.eval_every == 0:
                evaluate()
            if checkpoint_due:
                save_checkpoint()

        if state.last_eval_step != state.step:
            evaluate()
    finally:
        pbar.close()
        if writer is not None:
            writer.close()  # also when interrupted: flush what was logged

    # ---- the best weights become the run's inference artifacts
    sd = full_state_dict() if sharded else None
    result: dict[str, Any] = {}
    if main:
        best_file = best_root / f"step_{state.best_step}" / BEST_WEIGHTS_FILE
        if sharded:
            final = stage.build_model().to(device)
            final.load_state_dict(sd)
        else:
            final = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if state.best_step >= 0 and best_file.is_file():
            final.load_state_dict(torch.load(best_file, map_location="cpu", weights_only=True))
        else:
            logger.warning("no finite '%s' in validation; saving the final weights", cfg.select_metric)
            state.best_step = state.step
        final.eval()
        with torch.no_grad():
            stage.save_run(final, out)
        shutil.rmtree(best_root, ignore_errors=True)
        seconds = session_seconds_before + (time.perf_counter() - started)
        result = {
            "stage": stage.name,
            "medvl_version": __version__,
            "from": from_abs,
            "data": data_info,
            "best_step": state.best_step,
            "best_metrics": state.best_metrics,
            "select_metric": cfg.select_metric,
            "steps": state.step,
            "seconds": round(seconds, 3),
            "images_per_second": round(samples / train_seconds, 3) if train_seconds > 0 else 0.0,
            "peak_memory_mb": round(_peak_memory_mb(device), 1),
            "world_size": world,
            "precision": cfg.precision,
            "device": device.type,
        }
        _write_json_atomic(out / STAGE_FILE, result)
    box = [result]
    if world > 1:
        broadcast_object_list(box, from_process=0)
    accelerator.wait_for_everyone()
    result = box[0]
    return FitResult(run_dir=out, steps=result["steps"], best_step=result["best_step"],
                     best_metrics=result["best_metrics"], seconds=result["seconds"],
                     images_per_second=result["images_per_second"], peak_memory_mb=result["peak_memory_mb"])

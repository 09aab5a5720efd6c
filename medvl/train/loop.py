"""The one training loop every stage shares.

A stage (AdaMatch, report head, autoencoder, diffusion) supplies its model, datasets, one
training step and a validation pass through the :class:`Stage` protocol; :func:`fit` owns
everything else: Accelerate (bf16 autocast, DDP/FSDP under ``torchrun`` / ``accelerate launch``,
:mod:`medvl.train.distributed`), gradient accumulation, AdamW with cosine schedule and warmup,
atomic full-state checkpoints and exact ``--resume`` (:mod:`medvl.train.checkpoint`, which also
describes the run directory), the data order (:mod:`medvl.train.batches`: a run on 2 processes
with batch 4 sees the same samples per optimiser step as a run on 1 process with batch 8),
validation-only model selection, TensorBoard logs (scalars; pictures of validation scans only with
``train.log_images``) and a progress bar. At the end ``Stage.save_run``
writes the inference artifacts from the best weights, then ``RUN/stage.json`` marks the run finished.

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
import random
import resource
import shutil
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import medvl.train.distributed as distributed
from medvl.config import to_dict
from medvl.errors import ConfigError, RunError
from medvl.runs import STAGE_FILE, write_json_atomic
from medvl.train.batches import MicroBatches, micro_batch_loader
from medvl.train.checkpoint import (
    BEST_DIR,
    LOG_DIR,
    LoopState,
    best_weights_file,
    check_run_dir,
    commit_checkpoint,
    has_stage_state,
    load_weights,
    open_run_dir,
    restore_checkpoint,
    save_best_weights,
    write_checkpoint_state,
)
from medvl.train.distributed import broadcast_from_main, full_state_dict, is_sharded, make_accelerator, unwrap
from medvl.train.train_config import TrainConfig  # re-exported: stages import it from here
from medvl.version import __version__

logger = logging.getLogger(__name__)
#: steps at each end of a launch whose losses ``stage.json`` keeps (``loss_curve``)
LOSS_CURVE_STEPS = 20


@runtime_checkable
class Stage(Protocol):
    """What a stage gives the loop.

    ``training_step`` returns ``(loss, logs)``: a scalar tensor to backpropagate and values
    to log, floats or detached 0-d tensors; the loop keeps tensors on the device and reads them
    only at a log line, so a step need not wait for the device. It may receive a DDP-wrapped
    model, so the whole training computation must go through ``model(...)``; use
    :func:`unwrap` for anything else. Its batch has been moved
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


def _log_value(v: Any) -> torch.Tensor | float:
    """A log value to sum over micro-batches without reading it to the host: a tensor stays where it is."""
    return v.detach().float() if isinstance(v, torch.Tensor) else float(v)


# ----------------------------------------------------------------------------- fit


class _Training:
    """The moving parts of one :func:`fit`: the prepared model, optimiser and schedule, the micro-batches,
    the loop state, logs and the progress bar; validation with model selection, checkpoints and the final
    save. The training step itself is written out in :func:`fit`."""

    def __init__(
        self, stage: Stage, accelerator: Accelerator, out: Path, checkpoint: Path | None, started: float
    ) -> None:
        cfg = self.cfg = stage.train
        self.stage, self.accelerator, self.out, self.started = stage, accelerator, out, started
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.device = device = accelerator.device
        self.sharded = is_sharded(accelerator)
        distributed.check_sharding(accelerator, stage)
        self.eval_model: nn.Module | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # the same on every rank; DDP also broadcasts rank 0's weights
        set_seed(cfg.seed)
        model = distributed.apply_speed_options(stage.build_model(), cfg.speed, device)
        self.micro = MicroBatches(
            stage.train_dataset(),
            stage.collate,
            seed=cfg.seed,
            rank=accelerator.process_index,
            world_size=self.world,
            batch_size=cfg.batch_size,
            total=cfg.steps * cfg.grad_accum,
        )
        optimizer = torch.optim.AdamW(
            _param_groups(stage, model, cfg),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
            **distributed.adamw_options(cfg.speed, device),
        )
        # Not handed to accelerator.prepare: Accelerate would step a prepared scheduler once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            partial(
                lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio
            ),
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.stage_state = stage if has_stage_state(stage) else None  # checkpointed beside the model
        set_seed(cfg.seed, device_specific=True)  # different dropout masks on each rank

        self.state = LoopState(
            world_size=self.world,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            num_samples=self.micro.num_samples,
        )
        if checkpoint is not None:
            self.state = restore_checkpoint(
                accelerator,
                checkpoint,
                out=out,
                num_samples=self.micro.num_samples,
                batches_per_epoch=self.micro.batches_per_epoch,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                stage=self.stage_state,
            )
        start_step = self.state.step
        self.batches = iter(
            micro_batch_loader(
                self.micro,
                start=self.state.micro_batches,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                seed=cfg.seed,
            )
        )
        self.writer = (
            SummaryWriter(str(out / LOG_DIR), purge_step=start_step if checkpoint is not None else None)
            if self.main
            else None
        )
        self.pbar = tqdm(
            total=cfg.steps,
            initial=start_step,
            disable=not self.main,
            desc=f"train {stage.name}",
            unit="step",
            dynamic_ncols=True,
        )
        self.seconds_before = self.state.seconds  # of earlier launches of this run
        self.stopped_by_time = False
        self.train_seconds, self.samples = 0.0, 0
        self.loss_sum, self.loss_steps = torch.zeros((), device=device), 0  # since the last log line
        # this launch's first and last LOSS_CURVE_STEPS step losses (rank 0's), kept as tensors: no host sync
        self.loss_first: list[torch.Tensor] = []
        self.loss_last: deque[torch.Tensor] = deque(maxlen=LOSS_CURVE_STEPS)

    def count_step(self, step_loss: torch.Tensor) -> None:
        self.loss_sum += step_loss
        self.loss_steps += 1
        self.samples += self.cfg.batch_size * self.cfg.grad_accum * self.world
        kept = step_loss.detach().clone()
        if len(self.loss_first) < LOSS_CURVE_STEPS:
            self.loss_first.append(kept)
        self.loss_last.append(kept)

    def out_of_time(self) -> bool:
        """Whether this launch has used ``train.max_seconds`` (rank 0's clock, the same answer on every rank)."""
        if self.cfg.max_seconds <= 0:
            return False
        over = {"stop": time.perf_counter() - self.started >= self.cfg.max_seconds}
        return bool(broadcast_from_main(over, self.world)["stop"])

    def loss_curve(self) -> dict[str, list[float]]:
        """``{"first": [...], "last": [...]}``: this launch's first and last step losses."""
        return {
            "first": [float(v) for v in self.loss_first],
            "last": [float(v) for v in self.loss_last],
        }

    def log_train(self, step_logs: dict[str, Any], grad_norm: Any) -> None:
        """The mean loss since the last log line (all ranks), learning rate, gradient norm and stage logs."""
        step = self.state.step
        mean_loss = self.accelerator.reduce(self.loss_sum, "mean").item() / self.loss_steps
        self.loss_sum.zero_()
        self.loss_steps = 0
        if not math.isfinite(mean_loss):
            raise RunError(
                f"training of stage '{self.stage.name}' diverged: loss is {mean_loss} at step "
                f"{step}; lower train.lr, raise train.warmup_steps or use fp32"
            )
        if self.main:
            lr = self.scheduler.get_last_lr()[0]
            self.writer.add_scalar("train/loss", mean_loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", _as_float(grad_norm), step)
            for k, v in step_logs.items():
                self.writer.add_scalar(f"train/{k}", _as_float(v), step)
            self.pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")

    def _model_for_eval(self, sd: dict[str, torch.Tensor] | None) -> nn.Module:
        if not self.sharded:
            return unwrap(self.model)
        if self.eval_model is None:
            self.eval_model = self.stage.build_model().to(self.device)
        self.eval_model.load_state_dict(sd)
        return self.eval_model

    def _validate(self, net: nn.Module) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        stage, step = self.stage, self.state.step
        was_training = net.training
        net.eval()
        with _isolated_rng(self.device), torch.no_grad(), self.accelerator.autocast():
            metrics = {k: _as_float(v) for k, v in stage.validate(net).items()}
            wants_images = self.cfg.log_images and callable(getattr(stage, "log_images", None))
            images = stage.log_images(net, step) if wants_images else {}
        net.train(was_training)
        if self.cfg.select_metric not in metrics:
            raise ConfigError(
                f"train.select_metric '{self.cfg.select_metric}' is not among the validation metrics "
                f"of stage '{stage.name}': {', '.join(sorted(metrics)) or 'none'}"
            )
        return metrics, images

    def evaluate(self) -> None:
        """Validate on rank 0; a better ``select_metric`` saves the weights as the best so far."""
        cfg, state = self.cfg, self.state
        sd = full_state_dict(self.accelerator, self.model) if self.sharded else None
        if self.main:
            metrics, images = self._validate(self._model_for_eval(sd))
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, state.step)
            _log_images(self.writer, images, state.step)
            value = metrics[cfg.select_metric]
            if _is_better(value, state.best_value, cfg.select_mode):
                weights = sd if sd is not None else full_state_dict(self.accelerator, self.model)
                save_best_weights(self.out, state.step, weights, metrics)
                state.best_step, state.best_value, state.best_metrics = state.step, value, metrics
            self.pbar.write(
                f"step {state.step}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
                + (" (best)" if state.best_step == state.step else "")
            )
        state.last_eval_step = state.step
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        state = self.state
        tmp = write_checkpoint_state(
            self.accelerator,
            self.out,
            state.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            stage=self.stage_state,
        )
        if self.main:
            state.epoch, state.batch_in_epoch = self.micro.position(state.micro_batches)
            state.seconds = self.seconds_before + (time.perf_counter() - self.started)
            commit_checkpoint(tmp, state, keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        self.pbar.close()
        if self.writer is not None:
            self.writer.close()  # also when interrupted: flush what was logged

    def _best_model(self, sd: dict[str, torch.Tensor] | None) -> nn.Module:
        """The bare model with the best validated weights (the final ones when no validation was finite)."""
        state = self.state
        if self.sharded:
            final = self.stage.build_model().to(self.device)
            final.load_state_dict(sd)
        else:
            final = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        best_file = best_weights_file(self.out, state.best_step)
        if state.best_step >= 0 and best_file.is_file():
            final.load_state_dict(load_weights(best_file))
        else:
            logger.warning("no finite '%s' in validation; saving the final weights", self.cfg.select_metric)
            state.best_step = state.step
        return final.eval()

    def finish(self, from_abs: list[str], data_info: dict | None) -> FitResult:
        """``Stage.save_run`` of the best weights, then ``stage.json``; the result on every rank."""
        cfg, state = self.cfg, self.state
        sd = full_state_dict(self.accelerator, self.model) if self.sharded else None
        result: dict[str, Any] = {}
        if self.main:
            final = self._best_model(sd)
            with torch.no_grad():
                self.stage.save_run(final, self.out)
            shutil.rmtree(self.out / BEST_DIR, ignore_errors=True)
            seconds = self.seconds_before + (time.perf_counter() - self.started)
            result = {
                "stage": self.stage.name,
                "medvl_version": __version__,
                "from": from_abs,
                "data": data_info,
                "best_step": state.best_step,
                "best_metrics": state.best_metrics,
                "select_metric": cfg.select_metric,
                "steps": state.step,
                "seconds": round(seconds, 3),
                "images_per_second": round(self.samples / self.train_seconds, 3)
                if self.train_seconds > 0
                else 0.0,
                "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
                "world_size": self.world,
                "precision": cfg.precision,
                "device": self.device.type,
                # this launch's first and last step losses (rank 0): a glance at whether the run learned
                "loss_curve": self.loss_curve(),
                "stopped_by_time": self.stopped_by_time,
            }
            write_json_atomic(self.out / STAGE_FILE, result)
        result = broadcast_from_main(result, self.world)
        self.accelerator.wait_for_everyone()
        return FitResult(
            run_dir=self.out,
            steps=result["steps"],
            best_step=result["best_step"],
            best_metrics=result["best_metrics"],
            seconds=result["seconds"],
            images_per_second=result["images_per_second"],
            peak_memory_mb=result["peak_memory_mb"],
        )


def fit(
    stage: Stage,
    out: Path,
    *,
    resume: bool = False,
    config_dump: dict | None = None,
    from_runs: list[Path] | None = None,
    data_info: dict | None = None,
) -> FitResult:
    """Train ``stage`` into the run directory ``out``; see the module docstring.

    Raises :class:`RunError` if ``out`` holds a finished run, or an unfinished one without
    ``resume``; with ``resume`` it continues from the newest complete checkpoint (or starts
    afresh when there is none) and ends with the same weights as an uninterrupted run.
    ``data_info`` (what the prepared dataset was) is recorded in ``stage.json``.
    """
    started = time.perf_counter()
    cfg = stage.train
    out = Path(out)
    if config_dump is None:
        config_dump = to_dict(stage.config) if getattr(stage, "config", None) is not None else {}
    config_dump = json.loads(json.dumps(config_dump, default=str))  # plain data (paths as strings)
    from_abs = [str(Path(p).resolve()) for p in (from_runs or [])]
    kind = check_run_dir(out, resume, config_dump)  # every rank checks before anyone writes
    unused = cfg.find_unused_parameters or bool(getattr(stage, "unused_parameters", False))
    accelerator = make_accelerator(
        precision=cfg.precision, grad_accum=cfg.grad_accum, find_unused_parameters=unused
    )
    stage_state = has_stage_state(stage)
    # rank 0 writes into ``out`` next: a rank that starts late would otherwise find a run begun and refuse it
    accelerator.wait_for_everyone()
    checkpoint = open_run_dir(
        accelerator, out, kind, resume=resume, config_dump=config_dump, with_stage_state=stage_state
    )
    run = _Training(stage, accelerator, out, checkpoint, started)
    model, optimizer, scheduler, state = run.model, run.optimizer, run.scheduler, run.state

    model.train()
    try:
        while state.step < cfg.steps:
            tick = time.perf_counter()
            step_loss = torch.zeros((), device=run.device)
            step_logs: dict[str, Any] = {}  # 0-d tensors stay on the device until a log line
            for i in range(cfg.grad_accum):
                batch = send_to_device(next(run.batches), run.device, non_blocking=True)
                sync = i == cfg.grad_accum - 1  # DDP reduces gradients on the last micro-batch only
                with nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss, logs = stage.training_step(model, batch)
                    if loss.ndim != 0:
                        raise RunError(
                            f"stage '{stage.name}': training_step must return a scalar loss, "
                            f"got shape {tuple(loss.shape)}"
                        )
                    accelerator.backward(loss)  # divides by grad_accum
                step_loss += loss.detach().float() / cfg.grad_accum
                for k, v in logs.items():
                    step_logs[k] = step_logs.get(k, 0.0) + _log_value(v) / cfg.grad_accum
                state.micro_batches += 1
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if cfg.max_grad_norm > 0
                else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if callable(getattr(stage, "on_step_end", None)):
                stage.on_step_end(unwrap(model), state.step)
            run.count_step(step_loss)

            checkpoint_due = cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0
            if state.step % cfg.log_every == 0 or state.step == cfg.steps or checkpoint_due:
                run.log_train(step_logs, grad_norm)
            run.pbar.update(1)
            # after the log line, which waits for the device: steps in between only queue work on a GPU
            run.train_seconds += time.perf_counter() - tick
            if cfg.eval_every > 0 and state.step % cfg.eval_every == 0:
                run.evaluate()
            if checkpoint_due:
                run.save_checkpoint()
            if state.step % cfg.log_every == 0 and state.step < cfg.steps and run.out_of_time():
                run.stopped_by_time = True
                logger.info("train.max_seconds (%g s) reached at step %d", cfg.max_seconds, state.step)
                break
        if state.last_eval_step != state.step:
            run.evaluate()
    finally:
        run.close()
    return run.finish(from_abs, data_info)

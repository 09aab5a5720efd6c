"""Processes and their group: the Accelerator of a run, wrapped models, objects and weights gathered
on rank 0, a clean exit for a process that joined a ``torch.distributed`` group, and the GPU speed
options of a run (``train.speed``).

One process runs as it is; under ``torchrun`` / ``accelerate launch`` Accelerate joins the
process group (DDP, or FSDP which shards the weights).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    extract_model_from_parallel,
    parse_flag_from_env,
)
from torch import nn

from medvl.devices import resolve_device
from medvl.errors import ConfigError

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class SpeedConfig:
    """``train.speed``: options that make training faster on a GPU without changing what is trained.

    All off by default. The CUDA-only ones (``channels_last``, ``fused_adamw``, ``cudnn_benchmark``) are ignored on
    any other device, with one log line, so a CPU run computes exactly what it computes without them. ``compile``
    works on every device (``nn.Module.compile`` in place: the state dict keeps its keys); the first steps then
    pay the compilation.
    """

    channels_last: bool = False  # CUDA: convolution weights (and so activations) in NHWC
    fused_adamw: bool = False  # CUDA: torch.optim.AdamW(fused=True), one kernel for the whole update
    # CUDA: cuDNN times its convolution algorithms for each new shape and keeps the fastest
    cudnn_benchmark: bool = False
    compile: bool = False  # torch.compile the model's forward
    compile_mode: str = "default"  # torch.compile mode (reduce-overhead: CUDA graphs)

    def validate(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"config key 'train.speed.compile_mode' must be one of {', '.join(COMPILE_MODES)}, "
                f"got {self.compile_mode!r}"
            )

    def on(self, device: torch.device) -> SpeedConfig:
        """The options that apply on ``device``: CUDA-only ones switched off elsewhere (logged)."""
        if device.type == "cuda":
            return self
        ignored = [n for n in ("channels_last", "fused_adamw", "cudnn_benchmark") if getattr(self, n)]
        if ignored:
            logger.info(
                "train.speed: %s only apply on a CUDA device; ignored on %s (training computes as without them)",
                ", ".join(ignored),
                device.type,
            )
        return SpeedConfig(compile=self.compile, compile_mode=self.compile_mode)


def apply_speed_options(model: nn.Module, speed: SpeedConfig, device: torch.device) -> nn.Module:
    """``model`` in channels-last memory format and compiled, as ``speed`` asks on ``device`` (in place).
    ``cudnn_benchmark`` switches on ``torch.backends.cudnn.benchmark`` for the whole process."""
    speed = speed.on(device)
    if speed.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile(mode=None if speed.compile_mode == "default" else speed.compile_mode)
    return model


def adamw_options(speed: SpeedConfig, device: torch.device) -> dict[str, Any]:
    """Extra keyword arguments for ``torch.optim.AdamW`` on ``device`` (``fused=True`` on CUDA when asked)."""
    return {"fused": True} if speed.fused_adamw and device.type == "cuda" else {}


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / FSDP / ``torch.compile`` wrappers.

    Accelerate's bf16 autocast wrapper on ``forward`` is kept, so calls through the result
    still run in the training precision.
    """
    return extract_model_from_parallel(model, keep_fp32_wrapper=True)


def make_accelerator(*, precision: str, grad_accum: int, find_unused_parameters: bool) -> Accelerator:
    """A fresh Accelerator for one run: bf16 autocast or fp32, gradient accumulation, DDP options.

    Accelerate keeps process-wide singletons; several fits in one process (tests, the demo) may
    differ in precision or accumulation, so each starts from a clean state. The process group
    (PartialState) is kept. DeepSpeed and Megatron-LM launches are refused.
    """
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[
            # validation and save_run run on rank 0 while the others wait at a barrier
            InitProcessGroupKwargs(timeout=timedelta(hours=2)),
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
        ],
    )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(
            f"{accelerator.distributed_type.value} launches are not supported by medvl's training "
            "loop; launch with DDP (the default of torchrun / accelerate launch) or FSDP"
        )
    return accelerator


def process_state() -> PartialState:
    """This process's place in the process group, joining it under ``torchrun`` as the run's Accelerator will (a
    stage that needs its device before :func:`make_accelerator` asks here: Accelerate keeps the first answer, and
    ``PartialState()`` without the ``ACCELERATE_USE_CPU`` flag leaves CPU processes out of the group)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def stage_device() -> torch.device:
    """The device a stage puts its own models on: this process's under ``torchrun`` / ``accelerate launch``
    (``LOCAL_RANK``; the CPU under ``accelerate launch --cpu`` even where a GPU is present), else the first GPU,
    else the CPU."""
    try:
        return process_state().device
    except Exception:  # accelerate not initialisable here: plain single-process device choice
        return resolve_device(None)


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP shards the weights: validation and saving then need them gathered on rank 0."""
    return accelerator.distributed_type == DistributedType.FSDP


def check_sharding(accelerator: Accelerator, stage: Any) -> None:
    """Refuse an FSDP launch for a stage whose ``shardable`` is false (the diffusion stage: its EMA copy is
    updated from the full weights at every step, which FSDP would hand it as shards)."""
    if is_sharded(accelerator) and not getattr(stage, "shardable", True):
        raise ConfigError(
            f"the {stage.name} stage cannot train under FSDP (its EMA copy is updated from the full weights every "
            "step); launch it with DDP (torchrun's and accelerate launch's default), which holds the whole model on "
            "each GPU"
        )


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full weights as CPU tensors on rank 0, None elsewhere (a collective under FSDP)."""
    main = accelerator.is_main_process
    if is_sharded(accelerator):
        sd = accelerator.get_state_dict(model)
    else:
        sd = unwrap(model).state_dict() if main else None
    if not main or sd is None:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def broadcast_from_main(obj: Any, world_size: int) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    box = [obj]
    if world_size > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def finish_distributed_process(code: int = 0) -> None:
    """End a process that joined a torch.distributed group: destroy the group, flush, and exit with ``code``
    without the interpreter's teardown. With torch 2.14's gloo backend, that teardown aborts a rank now and then
    ("terminate called without an active exception", SIGABRT, no Python frame) after all work is saved, and
    torchrun / ``mp.spawn`` then report a finished job as failed. Returns (does nothing) in a process that never
    joined a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

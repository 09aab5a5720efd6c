"""``train.speed``: the GPU speed options are parsed and validated, the CUDA-only ones are ignored on the CPU with a
log line (the run computes exactly what it computes without them), and compiling keeps the state dict's keys."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from medvl.config import from_dict
from medvl.errors import ConfigError
from medvl.train.checkpoint import CHECKPOINT_DIR, config_changes
from medvl.train.distributed import SpeedConfig, adamw_options, apply_speed_options
from medvl.train.loop import TrainConfig, fit
from tests.train.test_loop import checkpoint_tensors, make_config
from tests.train.toy_stage import ToyStage


def test_speed_options_parse_and_validate():
    cfg = from_dict(
        TrainConfig, {"speed": {"channels_last": True, "fused_adamw": True, "compile": True}}, "train."
    )
    assert cfg.speed == SpeedConfig(channels_last=True, fused_adamw=True, compile=True)
    cfg.validate()
    assert TrainConfig().speed == SpeedConfig()  # all off by default
    with pytest.raises(ConfigError, match="train.speed.compile_mode"):
        TrainConfig(speed=SpeedConfig(compile_mode="fastest")).validate()
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, {"speed": {"flash": True}}, "train.")
    # a run resumes with other speed options (they change how fast, not what is trained)
    old = {"train": {"lr": 0.1}}
    new = {"train": {"lr": 0.1, "speed": {"channels_last": True, "fused_adamw": True, "compile": True}}}
    assert config_changes(old, new) == []


def test_cuda_only_options_are_ignored_on_the_cpu_with_a_log_line(caplog):
    conv = nn.Conv2d(3, 4, 3)
    speed = SpeedConfig(channels_last=True, fused_adamw=True, cudnn_benchmark=True)
    benchmark = torch.backends.cudnn.benchmark
    with caplog.at_level(logging.INFO, logger="medvl.train.distributed"):
        out = apply_speed_options(conv, speed, torch.device("cpu"))
    assert out is conv and conv.weight.is_contiguous()  # not channels-last
    assert torch.backends.cudnn.benchmark == benchmark  # untouched on the CPU
    assert (
        "channels_last, fused_adamw, cudnn_benchmark only apply on a CUDA device; ignored on cpu"
        in caplog.text
    )
    assert adamw_options(speed, torch.device("cpu")) == {}
    assert adamw_options(speed, torch.device("cuda")) == {"fused": True}
    assert adamw_options(SpeedConfig(), torch.device("cuda")) == {}
    # on CUDA the option is applied (the memory format changes without a GPU too)
    assert speed.on(torch.device("cuda")) is speed
    try:
        apply_speed_options(conv, SpeedConfig(channels_last=True, cudnn_benchmark=True), torch.device("cuda"))
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = benchmark
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_keeps_the_state_dict_keys():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    keys = list(net.state_dict())
    out = apply_speed_options(
        net, SpeedConfig(compile=True, compile_mode="reduce-overhead"), torch.device("cpu")
    )
    assert out is net and list(net.state_dict()) == keys
    assert net._compiled_call_impl is not None  # nn.Module.compile in place


def test_cpu_training_with_cuda_only_options_is_bitwise_unchanged(tmp_path):
    plain = make_config(checkpoint_every=6, eval_every=0)
    fast = make_config(checkpoint_every=6, eval_every=0)
    fast.train.speed = SpeedConfig(channels_last=True, fused_adamw=True)
    fit(ToyStage(plain), tmp_path / "plain")
    fit(ToyStage(fast), tmp_path / "fast")
    a, b = checkpoint_tensors(tmp_path / "plain", 6), checkpoint_tensors(tmp_path / "fast", 6)
    assert (tmp_path / "fast" / CHECKPOINT_DIR).is_dir() and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp_is_refused_for_the_diffusion_stage():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from medvl.train.distributed import check_sharding
    from medvl.train.stages.diffusion import DiffusionStage

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(ConfigError, match="diffusion stage cannot train under FSDP.*launch it with DDP"):
        check_sharding(fsdp, DiffusionStage.__new__(DiffusionStage))
    check_sharding(ddp, DiffusionStage.__new__(DiffusionStage))  # DDP is fine
    check_sharding(fsdp, ToyStage(make_config()))  # a stage without the flag may be sharded

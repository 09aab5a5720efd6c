"""Which device a command's models run on: ``--device`` of ``medvl generate-report`` and ``medvl evaluate``."""

from __future__ import annotations

import torch

from medvl.errors import ConfigError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A device this machine has (None: CUDA when available, else the CPU); a :class:`ConfigError` naming the
    problem otherwise (not a device name, CUDA without CUDA, an index past the last GPU)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device (use cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device

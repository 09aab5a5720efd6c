"""A dispatch mode that records the operators which make the host wait for a tensor's value.

On a GPU such a read synchronises with the device, and inside a CUDA graph capture it fails: code meant to be
replayed from a graph must have none, which the tests check on the CPU with this mode.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    NAMES = {"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "masked_select", "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.NAMES or func is torch.ops.aten.repeat_interleave.Tensor:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

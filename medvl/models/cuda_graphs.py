"""CUDA graph primitives shared by decoding (:mod:`medvl.models.decoding_graphs`) and sampling
(:mod:`medvl.models.diffusion.graphs`): a captured call, the side stream its warm-up runs on, and autocast as the
caller set it but without the weight cache (a cast cached outside a capture would be freed after it).

Code around them takes the capture and the warm-up context as arguments, so the tests can put a stand-in graph
(one that reruns the call on the CPU) in their place and check the bookkeeping where there is no GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class CudaGraph:
    """``fn()`` captured once (not run): :meth:`replay` runs its kernels again, writing :attr:`output`."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn()

    def replay(self) -> None:
        self.graph.replay()


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Work on a side stream that starts after, and is waited for by, the current one (warm-up before a capture:
    kernels chosen, workspaces and lazy buffers made)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


def autocast_as_set(device_type: str) -> torch.autocast:
    """Autocast in the caller's state (on or off, its dtype) without the weight cache."""
    dtype, on = torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)
    return torch.autocast(device_type, dtype, enabled=on, cache_enabled=False)

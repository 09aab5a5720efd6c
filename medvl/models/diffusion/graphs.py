"""The denoiser replayed from CUDA graphs while sampling: one launch per network pass.

A sampler calls the denoiser with the same shapes at every step. At small batches a GPU then waits on Python,
which launches the UNet's kernels one by one; a CUDA graph captured once replays them all with one launch.
:class:`GraphedCall` keeps one graph per call signature (argument shapes, dtypes, which are ``None``, the autocast
state and the weights' addresses), captured at its first call after a warm-up on a side stream; a call copies its
tensors into the graph's inputs, replays it and returns a copy of its output. A replay runs the captured kernels
on the weights' current values, so weights changed in place (an optimiser or EMA step, ``load_state_dict``) are
seen; moved weights (``.to()``) have new addresses and get a new graph.

The denoiser's forward reads no tensor value on the host (``tests/models/test_diffusion_graphs.py`` checks it on
the CPU), which a capture requires. Off by default (``CUDA_GRAPHS``) until ``benchmarks/gpu_suite.py``'s
``graphed`` sampling rows show it faster with the same latents.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medvl.models.cuda_graphs import CudaGraph, autocast_as_set, side_stream

# whether sample_latents replays the denoiser from CUDA graphs on a CUDA device
CUDA_GRAPHS = {"sample": False}


class GraphedCall:
    """``module(*tensors)`` (tensors or ``None``) -> tensor, replayed from one captured graph per call signature.

    Holds the module weakly (the graphs go with it). ``capture`` makes a graph (default :class:`CudaGraph`; the
    tests pass one that reruns the call on the CPU, to check what this class does around it).
    """

    def __init__(
        self, module: nn.Module, capture: Callable[[Callable[..., torch.Tensor], list], Any] | None = None
    ):
        self.module = weakref.ref(module)
        self.capture = capture or _cuda_capture
        self.graphs: dict[tuple, tuple[list, Any]] = {}

    def _signature(self, module: nn.Module, args: tuple, device: str) -> tuple:
        autocast = torch.is_autocast_enabled(device)
        shapes = tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)
        weights = tuple(p.data_ptr() for p in module.parameters())
        return shapes, autocast, torch.get_autocast_dtype(device) if autocast else None, weights

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        module = self.module()
        if module is None:
            raise RuntimeError("the graphed module no longer exists")
        device = next(a for a in args if a is not None).device.type
        key = self._signature(module, args, device)
        if key not in self.graphs:
            inputs = [None if a is None else a.clone() for a in args]
            with autocast_as_set(device):
                self.graphs[key] = (inputs, self.capture(module, inputs))
        inputs, graph = self.graphs[key]
        for buffer, a in zip(inputs, args, strict=True):
            if a is not None:
                buffer.copy_(a)
        graph.replay()
        return graph.output.clone()


def _cuda_capture(fn: Callable[..., torch.Tensor], inputs: list) -> CudaGraph:
    """``fn(*inputs)`` run twice on a side stream, then captured."""
    device = next(t for t in inputs if t is not None).device
    with side_stream(device):
        for _ in range(2):
            fn(*inputs)
    return CudaGraph(lambda: fn(*inputs))


_GRAPHED: weakref.WeakKeyDictionary[nn.Module, GraphedCall] = weakref.WeakKeyDictionary()


def graphed(module: nn.Module) -> GraphedCall:
    """The module's :class:`GraphedCall`, kept while the module lives (its graphs serve every batch of the same
    shapes)."""
    call = _GRAPHED.get(module)
    if call is None:
        call = _GRAPHED[module] = GraphedCall(module)
    return call

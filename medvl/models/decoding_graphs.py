"""Decoding steps replayed as CUDA graphs: one launch per step instead of a hundred small kernels from Python.

:class:`~medvl.models.decoding.DecoderSteps` with ``static=True`` has what a graph needs: fixed shapes (attention
over the whole capacity, the unwritten positions masked), its position in a device tensor, and no tensor value
read by the host (``tests/models/test_decoding.py`` checks these on the CPU, and the replay's bookkeeping with a
stand-in graph). The capture itself runs on CUDA only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from medvl.models.cuda_graphs import CudaGraph, autocast_as_set, side_stream

if TYPE_CHECKING:
    from medvl.models.decoding import DecoderSteps


class GraphedSteps:
    """:class:`DecoderSteps` with fixed shapes (``static=True``) replayed as CUDA graphs: one launch per step.

    Two graphs alternate, since a step copies the cache rows of the beams that go on from one buffer into the other.
    They are captured after two steps run as warm-up on a side stream (the cache is allocated then, and the
    memory's keys and values projected), both at position 0, which the first step overwrites; the position then
    goes back to 0. Autocast is captured as the caller set it, without its weight
    cache. ``capture`` (a call -> a graph with ``replay()`` and ``output``) and ``warm_up`` (a context) default to
    CUDA's; the tests pass stand-ins that run on the CPU.
    """

    def __init__(
        self,
        steps: DecoderSteps,
        capture: Callable[[Callable[[], torch.Tensor]], Any] | None = None,
        warm_up: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        if not steps.static:
            raise ValueError("CUDA graphs replay fixed-shape steps (DecoderSteps(static=True))")
        if capture is None:
            if steps.device.type != "cuda":
                raise ValueError("CUDA graphs replay fixed-shape steps on a CUDA device")
            capture, warm_up = CudaGraph, (lambda: side_stream(steps.device))
        self.steps, self.device = steps, steps.device
        self.ids = torch.zeros(steps.shape[0], 1, dtype=torch.long, device=self.device)
        with autocast_as_set(self.device.type), (warm_up or contextlib.nullcontext)():
            for _ in range(2):  # both buffers in turn, at position 0 (a capacity of one step is enough)
                steps.step(self.ids)
                steps.t.zero_()
        with autocast_as_set(self.device.type):
            self.graphs = [capture(lambda: steps.step(self.ids)) for _ in range(2)]
        steps.t.zero_()  # (the rows are in order: every warm-up step left them so, and a capture runs nothing)
        self.length = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (R, 1) -> next-token logits (R, V), a copy (the next replay writes the graph's output again)."""
        self.ids.copy_(ids)
        graph = self.graphs[self.length % 2]
        graph.replay()
        self.length += 1
        return graph.output.clone()

    def reorder(self, rows: torch.Tensor) -> None:
        self.steps.rows.copy_(rows)

"""Decoding steps replayed as CUDA graphs: one launch per step instead of a hundred small kernels from Python.

:class:`~medvl.models.decoding.DecoderSteps` with ``static=True`` has what a graph needs: fixed shapes (attention
over the whole capacity, the unwritten positions masked), its position in a device tensor, and no tensor value
read by the host (``tests/models/test_decoding.py`` checks these on the CPU). The capture itself runs on CUDA only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from medvl.models.decoding import DecoderSteps


class GraphedSteps:
    """:class:`DecoderSteps` with fixed shapes (``static=True``) replayed as CUDA graphs: one launch per step.

    Two graphs alternate, since a step copies the cache rows of the beams that go on from one buffer into the other.
    They are captured after two steps run as warm-up on a side stream (the cache is allocated then, and the
    memory's keys and values projected), both at position 0, which the first step overwrites. Autocast is
    captured as the caller set it, without its weight cache (a cached cast would be made outside the graph and
    freed after it).
    """

    def __init__(self, steps: DecoderSteps):
        if not steps.static or steps.device.type != "cuda":
            raise ValueError(
                "CUDA graphs replay fixed-shape steps on a CUDA device (DecoderSteps(static=True))"
            )
        self.steps, self.device = steps, steps.device
        rows = steps.shape[0]
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        dtype, on = torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda")

        def cast():
            return torch.autocast("cuda", dtype, enabled=on, cache_enabled=False)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with cast(), torch.cuda.stream(side):
            for _ in range(2):  # both buffers in turn, at position 0 (a capacity of one step is enough)
                steps.step(self.ids)
                steps.t.zero_()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graphs, self.logits = [], []
        with cast():
            for _ in range(2):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.logits.append(steps.step(self.ids))
                self.graphs.append(graph)
        steps.t.zero_()
        steps.rows.copy_(steps.identity)
        steps.length = 0
        self.length = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graphs[self.length % 2].replay()
        self.length += 1
        return self.logits[(self.length - 1) % 2].clone()

    def reorder(self, rows: torch.Tensor) -> None:
        self.steps.rows.copy_(rows)

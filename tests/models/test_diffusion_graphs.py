"""Sampling with the denoiser replayed from CUDA graphs (``medvl.models.diffusion.graphs``), checked on the CPU:
the denoiser's forward reads no tensor value on the host (a capture would fail), and :class:`GraphedCall` copies
each call's tensors into its graph's inputs, keeps one graph per call signature and hands back outputs that the
next replay does not overwrite. The capture itself runs on CUDA only (``benchmarks/gpu_suite.py``'s graphed
sampling rows); here a stand-in graph reruns the call on its inputs at every replay."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from medvl.models.diffusion import graphs as dg
from medvl.models.diffusion import guided_velocity
from tests.models.host_reads import HostReads

pytestmark = pytest.mark.usefixtures("single_thread")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def tiny():
    sys.path.insert(0, str(BENCHMARKS))
    import unet_scale_speed

    torch.manual_seed(0)
    cfg, model, word_dim, keypatch_dim = unet_scale_speed.build("tiny", torch.device("cpu"), 3, "tiny")
    den = model.ema.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the UNet's last layers start at zero: weights that give outputs to compare
        for p in den.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    feats = unet_scale_speed.features(cfg, 3, word_dim, keypatch_dim, torch.device("cpu"), seed=1)
    with torch.no_grad():
        context = den.conditioner(
            *(
                feats[k]
                for k in ("words", "word_mask", "word_kind", "keypatches", "keypatch_boxes", "keypatch_mask")
            )
        )
        null = den.conditioner.null_context(3)
    return den, context, null


class Rerun:
    """A stand-in graph for the CPU: made on static inputs, a replay reruns the call on what they hold now."""

    made = 0

    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs
        self.output = fn(*inputs)
        Rerun.made += 1

    def replay(self):
        self.output.copy_(self.fn(*self.inputs))


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sides", ["none", "halves", "zones"])
def test_the_denoiser_reads_nothing_on_the_host(tiny, sides):
    den, context, null = tiny
    hint = {"none": None, "halves": torch.rand(3, 2), "zones": torch.rand(3, 2, 4, 4)}[sides]
    t = torch.tensor([999, 500, 3])
    with torch.no_grad(), HostReads() as mode:
        v = guided_velocity(den, latents(3, 0), t, context, null, 2.0, sides=hint)
    assert mode.seen == [] and torch.isfinite(v).all()
    # the check sees a host read where there is one
    with torch.no_grad(), HostReads() as mode:
        bool(t.sum() > 0)
    assert mode.seen


def test_graphed_call_replays_one_graph_per_signature(tiny, monkeypatch):
    den, context, null = tiny
    call = dg.GraphedCall(den, capture=Rerun)
    Rerun.made = 0
    with torch.no_grad():
        first = None
        for step, t in enumerate((999, 600, 200, 5)):  # a sampler's steps: new values, the same shapes
            x, tt = latents(3, step), torch.full((3,), t)
            ours = guided_velocity(call, x, tt, context, null, 2.0)
            assert torch.equal(ours, guided_velocity(den, x, tt, context, null, 2.0))
            first = ours if first is None else first
        assert Rerun.made == 1
        # outputs are copies: a later replay leaves an earlier one alone (guidance 1: the pass's output itself)
        one = guided_velocity(call, latents(3, 5), torch.full((3,), 700), context, null, 1.0)
        kept = one.clone()
        guided_velocity(call, latents(3, 6), torch.full((3,), 100), context, null, 1.0)
        assert torch.equal(one, kept) and not torch.equal(first, ours)
        # another batch, a side hint, autocast: each its own graph; a known signature captures nothing new
        guided_velocity(call, latents(2, 9), torch.full((2,), 50), context[:2], null[:2], 2.0)
        sides = torch.rand(3, 2)
        x, tt = latents(3, 7), torch.full((3,), 300)
        assert torch.equal(
            guided_velocity(call, x, tt, context, null, 2.0, sides=sides),
            guided_velocity(den, x, tt, context, null, 2.0, sides=sides),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            guided_velocity(call, x, tt, context, null, 2.0)
        assert Rerun.made == 5
        guided_velocity(call, latents(2, 3), torch.full((2,), 80), context[:2], null[:2], 2.0)
        assert Rerun.made == 5
        # weights moved to new memory: the old graph's addresses are stale, a new one is captured
        p = next(den.parameters())
        monkeypatch.setattr(p, "data", p.data.clone())
        guided_velocity(call, x, tt, context, null, 2.0)
        assert Rerun.made == 6


def test_a_denoisers_graphs_live_and_go_with_it():
    net = torch.nn.Linear(4, 4)
    call = dg.graphed(net)
    assert dg.graphed(net) is call and dg._GRAPHED.get(net) is call
    del net
    gc.collect()
    assert len(dg._GRAPHED) == 0
    with pytest.raises(RuntimeError, match="no longer exists"):
        call(torch.randn(2, 4))

"""bf16 training and synthesis under CUDA's autocast rules, on the CPU (:mod:`tests.cuda_autocast`).

CUDA's autocast runs softmax, norms, sums and losses in float32 where the CPU's keeps them in bf16, so dtype
mismatches that only a GPU run meets (a bf16 row scattered with float32 weights, float32's lowest value filled
into bf16 scores) are found here: every stage trains a few bf16 steps and validates under those rules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medvl.models.adamatch.losses import token_scores
from medvl.models.memory import MemoryConfig, SharedMemory
from tests.conftest import one_thread
from tests.cuda_autocast import cuda_autocast


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_the_rules_give_cuda_dtypes():
    x = torch.randn(4, 8)
    with bf16():
        assert F.softmax(x @ x.T, -1).dtype == torch.bfloat16  # the CPU's own rule
    with cuda_autocast(), bf16():
        s = x @ x.T
        assert s.dtype == torch.bfloat16 and F.softmax(s, -1).dtype == torch.float32
        assert F.layer_norm(s, (4,)).dtype == torch.float32 and s.sum().dtype == torch.float32
        with pytest.raises(RuntimeError):  # no promotion rule for index_copy on CUDA
            torch.zeros(4, 4, dtype=torch.bfloat16).index_copy_(0, torch.arange(4), torch.randn(4, 4))
    with cuda_autocast():  # outside autocast nothing changes
        assert F.softmax(x.bfloat16(), -1).dtype == torch.bfloat16


def test_shared_memory_answers_under_cuda_autocast():
    torch.manual_seed(0)
    memory = SharedMemory(MemoryConfig(num_slots=64, dim=32, num_heads=4, topk=8, dropout=0.0))
    x = torch.randn(2, 5, 32)
    with cuda_autocast(), bf16():
        out, attn, idx = memory.respond(x, return_scores=True)
        out.float().sum().backward()
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all() and attn.dtype == torch.float32
    assert memory.memory.grad is not None and torch.isfinite(memory.memory.grad).all()
    with torch.no_grad():  # the same answer as in float32, to bf16's precision
        ref = memory.respond(x)
    assert torch.allclose(out.float(), ref, atol=0.05)


def test_token_scores_under_cuda_autocast():
    torch.manual_seed(0)
    img, txt = torch.randn(3, 6, 16), torch.randn(4, 5, 16)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 2:] = False
    with cuda_autocast(), bf16():  # normalised in float32 (CUDA), multiplied in bf16
        s_i2t, s_t2i = token_scores(F.normalize(img, dim=-1), F.normalize(txt, dim=-1).bfloat16(), mask, mask)
    ref_i2t, ref_t2i = token_scores(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), mask, mask)
    assert torch.allclose(s_i2t.float(), ref_i2t, atol=0.02) and torch.allclose(
        s_t2i.float(), ref_t2i, atol=0.02
    )


def test_every_stage_trains_and_synthesises_in_bf16_under_cuda_autocast(tmp_path):
    """AdaMatch, the report head, the autoencoder, the diffusion head and its distilled student: a few bf16 steps
    each with validation (the loop's autocast, as on a GPU), then a scan synthesised in bf16 by the teacher's
    sampler and by the student's."""
    from medvl import registry
    from medvl.data.phantom import prepare_phantom
    from medvl.runs import read_stage_info
    from medvl.train.stages import run_stage

    data, runs = tmp_path / "data", tmp_path / "runs"
    prepare_phantom(data, studies=40, size=64, seed=0)
    overrides = ["train.precision=bf16", "train.steps=3", "train.eval_every=0", "train.checkpoint_every=0"]
    with one_thread(), cuda_autocast():
        for stage in ("adamatch", "report", "autoencoder", "diffusion", "distill"):
            sources = [runs / src for src in registry.stage(stage).sources if (runs / src).is_dir()]
            run_stage(
                stage, config="tiny", data=data, out=runs / stage, from_runs=sources, overrides=overrides
            )
            info = read_stage_info(runs / stage)
            losses = info["loss_curve"]["first"] + info["loss_curve"]["last"]
            assert info["steps"] == 3 and all(math.isfinite(v) for v in losses), stage
        from medvl.inference.synthesize import Synthesizer

        images = [
            Synthesizer.load(runs / run).synthesize(
                ["Small left pleural effusion."], seed=0, precision="bf16"
            )
            for run in ("diffusion", "distill")
        ]
    for image in images:
        assert image.shape[0] == 1 and image.shape[-1] == image.shape[-2] and torch.isfinite(image).all()

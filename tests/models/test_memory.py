from __future__ import annotations

import math

import torch

from medvl.models.memory import MemoryConfig, SharedMemory


def slow_reference(mem: SharedMemory, x: torch.Tensor) -> torch.Tensor:
    """Loop over batch, head and query: the R2GenCMN computation written plainly."""
    cfg = mem.cfg
    b, length, d = x.shape
    h, dh = cfg.num_heads, d // cfg.num_heads
    q = mem.q_proj(x)
    keys = mem.k_proj(mem.memory)
    vals = mem.v_proj(mem.memory)
    out = torch.zeros(b, length, d)
    for i in range(b):
        for j in range(length):
            for head in range(h):
                sl = slice(head * dh, (head + 1) * dh)
                s = keys[:, sl] @ q[i, j, sl] / math.sqrt(dh)
                top, idx = s.topk(cfg.topk)
                w = torch.softmax(top, 0)
                out[i, j, sl] = (w[:, None] * vals[idx, sl]).sum(0)
    return mem.out_proj(out)


def test_memory_matches_slow_reference_and_shapes():
    torch.manual_seed(0)
    mem = SharedMemory(MemoryConfig(num_slots=40, dim=16, num_heads=4, topk=5, dropout=0.0)).eval()
    x = torch.randn(3, 7, 16)
    fast, attn, idx = mem.respond(x, return_scores=True)
    assert fast.shape == (3, 7, 16) and attn.shape == (3, 4, 7, 5) and idx.shape == (3, 4, 7, 5)
    torch.testing.assert_close(fast, slow_reference(mem, x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mem(x), x + fast)
    # each head keeps exactly k slots per query and the weights are a distribution over them
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 7))


def test_frozen_memory_answers_on_the_meta_device():
    # shapes only (sizing a model without allocating it): the cache's key has no autocast state to read there
    with torch.device("meta"), torch.no_grad():
        mem = SharedMemory(MemoryConfig(num_slots=16, dim=8, num_heads=2, topk=4)).eval()
        out = mem(torch.randn(2, 3, 8))
    assert out.shape == (2, 3, 8) and out.is_meta


def test_topk_equal_to_slots_is_full_attention():
    torch.manual_seed(1)
    mem = SharedMemory(MemoryConfig(num_slots=12, dim=8, num_heads=2, topk=12, dropout=0.0)).eval()
    x = torch.randn(2, 3, 8)
    q = mem.q_proj(x).view(2, 3, 2, 4).transpose(1, 2)
    k = mem.k_proj(mem.memory).view(12, 2, 4).transpose(0, 1)
    v = mem.v_proj(mem.memory).view(12, 2, 4).transpose(0, 1)
    full = torch.softmax(torch.einsum("bhld,hsd->bhls", q, k) / 2.0, -1) @ v
    ref = mem.out_proj(full.transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(mem.respond(x), ref, atol=1e-5, rtol=1e-4)


def test_memory_gradients_and_roundtrip(tmp_path):
    mem = SharedMemory(MemoryConfig(num_slots=20, dim=8, num_heads=2, topk=4, dropout=0.0))
    x = torch.randn(2, 5, 8)
    mem(x).pow(2).sum().backward()
    assert mem.memory.grad is not None and mem.memory.grad.abs().sum() > 0
    assert mem.save_pretrained(tmp_path) == tmp_path
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    again = SharedMemory.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again.respond(x), mem.eval().respond(x))


def test_memory_backward_runs_under_deterministic_algorithms_and_repeats_exactly():
    """Training must be reproducible on several CPU threads: the backward may not use accumulating index_put
    (unordered atomic adds), which deterministic mode refuses or reroutes; gradients repeat bit for bit."""
    torch.manual_seed(2)
    mem = SharedMemory(MemoryConfig(num_slots=64, dim=32, num_heads=4, topk=8, dropout=0.0))
    x = torch.randn(16, 30, 32)
    grads = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for deterministic in (False, False, True):
            torch.use_deterministic_algorithms(deterministic)
            mem.zero_grad()
            mem(x).pow(2).sum().backward()
            grads.append(mem.memory.grad.clone())
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0], grads[2])


def test_compiled_callers_do_not_recompile_on_the_key_value_cache():
    """A frozen memory queried inside a compiled function, in training (gradients on) and in validation (no_grad)
    by turns: two compilations (one per grad mode), not one more each time the Python-side cache of the memory's
    keys and values is filled or dropped. Outside compilation the cache still serves a frozen model."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    memory = (
        SharedMemory(MemoryConfig(num_slots=16, dim=32, num_heads=4, topk=4)).eval().requires_grad_(False)
    )
    x = torch.randn(2, 5, 32, requires_grad=True)
    counter = CompileCounter()
    query = torch.compile(lambda t: memory(t), backend=counter)
    eager = memory(x.detach())
    for _ in range(3):  # a training step, then validation batches
        torch.testing.assert_close(query(x), eager)
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(query(x), eager)
    assert counter.frame_count == 2
    with torch.no_grad():
        memory(x)
    assert memory._kv_cache is not None  # eager, frozen, no gradient: the projection is cached
    torch._dynamo.reset()

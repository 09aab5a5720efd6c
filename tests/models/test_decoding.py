"""Decoding a frozen report head: medvl's own beam search (``medvl.models.decoding``) gives exactly the sequences
and scores of transformers' ``generate()`` on heads with every conditioning option; the shared memory's keys and
values projected once and the beam cache that leaves the cross-attention rows in place give exactly those of the
plain computation (memory projected at every token, every cache row reordered); the static cache gives the same
sequences."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import EncoderDecoderCache

from medvl.models import decoding as dec
from medvl.models.decoding_graphs import GraphedSteps
from medvl.models.memory import MemoryConfig, SharedMemory
from medvl.models.report_head import KeywordHints, ReportHead, ReportHeadConfig
from tests.models.host_reads import HostReads

pytestmark = pytest.mark.usefixtures("single_thread")

P, D, K, VOCAB = 6, 12, 3, 60


def make_head(seed: int = 0, **options) -> ReportHead:
    torch.manual_seed(seed)
    cfg = ReportHeadConfig(
        **options,
        n_embd=32,
        n_layer=2,
        n_head=4,
        max_length=24,
        dropout=0.1,  # eval mode switches it off; train mode must not use a stale memory projection
        num_keywords=K,
        memory=MemoryConfig(num_slots=48, dim=24, num_heads=4, topk=6, dropout=0.1),
    )
    head = ReportHead(cfg, vocab_size=VOCAB, visual_dim=D, keyword_vocabulary=["a", "b", "c", "d"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the initialisation: varied sequences that depend on the image
        for p in head.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return head.eval()


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 5, (b, K), generator=g)
    hints = KeywordHints(ids, torch.randn(b, K, generator=g), torch.rand(b, K, 4, generator=g), [[]] * b)
    return torch.randn(b, P, D, generator=g), torch.rand(b, P, 4, generator=g), hints


def decode(head, feats, boxes, hints, **kw):
    return head.generate(patch_features=feats, patch_boxes=boxes, keywords=hints, **kw)


def plain_decode(head, feats, boxes, hints, monkeypatch, **kw):
    """Decoding as it was: the memory projected for every query, every cache row reordered by beam search."""
    with monkeypatch.context() as m:
        m.setattr(dec.BeamCache, "reorder_cache", EncoderDecoderCache.reorder_cache)
        m.setattr(head.memory, "cache_kv", False)
        return decode(head, feats, boxes, hints, engine="transformers", **kw)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("ngram", [0, 3])
def test_fast_decoding_gives_the_plain_sequences_and_scores(beams, ngram, monkeypatch):
    head = make_head()
    feats, boxes, hints = inputs()
    kw = dict(num_beams=beams, no_repeat_ngram_size=ngram, max_new_tokens=20)
    plain = plain_decode(head, feats, boxes, hints, monkeypatch, **kw)
    fast = decode(head, feats, boxes, hints, **kw)
    static = decode(head, feats, boxes, hints, static_cache=True, engine="transformers", **kw)
    assert plain.sequences.shape[1] > 3  # the test decodes real sequences, not a first EOS
    assert len({tuple(r) for r in plain.sequences.tolist()}) > 1  # and different ones per image
    assert torch.isfinite(plain.scores).all()  # also for a greedy report that ends before the others
    assert torch.equal(fast.sequences, plain.sequences) and torch.equal(fast.scores, plain.scores)
    # the static cache attends over a preallocated length (masked): the same tokens, scores up to rounding
    assert torch.equal(static.sequences, plain.sequences)
    torch.testing.assert_close(static.scores, plain.scores, rtol=0, atol=1e-5)
    # forced to full length (every beam step reorders the cache)
    kw["min_new_tokens"] = 20
    plain = plain_decode(head, feats, boxes, hints, monkeypatch, **kw)
    fast = decode(head, feats, boxes, hints, **kw)
    assert plain.sequences.shape[1] == 20
    assert torch.equal(fast.sequences, plain.sequences) and torch.equal(fast.scores, plain.scores)


def test_memory_projection_is_cached_only_while_frozen_and_unchanged():
    torch.manual_seed(0)
    mem = SharedMemory(MemoryConfig(num_slots=40, dim=16, num_heads=4, topk=5, dropout=0.0))
    x = torch.randn(2, 3, 16)
    mem(x).sum().backward()  # training: nothing cached
    assert mem._kv_cache is None
    mem.eval()
    with torch.no_grad():
        first = mem.respond(x)
        cached = mem._kv_cache
        assert cached is not None
        assert torch.equal(mem.respond(x), first) and mem._kv_cache is cached  # reused
    # an optimiser step changes the weights in place: the next frozen call projects again
    torch.optim.SGD(mem.parameters(), lr=0.5).step()
    with torch.no_grad():
        after_step = mem.respond(x)
        assert mem._kv_cache is not cached
        mem.cache_kv = False
        assert torch.equal(after_step, mem.respond(x))  # the same as projecting afresh
        mem.cache_kv = True
    assert not torch.equal(after_step, first)
    # load_state_dict copies into the parameters
    other = SharedMemory(MemoryConfig(num_slots=40, dim=16, num_heads=4, topk=5, dropout=0.0)).eval()
    with torch.no_grad():
        other.respond(x)
        mem2 = mem.state_dict()
        other.load_state_dict(mem2)
        assert torch.equal(other.respond(x), after_step)
    # inference mode reuses and builds the cache too; train() drops it; a recorded gradient never uses it
    with torch.inference_mode():
        assert torch.equal(mem.respond(x), after_step)
    mem.train()
    assert mem._kv_cache is None
    mem.eval()
    y = mem.respond(x)
    assert y.requires_grad and mem._kv_cache is None
    assert "_kv_cache" not in str(mem.state_dict().keys())


def test_train_mode_after_decoding_uses_the_current_weights():
    """A head decoded (cache filled), trained one step, decoded again: the second decode sees the new weights."""
    head = make_head()
    feats, boxes, hints = inputs(2)
    before = decode(head, feats, boxes, hints, num_beams=1, max_new_tokens=8, min_new_tokens=8)
    head.train()
    opt = torch.optim.SGD(head.memory.parameters(), lr=10.0)
    ids = torch.randint(4, VOCAB, (2, 6))
    out = head(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids,
        patch_features=feats,
        patch_boxes=boxes,
        keyword_ids=hints.ids,
        keyword_scores=hints.scores,
        keyword_boxes=hints.boxes,
    )
    out["loss"].backward()
    opt.step()
    head.eval()
    fresh = decode(head, feats, boxes, hints, num_beams=1, max_new_tokens=8, min_new_tokens=8)
    head.memory.cache_kv = False
    reference = decode(head, feats, boxes, hints, num_beams=1, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(fresh.sequences, reference.sequences) and torch.equal(fresh.scores, reference.scores)
    assert not torch.equal(fresh.scores, before.scores)


class BanRecentWords:
    """A caller's decoding rule (like NearRepeatBan): no token of the last two written; and one that changes
    values: EOS made likelier (so hypotheses end at different lengths)."""

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, ids[:, -2:], True)
        seen[:, :4] = False  # the special tokens stay to the other rules
        scores = scores.masked_fill(seen, float("-inf"))
        eos = scores[:, 2]
        # at most 1 below the best token; the best after a token id divisible by 4 (greedy rows end apart)
        lift = torch.where(ids[:, -1] % 4 == 0, 1.0, -1.0)
        likelier = torch.maximum(eos, scores.max(dim=-1).values + lift)
        scores[:, 2] = torch.where(torch.isfinite(eos), likelier, eos)  # not where another rule bans it
        return scores


HEADS = {
    "memory_keywords": {},
    # state tokens and the word-embedding vector
    "label_states": dict(label_loss_weight=1.0, label_states=True),
    "label_hints": dict(label_loss_weight=1.0, use_label_hints=True),
    "no_memory": dict(use_memory=False),
    "no_keywords": dict(use_keywords=False),
}
SETTINGS = [
    dict(num_beams=3, no_repeat_ngram_size=3, max_new_tokens=20),
    dict(num_beams=2, no_repeat_ngram_size=0, max_new_tokens=18, min_new_tokens=18),
    dict(num_beams=4, no_repeat_ngram_size=2, max_new_tokens=16, min_new_tokens=5, length_penalty=0.5),
    dict(num_beams=3, no_repeat_ngram_size=3, max_new_tokens=20, length_penalty=2.0, rule=True),
    dict(num_beams=1, no_repeat_ngram_size=3, max_new_tokens=20, rule=True),  # greedy: rows end apart
    # greedy, every row ends before the limit
    dict(num_beams=1, no_repeat_ngram_size=3, max_new_tokens=20, rule=True, batch=2),
    dict(num_beams=1, no_repeat_ngram_size=0, max_new_tokens=12, min_new_tokens=12),
]


# the CPU's settings, and the GPU's run on the CPU: deferred reads of the stopping condition, one copy of the
# conditioning per beam; and those with fixed-shape steps (the ones a GPU replays as CUDA graphs)
@pytest.mark.parametrize(
    "check_every, grouped, static",
    [(1, True, False), (8, False, False), (8, False, True)],
    ids=["cpu", "gpu_settings", "fixed_shape_steps"],
)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_medvl_search_gives_generates_sequences_and_scores(name, check_every, grouped, static, monkeypatch):
    monkeypatch.setitem(dec.CHECK_EVERY, "cpu", check_every)
    monkeypatch.setitem(dec.GROUPED_BEAMS, "cpu", grouped)
    monkeypatch.setitem(dec.STATIC_STEPS, "cpu", static)
    head = make_head(1, **HEADS[name])
    with torch.no_grad():  # states on for some labels and off for others
        if hasattr(head, "label_thresholds"):
            head.label_thresholds.fill_(0.5)
    ended_early = distinct = 0
    stopped = {1: 0, 2: 0}  # greedy, beam searches that stop before the limit
    for seed, setting in enumerate(SETTINGS):
        feats, boxes, hints = inputs(b=setting.get("batch", 1 + 2 * seed), seed=seed)
        hints.ids[::2, 1:] = 0  # some images with a single keyword: a masked conditioning
        kw = {k: v for k, v in setting.items() if k not in ("rule", "batch")}
        if setting.get("rule"):
            kw["logits_processor"] = [BanRecentWords()]
        if not head.cfg.use_keywords:
            hints = None
        reference = decode(head, feats, boxes, hints, engine="transformers", **kw)
        ours = decode(head, feats, boxes, hints, **kw)
        assert torch.equal(ours.sequences, reference.sequences), (name, setting)
        if (
            static
        ):  # the softmax runs over the whole capacity (masked): the same tokens, scores up to rounding
            torch.testing.assert_close(ours.scores, reference.scores, rtol=0, atol=1e-5)
        else:
            assert torch.equal(ours.scores, reference.scores), (name, setting)
        ended_early += int((reference.sequences == 0).any())
        distinct += len({tuple(r) for r in reference.sequences.tolist()}) > 1
        stopped[min(kw["num_beams"], 2)] += reference.sequences.shape[1] < kw["max_new_tokens"]
    # hypotheses that end at EOS before the limit, different sequences per image, searches that stop early
    assert ended_early and distinct and all(stopped.values())


def test_token_memo_calls_its_function_on_full_blocks_only():
    from medvl.models.decoding import TokenMemo

    shapes = []
    weight = torch.randn(50, 7)

    def fn(ids):
        shapes.append(tuple(ids.shape))
        return (weight[ids.view(-1)] @ torch.ones(7, 7)).unsqueeze(1)

    memo = TokenMemo(fn, rows=3, vocab=50)
    for ids in ([[4], [9], [4]], [[4], [9], [4]], [[1], [2], [4]], [[5], [6], [7]]):
        ids = torch.tensor(ids)
        assert torch.equal(memo(ids), fn(ids))
    assert set(shapes) == {(3, 1)}
    assert memo.calls == 3  # {4, 9}, {1, 2}, {5, 6, 7}: every word computed once


@pytest.mark.parametrize("engine", ["medvl", "transformers"])
@pytest.mark.parametrize("beams", [1, 3])
def test_an_empty_batch_decodes_to_no_reports(engine, beams):
    head = make_head()
    feats, boxes, hints = inputs(2)
    none = KeywordHints(hints.ids[:0], hints.scores[:0], hints.boxes[:0], [])
    out = decode(head, feats[:0], boxes[:0], none, num_beams=beams, max_new_tokens=5, engine=engine)
    assert out.sequences.shape == (0, 0) and out.scores.shape == (0,)


def test_unknown_decoding_engine_is_refused():
    head = make_head()
    feats, boxes, hints = inputs(1)
    with pytest.raises(ValueError, match="engine must be"):
        decode(head, feats, boxes, hints, num_beams=2, max_new_tokens=4, engine="vllm")


def test_medvl_search_under_autocast_gives_generates_sequences():
    """Validation while training in bf16 decodes under autocast: the keys and values come out in bf16."""
    head = make_head(2)
    feats, boxes, hints = inputs(3, seed=2)
    for beams in (1, 3):
        kw = dict(num_beams=beams, no_repeat_ngram_size=3, max_new_tokens=12)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = decode(head, feats, boxes, hints, engine="transformers", **kw)
            ours = decode(head, feats, boxes, hints, **kw)
        assert torch.equal(ours.sequences, reference.sequences) and torch.equal(ours.scores, reference.scores)


@pytest.mark.parametrize("beams", [1, 3])
def test_fixed_shape_steps_are_what_a_cuda_graph_replays(beams, monkeypatch):
    """What a CUDA graph needs of a step, checked on the CPU: no tensor value read by the host (it would fail the
    capture), the same two cache buffers at every step (a replay reads and writes the captured addresses), and no
    host-side count of the steps (a replay runs the Python state of its capture: here the count is reset before
    every step, and the sequences are still generate()'s)."""
    head = make_head(
        1, **HEADS["label_states"]
    )  # the memory query and the state vector in the word embedding
    feats, boxes, hints = inputs(3, seed=4)
    monkeypatch.setattr(head, "_word_embedder", None)  # on a GPU the embedding and its hooks run in the step
    kw = dict(num_beams=beams, no_repeat_ngram_size=3, max_new_tokens=14)
    reference = decode(head, feats, boxes, hints, engine="transformers", **kw)
    step, reorder = dec.DecoderSteps.step, dec.DecoderSteps.reorder
    reads, buffers, calls = [], set(), []

    def spied(method):
        def run(self, *args):
            if method is step:
                self.length = 0  # as replayed: the count the capture saw
                calls.append(1)
            with HostReads() as mode:
                out = method(self, *args)
            reads.extend(mode.seen)
            if self.cache is not None:
                buffers.update({self.cache.data_ptr(), self.spare.data_ptr()})
            return out

        return run

    monkeypatch.setattr(dec.DecoderSteps, "step", spied(step))
    monkeypatch.setattr(dec.DecoderSteps, "reorder", spied(reorder))
    monkeypatch.setitem(dec.STATIC_STEPS, "cpu", True)
    ours = decode(head, feats, boxes, hints, **kw)
    assert len(calls) > 3 and reads == [] and len(buffers) == 2
    assert torch.equal(ours.sequences, reference.sequences)
    # the check sees host reads where there are some: the dynamic steps test a beam reorder on the host
    monkeypatch.setitem(dec.STATIC_STEPS, "cpu", False)
    decode(head, feats, boxes, hints, **kw)
    assert ("equal" in reads) == (beams > 1)


class RerunStep:
    """A stand-in for a captured decoding step, on the CPU: it keeps the buffers the step was bound to when captured
    and at every replay runs the step again on them, as a graph replays its kernels on the captured addresses."""

    def __init__(self, steps: dec.DecoderSteps, fn):
        self.steps, self.fn = steps, fn
        self.bound = (steps.cache, steps.spare)
        self.output = fn()

    def replay(self):
        self.steps.cache, self.steps.spare = self.bound
        self.output.copy_(self.fn())


@pytest.mark.parametrize("name", ["memory_keywords", "label_states"])
def test_graphed_steps_replayed_give_generates_sequences(name, monkeypatch):
    """GraphedSteps' bookkeeping (warm-up, two graphs in turn, inputs copied in, position and rows reset, outputs
    copied out) with stand-in graphs: every decode of the equality test's settings gives generate()'s sequences."""
    head = make_head(1, **HEADS[name])
    real, made = dec.DecoderSteps, []

    def graphed(*args, **kw):
        steps = real(*args, **{**kw, "static": True})
        made.append(steps)
        return GraphedSteps(steps, capture=lambda fn: RerunStep(steps, fn))

    monkeypatch.setattr(dec, "DecoderSteps", graphed)
    for seed, setting in enumerate(SETTINGS):
        feats, boxes, hints = inputs(b=setting.get("batch", 1 + 2 * seed), seed=seed)
        kw = {k: v for k, v in setting.items() if k not in ("rule", "batch")}
        if setting.get("rule"):
            kw["logits_processor"] = [BanRecentWords()]
        reference = decode(head, feats, boxes, hints, engine="transformers", **kw)
        ours = decode(head, feats, boxes, hints, **kw)
        assert torch.equal(ours.sequences, reference.sequences), setting
        torch.testing.assert_close(ours.scores, reference.scores, rtol=0, atol=1e-5)
    assert len(made) == len(SETTINGS)


def test_cuda_graphs_refuse_steps_they_cannot_replay():
    head = make_head()
    cond = torch.randn(2, 5, 32)
    dynamic = dec.DecoderSteps(head.decoder, cond, torch.ones(2, 5), capacity=4)
    with pytest.raises(ValueError, match="fixed-shape steps"):
        GraphedSteps(dynamic, capture=lambda fn: None)
    steps = dec.DecoderSteps(head.decoder, cond, torch.ones(2, 5), capacity=4, static=True)
    with pytest.raises(ValueError, match="fixed-shape steps on a CUDA device"):
        GraphedSteps(steps)

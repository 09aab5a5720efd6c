"""Beam and greedy search for the report head's GPT-2 decoder, stepped directly on its weights.

``ReportHead.generate`` used to hand decoding to transformers' ``generate()``. With a small decoder (the report
head is 3 layers) most of a decoded token's time went to the framework around the arithmetic: building masks and
output objects, config look-ups, per-module hooks and the generic beam bookkeeping. Here one decoding step is the
GPT-2 block's arithmetic written out (the same tensor operations on the same shapes, so the same bits), the
beam search keeps transformers' vectorised algorithm (top ``2 * beams`` candidates per report, finished hypotheses
merged by their length-penalised score, ``early_stopping=True``) and greedy search its rules (PAD after EOS), so
the sequences and scores are those of ``generate()``; ``tests/models/test_decoding.py`` checks that on heads with every conditioning option. The word
embedding's hooks (the report head's memory query) depend on the word alone, so the caller may memoise them per
word (:class:`TokenMemo`): a report repeats its words, and the memory query was a quarter of a step.

With ``STATIC_STEPS`` a step has fixed shapes (attention over the whole capacity, masked; its position in a
device tensor), which a GPU replays as a CUDA graph (:mod:`medvl.models.decoding_graphs`).

What it does not cover goes to ``generate()`` (:func:`decode`): decoding without the KV cache, the static cache,
and a decoder whose attention is not PyTorch's scaled-dot-product attention.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel, GPT2Model, LogitsProcessorList
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from medvl.models.decoding_graphs import GraphedSteps

# Steps between the host's reads of the stopping condition (each read waits for the device to finish its queue).
CHECK_EVERY = {"cpu": 1, "gpu": 8}
# Whether a report's beams attend to its conditioning as one group of query heads (see DecoderSteps). Exact on the
# CPU (tested); on a GPU the grouped call may pick another attention kernel, so it is measured there first.
GROUPED_BEAMS = {"cpu": True, "gpu": False}
# Fixed-shape steps (:class:`DecoderSteps` with ``static=True``): every step attends over the whole capacity
# (positions not yet written are masked) and reads its position from a device tensor, so a GPU replays each step
# as one CUDA graph (``decoding_graphs.GraphedSteps``) instead of launching every kernel from Python. The scores
# may differ from the dynamic steps' in the last bits (the softmax runs over more, masked, positions); on a GPU it
# stays off until ``gpu_suite.py``'s ``graphed`` decode rows show it faster with the same sequences. On the CPU
# there is no graph to replay: the switch there serves the tests.
STATIC_STEPS = {"cpu": False, "gpu": False}
# The name ``generate()`` takes a cache under: transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old
# name is deprecated there, and the only one earlier releases know).
CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def _kind(device: torch.device) -> str:
    """The key of the switches above for ``device``: "cpu", or "gpu" for any other device."""
    return "cpu" if device.type == "cpu" else "gpu"


def _scaling(attn: nn.Module) -> float | None:
    """The scale a GPT-2 attention layer hands SDPA: its ``scaling`` (transformers 5), or SDPA's own default
    (None), which transformers 4's SDPA path of GPT-2 uses."""
    return getattr(attn, "scaling", None)


def supported(decoder: GPT2LMHeadModel) -> bool:
    """Whether :class:`DecoderSteps` reproduces ``decoder``'s own forward pass."""
    cfg = decoder.config
    return (
        cfg._attn_implementation == "sdpa"
        and not cfg.reorder_and_upcast_attn
        and cfg.add_cross_attention
        and not decoder.training
    )


class DecoderSteps:
    """One token per row per call through a GPT-2 decoder with cross-attention, with its own KV cache.

    ``cond`` (R, N, E) are the conditioning states, one row per decoded sequence (beams of a report are copies),
    and ``cond_mask`` (R, N) their mask; ``capacity`` the most steps. The cross-attention keys and values are
    projected once here; the self-attention keys and values of every layer live in one preallocated tensor that
    grows by one position per :meth:`step` and follows the beams in :meth:`reorder`. ``embed`` (ids (R, 1) ->
    (R, 1, E)) stands for the word embedding with its forward hooks; by default the embedding module is called, so
    its hooks run as in the decoder's own forward.
    """

    def __init__(
        self,
        decoder: GPT2LMHeadModel,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        capacity: int,
        embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        beams: int = 1,
        static: bool = False,
    ):
        tr = decoder.transformer
        self.embed = embed or tr.wte
        self.wpe, self.ln_f, self.lm_head = tr.wpe, tr.ln_f, decoder.lm_head
        self.blocks = list(tr.h)
        first = self.blocks[0].attn
        self.heads, self.head_dim, self.width = first.num_heads, first.head_dim, first.embed_dim
        rows, e = cond.shape[0], cond.shape[2]
        # The beams of a report attend to the same conditioning. Grouped (GROUPED_BEAMS), they attend as one group
        # of query heads per key/value head (SDPA's grouped-query attention), which reads each report's keys and
        # values once instead of once per beam and gives the per-beam results bit for bit on the CPU (tested);
        # otherwise every row keeps its own copy, as in transformers.
        grouped = GROUPED_BEAMS[_kind(cond.device)]
        self.beams = beams if grouped and beams > 1 else 1
        keep = cond_mask.bool()[:: self.beams]
        # transformers passes no mask where every position is kept, else a boolean (R, 1, 1, N) one
        self.cond_mask = None if bool(keep.all()) else keep[:, None, None, :]
        self.cross_kv = []
        for block in self.blocks:
            # projected for every row, as transformers does (a product's bits depend on its row count)
            k, v = _conv1d(block.crossattention.c_attn, cond).split(e, dim=2)
            k, v = self._heads(k)[:: self.beams], self._heads(v)[:: self.beams]
            self.cross_kv.append((k.contiguous(), v.contiguous()))
        # (R, layer, key / value, head, position, head_dim): a beam reorder copies the positions written so far
        # into the spare buffer, in one call for every layer. Both are allocated at the first step, in the dtype
        # the projections give (bf16 under autocast).
        self.shape = (rows, len(self.blocks), 2, self.heads, capacity, self.head_dim)
        self.cache: torch.Tensor | None = None
        self.spare: torch.Tensor | None = None
        self.length = 0
        self.device = cond.device
        self.static = static
        if static:  # what a replayed step reads: its position, the rows that go on, the positions' indices
            self.t = torch.zeros(1, dtype=torch.long, device=cond.device)
            self.identity = torch.arange(rows, device=cond.device)
            self.rows = self.identity.clone()
            self.positions = torch.arange(capacity, device=cond.device).view(1, 1, 1, capacity)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, mask, scale, proj, group: int = 1) -> torch.Tensor:
        if group > 1:  # (R, H, 1, d) rows -> (R / group, H * group, 1, d): a report's beams as query heads
            r, h = q.shape[:2]
            q = q.reshape(r // group, group, h, 1, -1).transpose(1, 2).reshape(r // group, h * group, 1, -1)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale, is_causal=False, enable_gqa=group > 1
        )
        if group > 1:
            a = a.reshape(r // group, h, group, 1, -1).transpose(1, 2).reshape(r, h, 1, -1)
        a = a.reshape(a.shape[0], -1, q.shape[2], v.shape[-1]).transpose(1, 2).contiguous()
        return _conv1d(proj, a.reshape(*a.shape[:-2], -1).contiguous())

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (R, 1) -> next-token logits (R, V) in float32."""
        static = self.static
        if static:  # nothing here reads the host's step count (a graph or compiled step would keep it fixed)
            self._follow_rows()
            x = self.embed(ids) + self.wpe.weight.index_select(0, self.t)
            seen = self.positions <= self.t  # (1, 1, 1, capacity): the positions written, this one included
        else:
            t = self.length
            x = self.embed(ids) + self.wpe.weight[t]
        e = self.width
        for i, block in enumerate(self.blocks):
            attn, cross, mlp = block.attn, block.crossattention, block.mlp
            q, k, v = _conv1d(attn.c_attn, _norm(block.ln_1, x)).split(e, dim=2)
            if self.cache is None:
                # zeros where steps are fixed-shape: a masked position must hold no NaN (0 x NaN is NaN)
                make = k.new_zeros if static else k.new_empty
                self.cache, self.spare = make(self.shape), make(self.shape)
            if static:
                for j, kv in enumerate((k, v)):
                    self.cache[:, i, j].index_copy_(2, self.t, self._heads(kv))
                past, mask = self.cache[:, i], seen
            else:
                self.cache[:, i, 0, :, t] = k.view(-1, self.heads, self.head_dim)
                self.cache[:, i, 1, :, t] = v.view(-1, self.heads, self.head_dim)
                # (R, key / value, head, position, head_dim): the positions written, this one included
                past, mask = self.cache[:, i, :, :, : t + 1], None
            x = self._attend(self._heads(q), past[:, 0], past[:, 1], mask, _scaling(attn), attn.c_proj) + x
            q = self._heads(_conv1d(cross.q_attn, _norm(block.ln_cross_attn, x)))
            ck, cv = self.cross_kv[i]
            x = x + self._attend(q, ck, cv, self.cond_mask, _scaling(cross), cross.c_proj, self.beams)
            x = x + _conv1d(mlp.c_proj, mlp.act(_conv1d(mlp.c_fc, _norm(block.ln_2, x))))
        if static:
            self.t.add_(1)
        else:
            self.length += 1
        logits = F.linear(_norm(self.ln_f, x), self.lm_head.weight, self.lm_head.bias)
        return logits[:, -1, :].to(copy=True, dtype=torch.float32)

    def _follow_rows(self) -> None:
        """Fixed-shape steps: the cache rows of the beams that go on (:meth:`reorder`), copied whole into the spare
        buffer, which becomes the cache (on a GPU two graphs alternate between the two buffers)."""
        if self.cache is not None:
            torch.index_select(self.cache, 0, self.rows, out=self.spare)
            self.cache, self.spare = self.spare, self.cache
        self.rows.copy_(self.identity)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the self-attention cache of ``rows`` (R,) (the beams that go on), in that order."""
        if self.static:  # taken at the next step, with the cache whole (fixed shapes)
            self.rows.copy_(rows)
            return
        if self.cache is None:
            return
        if rows.device.type == "cpu" and torch.equal(rows, torch.arange(len(rows), dtype=rows.dtype)):
            return  # every beam goes on in place (on a GPU this test would wait for the device)
        t = self.length
        torch.index_select(self.cache[..., :t, :], 0, rows, out=self.spare[..., :t, :])
        self.cache, self.spare = self.spare, self.cache


def _conv1d(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``Conv1D`` (a linear layer with its weight transposed), as its forward computes it."""
    return torch.addmm(m.bias, x.view(-1, x.size(-1)), m.weight).view(*x.shape[:-1], m.nf)


def _norm(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


class TokenBans:
    """The decoding rules ``generate()`` builds from its own options, as one fixed mask per step: the suppressed
    tokens always, EOS until ``min_new_tokens`` tokens are written (transformers' minimum-length rules), and no
    token that would repeat an n-gram of ``ngram`` tokens (its n-gram block). The same tokens get -inf."""

    def __init__(
        self, vocab: int, *, eos: int, suppress: Sequence[int], min_new_tokens: int, ngram: int, device
    ):
        self.always = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.always[list(suppress)] = True
        self.early = self.always.clone()
        self.early[eos] = True
        self.min_new_tokens, self.ngram = min_new_tokens, ngram

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        written = ids.shape[1] - 1  # after BOS
        scores = scores.masked_fill(
            self.early if written < self.min_new_tokens else self.always, float("-inf")
        )
        n = self.ngram
        if n and ids.shape[1] >= n:
            # a window whose first n - 1 tokens are the last n - 1 written bans its own last token
            windows = ids.unfold(1, n, 1)
            matches = (windows[..., :-1] == ids[:, ids.shape[1] + 1 - n :].unsqueeze(1)).all(dim=-1)
            vocab = scores.shape[-1]
            banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
            banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
            scores = scores.masked_fill(banned[:, :vocab], float("-inf"))
        return scores


class TokenMemo:
    """A per-token function computed once per token: ``fn`` maps ids (rows, 1) to (rows, 1, ...) row by row.

    A matrix product's rows come out bit for bit the same whatever the other rows hold, but not whatever their
    number (the kernel depends on the shape): so ``fn`` is only ever called on blocks of exactly ``rows`` rows, the
    shape the decoding step would give it, and the memoised rows are the ones it would compute. (That rests on the
    math library computing each row apart from the others, as it does here; ``tests/models/test_decoding.py``
    checks the whole decode against ``generate()`` wherever the tests run.)
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], rows: int, vocab: int):
        self.fn, self.rows = fn, rows
        self.table: torch.Tensor | None = None
        self.known = torch.zeros(vocab, dtype=torch.bool)
        self.calls = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        cpu = flat.cpu()
        new = cpu[~self.known[cpu]].unique()
        for i in range(0, len(new), self.rows):
            chunk = new[i : i + self.rows]
            block = torch.cat([chunk, chunk[:1].expand(self.rows - len(chunk))]).to(flat.device)
            out = self.fn(block.view(-1, 1))
            self.calls += 1
            if self.table is None:
                self.table = out.new_empty(len(self.known), *out.shape[1:])
            self.table[chunk.to(flat.device)] = out[: len(chunk)]
            self.known[chunk] = True
        return self.table[flat].view(*ids.shape, *self.table.shape[2:])


@dataclass
class BeamResult:
    sequences: torch.Tensor  # (B, 1 + L): BOS, then the best hypothesis (EOS-filled after its end)
    scores: torch.Tensor  # (B,) the best hypothesis' summed log-probability over its length ** length_penalty


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of dimension 1 of ``x`` (B, K, ...) at ``idx`` (B, K'), which are never negative: one gather (where
    ``take_along_dim`` also launches a kernel that wraps negative indices)."""
    extra = x.shape[2:]
    return torch.gather(x, 1, idx.view(*idx.shape, *(1,) * len(extra)).expand(*idx.shape, *extra))


def beam_search(
    steps: DecoderSteps | GraphedSteps,
    *,
    batch: int,
    beams: int,
    bos: int,
    eos: int,
    pad: int,
    max_new_tokens: int,
    processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    length_penalty: float = 1.0,
    check_every: int = 1,
) -> BeamResult:
    """Beam search as transformers' ``generate(num_beams=beams, early_stopping=True)`` runs it, one EOS token.

    ``steps`` holds ``batch * beams`` rows (each report's beams next to each other); ``processors`` are called as
    ``generate()``'s logits processors are, on (rows, length) ids and (rows, V) log-probabilities.
    ``check_every``: the host reads the stopping condition only every this many steps (a read waits for the GPU).
    Steps past the stop change no result: a report stops once its beams are all finished or its best finished
    hypothesis cannot be beaten, and from then on every new candidate is pushed below -1e9, under any finished
    score, so the best hypothesis (all that is returned) stays.
    """
    device = steps.device
    prompt, max_length = 1, 1 + max_new_tokens
    keep = 2 * beams  # enough candidates that ``beams`` of them go on even if every best one ends here
    top_beams = torch.arange(keep, device=device) < beams
    fill = pad or eos  # transformers' filler (a pad id of 0 counts as unset)
    running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, 0] = bos
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9  # only the first beam extends at the first step (the beams start equal)
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_parents = torch.full((batch, beams, max_length - prompt), -1, dtype=torch.int32, device=device)
    finished_parents = running_parents.clone()
    offsets = torch.arange(batch, device=device).view(-1, 1) * beams
    # whether every candidate ended at some step: the one stopping reason that does not last (the others, no
    # report able to improve and every hypothesis finished, once true stay true), so only it is kept step by step
    all_ended = torch.zeros((), dtype=torch.bool, device=device)
    cur = prompt
    while True:
        ids = running[:, :, :cur].reshape(batch * beams, cur)
        log_probs = F.log_softmax(steps.step(ids[:, -1:]), dim=-1)
        for proc in processors:
            log_probs = proc(ids, log_probs)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)
        # the best ``keep`` continuations over all beams of a report
        cand_scores, cand = torch.topk(totals, k=keep)
        parent = cand // vocab
        cand_parents = _take(running_parents, parent)
        cand_seqs = _take(running, parent)
        cand_seqs[:, :, cur] = cand % vocab
        cand_parents[:, :, cur - prompt] = parent + offsets
        ends = (cand_seqs[:, :, cur] == eos) | (cur + 1 >= max_length)
        # the best ``beams`` candidates that did not end go on
        go_on = cand_scores + ends.to(torch.float32) * -1.0e9
        nxt = torch.topk(go_on, k=beams)[1]
        running, running_scores = _take(cand_seqs, nxt), _take(go_on, nxt)
        running_parents = _take(cand_parents, nxt)
        # ended candidates among the top ``beams`` join the finished hypotheses if they score higher
        just_ended = ends & top_beams[None, :]
        done = cand_scores / ((cur + 1 - prompt) ** length_penalty)
        done += (torch.all(is_finished, dim=-1, keepdim=True)).to(torch.float32) * -1.0e9
        done += (~can_improve).to(torch.float32) * -1.0e9
        done += (~just_ended) * -1.0e9
        merged = torch.topk(torch.cat((finished_scores, done), dim=1), k=beams)[1]
        finished = _take(torch.cat((finished, cand_seqs), dim=1), merged)
        finished_scores = _take(torch.cat((finished_scores, done), dim=1), merged)
        finished_parents = _take(torch.cat((finished_parents, cand_parents), dim=1), merged)
        is_finished = _take(torch.cat((is_finished, just_ended), dim=1), merged)
        steps.reorder(running_parents[..., cur - prompt].reshape(-1))
        cur += 1
        best_possible = running_scores[:, :1] / ((cur - prompt) ** length_penalty)
        worst_done = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & torch.any(best_possible > worst_done, dim=-1, keepdim=True)
        all_ended = all_ended | torch.all(ends)
        if cur >= max_length:
            break
        if (cur - prompt) % check_every == 0:
            if bool(all_ended | ~(torch.any(can_improve) & ~torch.all(is_finished))):
                break
    best, best_scores, best_parents = finished[:, 0], finished_scores[:, 0], finished_parents[:, 0]
    length = prompt + int((best_parents + 1).bool().sum(dim=1).max())
    return BeamResult(sequences=best[:, :length], scores=best_scores)


def greedy_search(
    steps: DecoderSteps | GraphedSteps,
    *,
    batch: int,
    bos: int,
    eos: int,
    pad: int,
    max_new_tokens: int,
    processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    check_every: int = 1,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy search as transformers' ``generate(num_beams=1, do_sample=False)`` runs it: (B, 1 + L) ids (BOS,
    then PAD after a row's EOS) and the processed logits (B, V) of every step. ``check_every`` as in
    :func:`beam_search`: steps past the stop are cut off at the end."""
    device = steps.device
    ids = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    running = torch.ones(batch, dtype=torch.long, device=device)
    scores = []
    length = torch.full((), max_new_tokens, device=device)  # steps until every row ended
    for step in range(1, max_new_tokens + 1):
        logits = steps.step(ids[:, -1:])
        for proc in processors:
            logits = proc(ids, logits)
        scores.append(logits)
        nxt = torch.argmax(logits, dim=-1) * running + pad * (1 - running)
        ids = torch.cat([ids, nxt[:, None]], dim=-1)
        running = running & ~(nxt == eos)
        all_ended = running.max() == 0
        length = torch.where(all_ended & (length == max_new_tokens), step, length)
        if step % check_every == 0 and bool(all_ended):
            break
    n = int(length)
    return ids[:, : 1 + n], scores[:n]


def greedy_scores(seqs: torch.Tensor, step_scores: Sequence[torch.Tensor], eos: int) -> torch.Tensor:
    """The mean token log-probability of each greedy sequence (B, L) (without BOS), up to and including its EOS,
    from the processed logits (B, V) of every step."""
    logp = torch.stack([F.log_softmax(s.float(), dim=-1) for s in step_scores], dim=1)  # (B, L, V)
    tok_logp = logp.gather(-1, seqs[:, : logp.shape[1], None]).squeeze(-1)
    # Tokens after EOS are padding: count up to and including the first EOS.
    seen_eos = (seqs == eos).long().cumsum(1)
    valid = (seen_eos - (seqs == eos).long()) == 0
    # (where, not a product: a padded position after EOS has log-probability -inf, and -inf * 0 is nan)
    return torch.where(valid, tok_logp, 0.0).sum(1) / valid.sum(1).clamp(min=1)


def search(
    decoder: GPT2LMHeadModel,
    cond: torch.Tensor,
    cond_mask: torch.Tensor,
    *,
    beams: int,
    bos: int,
    eos: int,
    pad: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    suppress_tokens: Sequence[int] = (),
    logits_processor: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = (),
    length_penalty: float = 1.0,
    embedder: Callable[[int], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search (greedy search for ``beams=1``) from BOS for conditioning ``cond`` (B, N, E) / ``cond_mask``
    (B, N), with the decoding rules ``generate()`` builds from the same arguments: (B, L) ids without BOS, PAD after
    EOS, and (B,) scores as :func:`decode` gives them."""
    bans = TokenBans(
        decoder.config.vocab_size,
        eos=eos,
        suppress=suppress_tokens,
        min_new_tokens=min_new_tokens,
        ngram=no_repeat_ngram_size,
        device=cond.device,
    )
    rules = [bans, *logits_processor]
    rows = (cond.repeat_interleave(beams, dim=0), cond_mask.repeat_interleave(beams, dim=0))
    where = _kind(cond.device)
    # the memo reads the new words on the host at every step: on a GPU the memory answers each word instead
    embed = embedder(len(rows[0])) if embedder and where == "cpu" else None
    static = STATIC_STEPS[where]
    steps = DecoderSteps(decoder, *rows, capacity=max_new_tokens, embed=embed, beams=beams, static=static)
    if static and cond.device.type == "cuda":
        steps = GraphedSteps(steps)
    check_every = CHECK_EVERY[where]
    common = dict(
        batch=cond.shape[0],
        bos=bos,
        eos=eos,
        pad=pad,
        max_new_tokens=max_new_tokens,
        processors=rules,
        check_every=check_every,
    )
    if beams == 1:
        ids, step_scores = greedy_search(steps, **common)
        return pad_after_eos(ids[:, 1:], eos, pad), greedy_scores(ids[:, 1:], step_scores, eos)
    found = beam_search(steps, beams=beams, length_penalty=length_penalty, **common)
    return pad_after_eos(found.sequences[:, 1:], eos, pad), found.scores


def decode(
    decoder: GPT2LMHeadModel,
    cond: torch.Tensor,
    cond_mask: torch.Tensor,
    *,
    num_beams: int,
    bos: int,
    eos: int,
    pad: int,
    suppress_tokens: Sequence[int],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    logits_processor: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = (),
    use_cache: bool = True,
    static_cache: bool = False,
    engine: str = "medvl",
    embedder: Callable[[int], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode from BOS: (B, L) token ids without BOS, PAD after EOS, and (B,) scores (beam search: the length-
    normalised log-probability of the best hypothesis; greedy: the mean token log-probability).

    ``engine="medvl"`` decodes with the cache through :func:`search`; decoding without the cache, with the static
    cache (and ``engine="transformers"``) goes through transformers' ``generate()``. ``embedder(rows)`` gives the word embedding
    with its hooks for ``rows`` decoded rows (see :class:`DecoderSteps`); only :func:`search` uses it.
    """
    if engine not in ("medvl", "transformers"):
        raise ValueError(f"engine must be 'medvl' or 'transformers', got {engine!r}")
    if cond.shape[0] == 0:  # no scans: no reports (generate() fails on an empty batch)
        return cond.new_zeros((0, 0), dtype=torch.long), cond.new_zeros(0)
    if engine == "medvl" and use_cache and not static_cache and supported(decoder):
        return search(
            decoder,
            cond,
            cond_mask,
            beams=num_beams,
            bos=bos,
            eos=eos,
            pad=pad,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            suppress_tokens=suppress_tokens,
            logits_processor=logits_processor,
            length_penalty=length_penalty,
            embedder=embedder,
        )
    start = torch.full((cond.shape[0], 1), bos, dtype=torch.long, device=cond.device)
    options: dict[str, Any] = {"early_stopping": True} if num_beams > 1 else {}
    if use_cache and static_cache:
        options["cache_implementation"] = "static"
    elif use_cache and num_beams > 1:
        options[CACHE_ARG] = BeamCache(
            DynamicCache(config=decoder.config), DynamicCache(config=decoder.config)
        )
    out = decoder.generate(
        input_ids=start,
        attention_mask=torch.ones_like(start),
        encoder_hidden_states=cond,
        encoder_attention_mask=cond_mask,
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size or None,
        logits_processor=LogitsProcessorList(logits_processor) if logits_processor else None,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=bos,
        use_cache=use_cache,
        output_scores=True,
        return_dict_in_generate=True,
        suppress_tokens=list(suppress_tokens),
        **options,
    )
    seqs = out.sequences[:, 1:]
    scores = out.sequences_scores if num_beams > 1 else greedy_scores(seqs, out.scores, eos)
    return pad_after_eos(seqs, eos, pad), scores


class BeamCache(EncoderDecoderCache):
    """``generate()``'s cache for beam search without reordering the cross-attention keys and values.

    Beam search reorders the cache rows to follow the surviving beams at every step, but a beam only ever takes
    over a beam of the same report, and every beam of a report holds the same conditioning rows (they are copies),
    so the cross-attention rows would be permuted into themselves: only the self-attention cache is reordered.
    """

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def pad_after_eos(seqs: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """PAD in place of every token after a row's first EOS."""
    after = (seqs == eos).long().cumsum(1) - (seqs == eos).long()
    return seqs.masked_fill(after > 0, pad)

"""AdaMatch's loss (official AdaMatch, vectorised): token-wise symmetric InfoNCE with in-batch negatives.

For image ``i`` and report ``j`` with L2-normalised patch features ``v_ip`` and word features ``t_jw``::

    s_i2t(i, j) = mean_p  max_{w in content words of j}  <v_ip, t_jw>
    s_t2i(i, j) = mean_{w in affirmed content words of j}  max_p  <v_ip, t_jw>

Negated words ("effusion" in "no effusion") and stop words stay out of ``s_t2i``: the prototype showed them
pulling toward lesions. ``loss = (CE(s_i2t / tau) + CE(s_t2i^T / tau)) / 2`` with a learnable temperature ``tau``
(from 0.07); reports with identical text share the target mass (they are not negatives of each other). The
B x B x P x W similarity is computed in chunks of images; only arg-max indices are kept for backward. Under
torch.distributed every rank's pairs can be negatives (:func:`pair_loss` with ``gather``); the optional
word-level term is :func:`word_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "effective_masks",
    "word_order",
    "select_words",
    "token_scores",
    "word_identities",
    "word_loss",
    "contrastive_loss",
    "distributed_world",
    "gather_pairs",
    "pair_loss",
]


def effective_masks(
    word_mask: torch.Tensor, match_mask: torch.Tensor, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallbacks per report: no content word -> all real pieces; no affirmed word -> all content words.
    All (B, T) bool."""
    word = torch.where(word_mask.any(1, keepdim=True), word_mask, real)
    match = torch.where(match_mask.any(1, keepdim=True), match_mask, word)
    return word, match


def word_order(word_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, W) positions of the masked entries first (stable), W = max count (at least 1)."""
    w = max(int(word_mask.sum(1).max()), 1)
    return torch.argsort((~word_mask).to(torch.int8), dim=1, stable=True)[:, :w]


def select_words(
    features: torch.Tensor,
    word_mask: torch.Tensor,
    match_mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gather the masked positions to the front: (B, T, D) -> (B, W, D), masks (B, W) [, weights (B, W)];
    W = max count. Cuts the similarity tensor from pieces (stop words, punctuation, padding) to content words.
    ``order``: ``word_order(word_mask)`` when the caller has it (finding W reads a count from the device).
    """
    order = word_order(word_mask) if order is None else order
    feats = features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    out = (feats, word_mask.gather(1, order), match_mask.gather(1, order))
    if weight is None:
        return out
    return (*out, weight.gather(1, order))


def token_scores(
    img: torch.Tensor,
    txt: torch.Tensor,
    i2t_mask: torch.Tensor,
    t2i_mask: torch.Tensor,
    chunk: int = 16,
    t2i_weight: torch.Tensor | None = None,
    word_best: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fine-grained scores of every image against every report.

    img (Bi, P, D) and txt (Bt, W, D) L2-normalised; i2t_mask, t2i_mask (Bt, W) bool; t2i_weight (Bt, W)
    optional word weights. Returns ``s_i2t`` (Bi, Bt) = mean over patches of the best i2t word, and
    ``s_t2i`` (Bi, Bt) = (weighted) mean over t2i words of the best patch; with ``word_best`` also the best
    patch similarity of every word in every image (Bi, Bt, W), for :func:`word_loss`. ``chunk`` images at a time.
    """
    t2i = t2i_mask.to(img.dtype)
    if t2i_weight is not None:
        t2i = t2i * t2i_weight.to(img.dtype)
    n_t2i = t2i.sum(1).clamp_min(1e-6)  # (Bt,)
    off = ~i2t_mask[None, :, None, :]  # (1, Bt, 1, W)
    out_i2t, out_t2i, out_best = [], [], []
    for a in range(0, img.shape[0], max(1, chunk)):
        s = torch.einsum("ipd,jwd->ijpw", img[a : a + chunk], txt)  # (c, Bt, P, W)
        # the fill is the scores' own lowest value: under CUDA's autocast they are bf16 while img (normalised in
        # float32 there) is not, and float32's lowest overflows bf16
        out_i2t.append(s.masked_fill(off, torch.finfo(s.dtype).min).amax(-1).mean(-1))
        best = s.amax(2)  # (c, Bt, W)
        out_t2i.append((best * t2i).sum(-1) / n_t2i)
        if word_best:
            out_best.append(best)
    if word_best:
        return torch.cat(out_i2t), torch.cat(out_t2i), torch.cat(out_best)
    return torch.cat(out_i2t), torch.cat(out_t2i)


def word_identities(
    input_ids: torch.Tensor, order: torch.Tensor, word_key: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, W) ids for :func:`word_loss` of the words at ``order`` (from :func:`word_order`): their stem ids from
    ``word_key`` (B, T), so a word's forms are one word; without ``word_key``, or at fallback pieces without a stem,
    the first piece (as ``-1 - id`` where stems exist, so the two kinds of id never meet)."""
    pieces = input_ids.gather(1, order)
    if word_key is None:
        return pieces
    stems = word_key.gather(1, order)
    return torch.where(stems > 0, stems, -1 - pieces)


def word_loss(
    best: torch.Tensor, word_mask: torch.Tensor, word_ids: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Word-level InfoNCE over images: for every affirmed word w of report j, the images of the batch compete on
    their best patch for w (``best`` (Bi, Bt, W) from :func:`token_scores`, Bi = Bt = B, image i paired with
    report i). Positives: image j and every image whose report also affirms w (``word_ids`` (B, W): one id per
    word, equal for the same word: the model passes stem ids, so "granulomas" is "granuloma"; ``word_mask`` (B, W)
    bool: affirmed words), pooled as in MIL-NCE; negatives: the others.

    The report-level scores let a word ride on whatever co-occurs with it (clips with a large heart after heart
    surgery); here a large heart in an image whose report has no clips is a negative for "clips", so the word
    has to find what only its positive images share.
    """
    b = best.shape[0]
    same = (word_ids[:, :, None, None] == word_ids[None, None]) & word_mask[
        :, :, None, None
    ]  # (Bi, Wi, Bt, W)
    pos = same.any(1) | torch.eye(b, dtype=torch.bool, device=best.device)[:, :, None]  # (Bi, Bt, W)
    logits = scale * best.float()
    per_word = torch.logsumexp(logits, 0) - torch.logsumexp(
        logits.masked_fill(~pos, float("-inf")), 0
    )  # (Bt, W)
    valid = word_mask.to(per_word.dtype)
    return (per_word * valid).sum() / valid.sum().clamp_min(1.0)


def contrastive_loss(
    logits: torch.Tensor, groups: torch.Tensor | None = None, col_groups: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE over rows of ``logits`` (B, N). Positives: the diagonal when ``groups`` is None; otherwise
    every column whose ``col_groups`` (N,) (default: ``groups``) equals the row's ``groups`` (B,) value
    (identical or all-normal reports). Several positives are pooled as in MIL-NCE,
    ``-log(sum_pos exp / sum_all exp)``: the row must put its mass on its positives, not spread it
    evenly over them (a soft uniform target would push the temperature up to flatten the logits)."""
    b = logits.shape[0]
    if groups is None:
        return F.cross_entropy(logits, torch.arange(b, device=logits.device))
    cols = groups if col_groups is None else col_groups
    pos = groups[:, None] == cols[None, :]
    logits = logits.float()
    pos_lse = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - pos_lse).mean()


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_pairs(
    img: torch.Tensor,
    txt: torch.Tensor,
    i2t_mask: torch.Tensor,
    t2i_mask: torch.Tensor,
    groups: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Every rank's img (B, P, D), txt (B, W, D) (words padded to the ranks' max), masks, word weights and
    groups, concatenated in rank order; then this rank's padded txt, masks and weights. Features keep
    gradients (``torch.distributed.nn.all_gather``): each rank's slice gets every rank's loss gradient."""
    from torch.distributed.nn.functional import all_gather  # only under DDP; not importable on every build

    w = torch.tensor([txt.shape[1]], device=txt.device)
    dist.all_reduce(w, op=dist.ReduceOp.MAX)
    pad = int(w) - txt.shape[1]
    if pad:
        txt = F.pad(txt, (0, 0, 0, pad))
        i2t_mask = F.pad(i2t_mask, (0, pad), value=False)
        t2i_mask = F.pad(t2i_mask, (0, pad), value=False)
        weight = F.pad(weight, (0, pad))

    def plain(t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    return (
        torch.cat(all_gather(img.contiguous())),
        torch.cat(all_gather(txt.contiguous())),
        plain(i2t_mask),
        plain(t2i_mask),
        plain(weight),
        plain(groups),
        txt,
        i2t_mask,
        t2i_mask,
        weight,
    )


def pair_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    i2t_mask: torch.Tensor,
    t2i_mask: torch.Tensor,
    scale: torch.Tensor,
    groups: torch.Tensor | None = None,
    chunk: int = 16,
    gather: bool = False,
    t2i_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_i2t, loss_t2i) of this process's pairs: img (B, P, D), txt (B, W, D) normalised.

    With ``gather`` under torch.distributed, the negatives are every rank's pairs: this rank's images
    against all reports and all images against this rank's reports (open_clip's local loss).
    """
    rank, size = distributed_world()
    if not gather or size == 1:
        s_i2t, s_t2i = token_scores(img, txt, i2t_mask, t2i_mask, chunk, t2i_weight)
        return contrastive_loss(scale * s_i2t, groups), contrastive_loss(scale * s_t2i.t(), groups)
    b = img.shape[0]
    if groups is None:  # unique ids across ranks: the positives are the pairs themselves
        groups = torch.arange(b, device=img.device) + rank * b
    weight = t2i_weight if t2i_weight is not None else torch.ones_like(t2i_mask, dtype=img.dtype)
    img_all, txt_all, i2t_all, t2i_all, w_all, g_all, txt, i2t_mask, t2i_mask, weight = gather_pairs(
        img, txt, i2t_mask, t2i_mask, groups, weight
    )
    s_i2t, _ = token_scores(img, txt_all, i2t_all, t2i_all, chunk, w_all)  # (B, world*B)
    _, s_t2i = token_scores(img_all, txt, i2t_mask, t2i_mask, chunk, weight)  # (world*B, B)
    return (
        contrastive_loss(scale * s_i2t, groups, g_all),
        contrastive_loss(scale * s_t2i.t(), groups, g_all),
    )

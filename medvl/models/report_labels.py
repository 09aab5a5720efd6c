"""The report head's label read-outs: the 14 CheXpert labels from AdaMatch patches, and the thresholds that turn
their probabilities into calls."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NUM_LABELS", "LabelQueries", "PooledLabels", "f1_thresholds", "fit_pooled_labels"]

NUM_LABELS = 14  # CheXpert observations (medvl.text.chexpert.CHEXPERT_LABELS)


class PooledLabels(nn.Module):
    """A linear read-out of the 14 labels from the mean and the max of the normalised patch features.

    patch_features (B, P, D) -> label logits (B, L); no per-label summary (unlike :class:`LabelQueries`).
    """

    def __init__(self, dim: int, num_labels: int = 14):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(2 * dim, num_labels)

    def pool(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> the mean and the max of the normalised patches (B, 2D), what ``out`` reads."""
        x = self.norm(patch_features.float())
        return torch.cat([x.mean(1), x.amax(1)], dim=-1)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(patch_features))


def fit_pooled_labels(
    read_out: PooledLabels,
    patch_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
) -> float:
    """Fit ``read_out``'s linear layer to ``labels`` (N, L; 1 = positive, anything else negative) on fixed patch
    features (N, P, D), full batch, ``steps`` AdamW steps; the normalisation stays as it is. A logistic regression
    on cached features converges in a second where the head's own steps, shared with the decoder, take hundreds.
    Returns the final training loss."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    with torch.no_grad():
        x = torch.cat(
            [
                read_out.pool(patch_features[i : i + batch_size])
                for i in range(0, len(patch_features), batch_size)
            ]
        )
    target = (labels == 1).float().to(x.device)
    opt = torch.optim.AdamW(read_out.out.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(read_out.out(x), target)
        loss.backward()
        opt.step()
    return float(loss.detach())


def f1_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per label, the probability threshold with the highest F1 against ``targets`` (B, L) in {0, 1}; a label
    with no positive target gets 1.01 (never called). The candidates are the observed probabilities."""
    thresholds = torch.full((probs.shape[1],), 1.01)
    for j in range(probs.shape[1]):
        y = targets[:, j].bool()
        if not y.any():
            continue
        order = torch.argsort(probs[:, j], descending=True)
        hits = y[order].float().cumsum(0)
        called = torch.arange(1, len(order) + 1, dtype=torch.float32)
        f1 = 2 * hits / (called + y.sum())
        best = int(torch.argmax(f1))
        thresholds[j] = float(probs[order[best], j])
    return thresholds


class LabelQueries(nn.Module):
    """One learned query per CheXpert label attends over the patch tokens.

    tokens (B, P, E) -> per-label summaries (B, L, E) and label logits (B, L).
    """

    def __init__(self, width: int, num_labels: int = 14):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_labels, width) / width**0.5)
        self.key = nn.Linear(width, width)
        self.weight = nn.Parameter(torch.zeros(num_labels, width))
        self.bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        att = torch.einsum("le,bpe->blp", self.queries, self.key(tokens)) / tokens.shape[-1] ** 0.5
        pooled = torch.einsum("blp,bpe->ble", att.softmax(-1), tokens)  # (B, L, E)
        return pooled, (pooled * self.weight).sum(-1) + self.bias

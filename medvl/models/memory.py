"""The shared cross-modal memory (after R2GenCMN).

One learned matrix ``M`` (num_slots x dim). A query sequence (image patches or report
words) attends to it with multiple heads, each head keeping only its top-k scores per query,
and the response is added back to the query. Image and text features query the *same*
matrix, so both heads (report generation and diffusion) read one shared vocabulary of
cross-modal prototypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medvl.config import from_dict, to_dict
from medvl.errors import ConfigError
from medvl.models.pretrained import component_dir, load_weights, read_config, save_weights, write_config


@dataclass
class MemoryConfig:
    num_slots: int = 2048
    dim: int = 512
    num_heads: int = 8
    topk: int = 32
    dropout: float = 0.1

    def validate(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(
                f"memory.dim ({self.dim}) must be divisible by memory.num_heads ({self.num_heads})"
            )
        if not 0 < self.topk <= self.num_slots:
            raise ConfigError(f"memory.topk must be in 1..num_slots ({self.num_slots}), got {self.topk}")


class SharedMemory(nn.Module):
    """Top-k multi-head attention over a learned memory matrix, added back as a residual.

    ``forward(x)``: x (B, L, dim) -> x + response (B, L, dim). ``respond(x)`` returns only the
    response, for callers that want it as separate conditioning tokens. Saved as the ``memory/`` component of a
    report run (the diffusion run keeps a copy).
    """

    FORMAT: ClassVar[str] = "medvl.memory"
    DIRNAME: ClassVar[str] = "memory"

    def __init__(self, cfg: MemoryConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.memory = nn.Parameter(torch.randn(cfg.num_slots, cfg.dim) / math.sqrt(cfg.dim))
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def respond(self, x: torch.Tensor, return_scores: bool = False):
        """x (B, L, D) -> response (B, L, D) [and (B, H, L, k) attention weights, (B, H, L, k) slot ids]."""
        b, length, d = x.shape
        h, dh, k = self.cfg.num_heads, d // self.cfg.num_heads, self.cfg.topk
        q = self.q_proj(x).view(b, length, h, dh).transpose(1, 2)  # (B, H, L, dh)
        mem_k = self.k_proj(self.memory).view(-1, h, dh).transpose(0, 1)  # (H, S, dh)
        mem_v = self.v_proj(self.memory).view(-1, h, dh).transpose(0, 1)  # (H, S, dh)
        scores = torch.einsum("bhld,hsd->bhls", q, mem_k) / math.sqrt(dh)  # (B, H, L, S)
        top, idx = scores.topk(k, dim=-1)  # (B, H, L, k)
        attn = self.dropout(F.softmax(top, dim=-1))
        # The k weights are scattered back to a dense (B, H, L, S) row and multiplied with the values, rather than
        # gathering the k value rows (``mem_v[heads, idx]``): the gather's backward is an accumulating index_put,
        # which PyTorch runs with unordered atomic adds on more than one CPU thread, so training was not
        # reproducible run to run. scatter's backward is a gather, which is.
        weights = torch.zeros_like(scores).scatter(-1, idx, attn)  # (B, H, L, S)
        out = torch.einsum("bhls,hsd->bhld", weights, mem_v)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, d))
        if return_scores:
            return out, attn, idx
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.respond(x)

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` (format medvl.memory, the memory config) and ``model.safetensors``; returns the folder."""
        directory = Path(directory)
        save_weights(directory, self.state_dict())
        write_config(directory, self.FORMAT, to_dict(self.cfg))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> SharedMemory:
        """Load ``directory`` (or ``directory/memory/`` when ``directory`` is a run)."""
        directory = component_dir(directory, cls.DIRNAME)
        meta = read_config(
            directory, cls.FORMAT, what="shared memory", hint="a report run with model.use_memory"
        )
        mem = cls(from_dict(MemoryConfig, meta["config"], "memory."))
        mem.load_state_dict(load_weights(directory, device))
        return mem

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

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class MemoryConfig:
    num_slots: int = 2048
    dim: int = 512
    num_heads: int = 8
    topk: int = 32
    dropout: float = 0.1

    def validate(self) -> None:
        from medvl.errors import ConfigError

        if self.dim % self.num_heads:
            raise ConfigError(f"memory.dim ({self.dim}) must be divisible by memory.num_heads ({self.num_heads})")
        if not 0 < self.topk <= self.num_slots:
            raise ConfigError(f"memory.topk must be in 1..num_slots ({self.num_slots}), got {self.topk}")


class SharedMemory(nn.Module):
    """Top-k multi-head attention over a learned memory matrix, added back as a residual.

    ``forward(x)``: x (B, L, dim) -> x + response (B, L, dim). ``respond(x)`` returns only the
    response, for callers that want it as separate conditioning tokens.
    """

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
        # Gather the k selected value rows per (head, query) without a Python loop.
        values = mem_v[torch.arange(h, device=x.device).view(1, h, 1, 1), idx]  # (B, H, L, k, dh)
        out = torch.einsum("bhlk,bhlkd->bhld", attn, values)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, d))
        if return_scores:
            return out, attn, idx
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.respond(x)

    def save(self, directory: str | Path) -> None:
        from medvl.config import save_config

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / "memory.safetensors"))
        save_config(self.cfg, directory / "memory.yaml")

    @classmethod
    def load(cls, directory: str | Path, map_location: str = "cpu") -> SharedMemory:
        from medvl.config import load_config
        from medvl.errors import RunError

        directory = Path(directory)
        if not (directory / "memory.safetensors").exists():
            raise RunError(f"{directory} holds no shared memory (memory.safetensors)")
        mem = cls(load_config(MemoryConfig, directory / "memory.yaml"))
        mem.load_state_dict(load_file(str(directory / "memory.safetensors"), device=map_location))
        return mem

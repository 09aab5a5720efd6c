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
        # Keys and values of the memory, projected once while the model is frozen (see memory_kv).
        self.cache_kv = True
        self._kv_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def respond(self, x: torch.Tensor, return_scores: bool = False):
        """x (B, L, D) -> response (B, L, D) [and (B, H, L, k) attention weights, (B, H, L, k) slot ids]."""
        b, length, d = x.shape
        h, dh, k = self.cfg.num_heads, d // self.cfg.num_heads, self.cfg.topk
        q = self.q_proj(x).view(b, length, h, dh).transpose(1, 2)  # (B, H, L, dh)
        mem_k, mem_v = self.memory_kv()  # (H, S, dh) each
        scores = torch.einsum("bhld,hsd->bhls", q, mem_k) / math.sqrt(dh)  # (B, H, L, S)
        top, idx = scores.topk(k, dim=-1)  # (B, H, L, k)
        attn = self.dropout(F.softmax(top, dim=-1))
        # The k weights are scattered back to a dense (B, H, L, S) row and multiplied with the values, rather than
        # gathering the k value rows (``mem_v[heads, idx]``): the gather's backward is an accumulating index_put,
        # which PyTorch runs with unordered atomic adds on more than one CPU thread, so training was not
        # reproducible run to run. scatter's backward is a gather, which is. The dense row takes the weights' dtype:
        # CUDA's autocast runs softmax in float32 while the scores stay bf16 (CPU autocast keeps softmax in bf16).
        weights = torch.zeros_like(scores, dtype=attn.dtype).scatter(-1, idx, attn)  # (B, H, L, S)
        out = torch.einsum("bhls,hsd->bhld", weights, mem_v)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, d))
        if return_scores:
            return out, attn, idx
        return out

    def memory_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values per head, (H, S, dh) each.

        A frozen model (eval mode, no gradient recorded) projects them once and reuses them: decoding queries the
        memory once per token, and projecting the whole matrix each time was most of a report's decoding time. The
        cache is keyed on the weights' storage and version counters (an optimiser step, ``load_state_dict`` or
        ``.to()`` invalidates it) and on the autocast state, dropped by ``train()`` and whenever a gradient is
        recorded, and kept out of the state dict (``cache_kv = False`` turns it off).
        The cached tensors are the ones the projection gives, so responses are bitwise those computed afresh.
        Under ``torch.compile`` the projection is traced into the graph instead: a cache kept in a Python attribute
        would be a guard that recompiles the caller whenever it is filled or dropped.
        """
        if torch.compiler.is_compiling():
            return self._project_kv()
        if self.training or torch.is_grad_enabled() or not self.cache_kv:
            self._kv_cache = None
            return self._project_kv()
        key = self._kv_key()
        if key is None:
            return self._project_kv()
        if self._kv_cache is None or self._kv_cache[0] != key:
            self._kv_cache = (key, self._project_kv())
        return self._kv_cache[1]

    def _project_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cfg.num_heads
        dh = self.cfg.dim // h
        mem_k = self.k_proj(self.memory).view(-1, h, dh).transpose(0, 1)
        mem_v = self.v_proj(self.memory).view(-1, h, dh).transpose(0, 1)
        return mem_k, mem_v

    def _kv_key(self) -> tuple | None:
        tensors = (self.memory, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias)
        try:
            weights = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        except RuntimeError:  # inference-mode tensors keep no version counter: no cache
            return None
        device = self.memory.device.type
        try:
            autocast = torch.is_autocast_enabled(device)
        except RuntimeError:  # a device type without autocast (the meta device): nothing to key on
            autocast = False
        return weights, autocast, torch.get_autocast_dtype(device) if autocast else None

    def train(self, mode: bool = True) -> SharedMemory:
        if mode:
            self._kv_cache = None
        return super().train(mode)

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

"""The report head as a saved component: ``RUN/report_head/``.

The report run holds it beside ``memory/`` (the shared memory) and ``adamatch/`` (a copy of the AdaMatch
component)::

    report_head/config.json         format medvl.report_head: head config, decoding settings (``generation``),
                                    keyword vocabulary, image size, AdaMatch width, special token ids
    report_head/model.safetensors   projections, keyword embeddings (and AdaMatch when fine-tuned)
    report_head/decoder/            GPT-2 weights (safetensors) and config, save_pretrained
    report_head/tokenizer/          the word-level tokenizer (PreTrainedTokenizerFast), save_pretrained
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from medvl.config import from_dict, to_dict
from medvl.errors import RunError
from medvl.models.memory import SharedMemory
from medvl.models.pretrained import component_dir, load_weights, read_config, save_weights, write_config
from medvl.models.report_head import (
    DECODER_DIR,
    TOKENIZER_DIR,
    GenerationSettings,
    ReportHead,
    ReportHeadConfig,
)

__all__ = ["ReportHeadBundle"]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-shard progress bars from save_pretrained / from_pretrained (they would clutter CLI output)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _own_state_keys(cfg: ReportHeadConfig) -> tuple[str, ...]:
    """State-dict prefixes saved elsewhere: the decoder (``decoder/``), the memory (``RUN/memory/``) and a frozen
    AdaMatch (``RUN/adamatch/``); a fine-tuned AdaMatch is saved with the head."""
    return ("decoder.", "memory.") + (() if cfg.finetune_adamatch else ("adamatch.",))


class ReportHeadBundle:
    """A trained report head with its tokenizer, image size and decoding settings, as stored under
    ``RUN/report_head/`` (see the module docstring). The shared memory is not part of it: pass the run's own."""

    FORMAT: ClassVar[str] = "medvl.report_head"
    DIRNAME: ClassVar[str] = "report_head"

    def __init__(
        self,
        head: ReportHead,
        tokenizer: PreTrainedTokenizerFast,
        image_size: int,
        generation: GenerationSettings | None = None,
    ):
        self.head, self.tokenizer, self.image_size = head, tokenizer, int(image_size)
        self.generation = generation or GenerationSettings()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the component to ``directory``; returns it."""
        head, directory = self.head, Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _quiet_transformers():
            head.decoder.save_pretrained(directory / DECODER_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        skip = _own_state_keys(head.cfg)
        save_weights(directory, {k: v for k, v in head.state_dict().items() if not k.startswith(skip)})
        write_config(
            directory,
            self.FORMAT,
            to_dict(head.cfg),
            generation=to_dict(self.generation),
            visual_dim=head.visual_dim,
            keyword_vocabulary=head.keyword_vocabulary,
            image_size=self.image_size,
            special_ids={"pad": head.pad_id, "bos": head.bos_id, "eos": head.eos_id, "unk": head.unk_id},
        )
        return directory

    @classmethod
    def read_config(cls, directory: str | Path) -> dict[str, Any]:
        """The checked ``config.json`` of ``directory`` (or of ``directory/report_head/``); a one-line
        :class:`RunError` when it holds no report head of this layout."""
        return read_config(
            component_dir(directory, cls.DIRNAME),
            cls.FORMAT,
            what="report head",
            hint="train one with `medvl train report`",
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        *,
        memory: SharedMemory | None = None,
        adamatch: nn.Module | None = None,
    ) -> ReportHeadBundle:
        """Load ``directory`` (or ``directory/report_head/`` when ``directory`` is a run), the head in eval mode.

        ``memory``: the run's shared memory (``RUN/memory/``), needed when the head uses it; ``adamatch``: the
        AdaMatch model, needed (and kept in the head) when the head fine-tuned it, ignored otherwise.
        """
        directory = component_dir(directory, cls.DIRNAME)
        meta = cls.read_config(directory)
        for needed in (DECODER_DIR, TOKENIZER_DIR):
            if not (directory / needed).exists():
                raise RunError(f"report head {directory} is incomplete: {needed} is missing")
        cfg = from_dict(ReportHeadConfig, meta["config"], prefix="model.")
        if cfg.finetune_adamatch and adamatch is None:
            raise RunError(
                f"{directory} fine-tuned AdaMatch: pass the AdaMatch model to load its fine-tuned weights"
            )
        if cfg.use_memory and memory is None:
            raise RunError(
                f"{directory} reads the shared memory: pass the report run's memory "
                f"(SharedMemory.from_pretrained(RUN/{SharedMemory.DIRNAME}))"
            )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory / TOKENIZER_DIR)
        ids = meta["special_ids"]
        head = ReportHead(
            cfg,
            vocab_size=len(tokenizer),
            visual_dim=int(meta["visual_dim"]),
            keyword_vocabulary=meta["keyword_vocabulary"],
            pad_id=ids["pad"],
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            unk_id=ids["unk"],
            adamatch=adamatch if cfg.finetune_adamatch else None,
        )
        with _quiet_transformers():
            head.decoder = GPT2LMHeadModel.from_pretrained(directory / DECODER_DIR)
        head.decoder.config.pad_token_id = None  # see ReportHead.__init__
        if cfg.use_memory:
            head.decoder.transformer.wte.register_forward_hook(head._word_memory_hook)
            head.memory.load_state_dict(memory.state_dict())
        if cfg.label_states and cfg.label_state_vector:  # after the memory's hook, as in ReportHead.__init__
            head.decoder.transformer.wte.register_forward_hook(head._state_hook)
        missing, unexpected = head.load_state_dict(load_weights(directory), strict=False)
        missing = [k for k in missing if not k.startswith(_own_state_keys(cfg))]
        if missing or unexpected:
            raise RunError(
                f"{directory}/model.safetensors does not match the head config "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        generation = from_dict(GenerationSettings, meta["generation"], prefix="generation.")
        return cls(head.to(device).eval(), tokenizer, int(meta["image_size"]), generation)

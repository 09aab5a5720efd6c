"""Small stand-ins for the diffusion head's tests: an AdaMatch-run look-alike and helpers that make tiny
autoencoder / report / AdaMatch run directories without the other stages' code.

``ToyAdaMatchRun`` offers only what the diffusion head uses from the AdaMatch run API: ``tokenize``,
``model.encode_text``, ``report_keypatches``, ``embed_dim``, ``load``. Word features are fixed random
embeddings mixed by a 1-D convolution, so "left" and "right" change the neighbouring words' features.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medvl.models.memory import MemoryConfig, SharedMemory

VOCAB = 257
DIM = 32
STOP_WORDS = {"no", "is", "the", "or", "and", ".", "of", "size"}


def _token(word: str) -> int:
    return 1 + zlib.crc32(word.encode()) % (VOCAB - 1)


@dataclass
class TextTokens:
    features: torch.Tensor
    word_mask: torch.Tensor


@dataclass
class Keypatches:
    features: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


class ToyTextEncoder(nn.Module):
    def __init__(self, dim: int = DIM):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.mix = nn.Conv1d(dim, dim, 3, padding=1)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, dim, generator=g))
            self.mix.weight.copy_(torch.randn(self.mix.weight.shape, generator=g) * 0.2)
            self.mix.bias.zero_()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_word_info) -> TextTokens:
        x = self.embed(input_ids)
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return TextTokens(features=x * attention_mask[..., None], word_mask=attention_mask.bool())


class ToyAdaMatchRun:
    embed_dim = DIM

    def __init__(self, device: str = "cpu"):
        self.model = ToyTextEncoder().to(device).eval()
        self.device = device
        g = torch.Generator().manual_seed(1)
        self.bank = torch.randn(16, DIM, generator=g)
        self.bank_boxes = torch.rand(16, 4, generator=g).sort(-1).values

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> ToyAdaMatchRun:
        """Like AdaMatchRun.load: the artifacts sit in ``run_dir/adamatch/`` (or ``run_dir`` is that folder)."""
        if not any((d / "toy_adamatch.json").exists() for d in (Path(run_dir) / "adamatch", Path(run_dir))):
            raise FileNotFoundError(f"no toy AdaMatch artifacts in {run_dir}")
        return cls(device)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Like the AdaMatch tokenizer: ids, attention, content words (not stop words) and affirmed words
        (content words outside a "no ... ." scope)."""
        words = [t.lower().replace(".", " . ").replace(",", " ").split()[:40] for t in texts]
        T = max(1, max(len(w) for w in words))
        ids = torch.zeros(len(texts), T, dtype=torch.long)
        mask = torch.zeros(len(texts), T, dtype=torch.long)
        content = torch.zeros(len(texts), T, dtype=torch.bool)
        affirmed = torch.zeros(len(texts), T, dtype=torch.bool)
        for i, ws in enumerate(words):
            ids[i, :len(ws)] = torch.tensor([_token(w) for w in ws], dtype=torch.long)
            mask[i, :len(ws)] = 1
            negated = False
            for j, w in enumerate(ws):
                negated = (negated or w == "no") and w != "."
                content[i, j] = w not in STOP_WORDS
                affirmed[i, j] = content[i, j] and not negated
        return {"input_ids": ids, "attention_mask": mask, "word_mask": content, "match_mask": affirmed}

    @torch.no_grad()
    def report_keypatches(self, texts: list[str], top_k: int) -> Keypatches:
        tok = self.tokenize(texts)
        words = self.model.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
        pooled = words.features.sum(1) / tok["attention_mask"].sum(1, keepdim=True).clamp(min=1).to(self.device)
        scores = pooled.cpu() @ self.bank.T
        top = scores.topk(min(top_k, self.bank.shape[0]), dim=1)
        return Keypatches(self.bank[top.indices], self.bank_boxes[top.indices], top.values)


def make_adamatch_run(root: Path) -> Path:
    (root / "adamatch").mkdir(parents=True, exist_ok=True)
    (root / "adamatch" / "toy_adamatch.json").write_text("{}")
    (root / "stage.json").write_text(json.dumps({"stage": "adamatch"}))
    return root


def make_report_run(root: Path, dim: int = DIM) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    SharedMemory(MemoryConfig(num_slots=16, dim=dim, num_heads=4, topk=4, dropout=0.1)).save(root / "memory")
    (root / "stage.json").write_text(json.dumps({"stage": "report"}))
    return root


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one thread, and much faster when the cores are shared (OpenMP threads
    spin-waiting on each other make each small convolution ~30x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def use_toy_adamatch(monkeypatch) -> None:
    """Route the diffusion head's AdaMatch loading to the stand-in."""
    import medvl.models.diffusion as head
    import medvl.inference.synthesize as synth
    import medvl.train.stages.diffusion as stage

    for mod in (head, stage, synth):
        if hasattr(mod, "load_adamatch_run"):
            monkeypatch.setattr(mod, "load_adamatch_run", lambda d, device="cpu": ToyAdaMatchRun.load(d, str(device)))
        if hasattr(mod, "copy_adamatch_run"):
            monkeypatch.setattr(mod, "copy_adamatch_run", copy_toy_adamatch)


def copy_toy_adamatch(src_run: Path, dst_run: Path) -> Path:
    import shutil

    src = Path(src_run) / "adamatch"
    dst = Path(dst_run) / "adamatch"
    if src.resolve() != dst.resolve():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def train_plain(stage, steps: int, batch_size: int = 8, lr: float = 2e-3, seed: int = 0):
    """A few optimiser steps through the Stage protocol without the shared loop."""
    torch.manual_seed(seed)
    model = stage.build_model()
    groups = stage.param_groups(model) if hasattr(stage, "param_groups") else [{"params": model.parameters()}]
    opt = torch.optim.AdamW(groups, lr=lr)
    ds = stage.train_dataset()
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(ds), (batch_size,), generator=g).tolist()
        loss, _ = stage.training_step(model, stage.collate([ds[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(stage, "on_step_end"):
            stage.on_step_end(model, step + 1)
        losses.append(float(loss.detach()))
    model.eval()
    return model, losses


def finish_run(stage, model, run_dir: Path) -> Path:
    """What the loop does at the end: save_run from the model, then stage.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        stage.save_run(model, run_dir)
    (run_dir / "stage.json").write_text(json.dumps({"stage": stage.name}))
    return run_dir


def build_tiny_runs(root: Path, data: Path, monkeypatch=None, diffusion_steps: int = 6) -> dict[str, Path]:
    """Tiny autoencoder, stand-in AdaMatch and report runs, and a diffusion run trained a few steps."""
    import medvl.train.stages.diffusion as st

    root.mkdir(parents=True, exist_ok=True)
    ae_stage = st.build_autoencoder_stage(config_path="tiny", overrides=[], data=data)
    model, _ = train_plain(ae_stage, 4)
    ae = finish_run(ae_stage, model, root / "ae")
    ada, rep = make_adamatch_run(root / "ada"), make_report_run(root / "rep")
    stage = st.build_diffusion_stage(config_path="tiny", overrides=[], data=data, from_runs=[ada, rep, ae])
    model, _ = train_plain(stage, diffusion_steps)
    diff = finish_run(stage, model, root / "diff")
    return {"ae": ae, "ada": ada, "rep": rep, "diff": diff}

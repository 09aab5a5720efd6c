"""What the shared training loop costs over a bare PyTorch loop, and what a checkpoint costs.

Same model (an MLP), data, AdamW, cosine schedule and gradient clipping; the bare loop has no
Accelerate, no logging, no validation, no checkpoints. Prints a table and writes
``benchmarks/results/loop_overhead.json``. Run: ``python benchmarks/loop_overhead.py`` (under a
minute on 2 idle CPU cores).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medvl.train.loop import TrainConfig, fit, lr_factor

DIM, HIDDEN, SAMPLES, BATCH, STEPS, REPEATS = 64, 256, 4096, 64, 300, 3
RESULTS = Path(__file__).resolve().parent / "results" / "loop_overhead.json"


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(DIM, HIDDEN),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, 1),
    )


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, DIM, generator=g)
    return TensorDataset(x, x[:, :8].sum(1, keepdim=True))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_model()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.mlp(x), y)}


@dataclass
class BenchConfig:
    train: TrainConfig = field(default_factory=TrainConfig)


class BenchStage:
    name = "bench"

    def __init__(self, train: TrainConfig) -> None:
        self.train, self.config = train, BenchConfig(train)
        self.data = make_data()

    def build_model(self) -> nn.Module:
        return Net()

    def train_dataset(self) -> TensorDataset:
        return self.data

    def collate(self, items):
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])

    def training_step(self, model, batch):
        return model(*batch)["loss"], {}

    def validate(self, model):
        x, y = self.data.tensors
        return {"val_loss": float(model(x[:512], y[:512])["loss"])}

    def save_run(self, model, run_dir):
        torch.save(model.state_dict(), run_dir / "model.pt")


def bare_loop(cfg: TrainConfig) -> float:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=0.0)
    )
    loader = DataLoader(make_data(), batch_size=BATCH, shuffle=True, drop_last=True)
    start, step = time.perf_counter(), 0
    while step < cfg.steps:
        for x, y in loader:
            loss = model(x, y)["loss"]
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == cfg.steps:
                break
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared: 2 threads under contention time barriers, not the loop
    base = dict(steps=STEPS, batch_size=BATCH, lr=1e-3, warmup_steps=10, eval_every=0, log_every=10)
    # Alternate the variants and keep each one's fastest repeat: the machine is shared.
    variants = [
        ("medvl fit, no checkpoints", dict(checkpoint_every=0)),
        ("medvl fit, checkpoint every 50 steps", dict(checkpoint_every=50)),
    ]
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(REPEATS):
            secs = bare_loop(TrainConfig(**base))
            best["bare PyTorch loop"] = min(best.get("bare PyTorch loop", (1e9, 0.0)), (secs, secs))
            for label, extra in variants:
                stage = BenchStage(TrainConfig(**base, **extra))
                result = fit(stage, Path(tmp) / f"{r}_{extra['checkpoint_every']}")
                train_seconds = STEPS * BATCH / result.images_per_second
                best[label] = min(best.get(label, (1e9, 0.0)), (train_seconds, result.seconds))
    bare = best["bare PyTorch loop"][0]
    rows = [(label, *best[label]) for label in ["bare PyTorch loop"] + [v[0] for v in variants]]
    print(
        f"\n{STEPS} steps, batch {BATCH}, MLP {sum(p.numel() for p in make_model().parameters()) / 1e6:.2f} M "
        f"parameters, fp32, {torch.get_num_threads()} threads"
    )
    print(
        f"(fastest of {REPEATS} alternating repeats; 'total s' adds start-up, validation, checkpoints, save)"
    )
    print(f"{'loop':40s} {'train s':>8s} {'steps/s':>8s} {'vs bare':>8s} {'total s':>8s}")
    for label, secs, total in rows:
        print(f"{label:40s} {secs:8.2f} {STEPS / secs:8.1f} {secs / bare:7.2f}x {total:8.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "steps": STEPS,
                "batch_size": BATCH,
                "repeats": REPEATS,
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "rows": [
                    {
                        "loop": label,
                        "train_seconds": round(s, 3),
                        "steps_per_second": round(STEPS / s, 2),
                        "ratio_to_bare": round(s / bare, 3),
                        "fit_total_seconds": round(t, 3),
                    }
                    for label, s, t in rows
                ],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

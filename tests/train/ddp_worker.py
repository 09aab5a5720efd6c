"""Run by tests/train/test_distributed.py under ``python -m torch.distributed.run --nproc_per_node 2``.

Trains the toy stage with :func:`medvl.train.loop.fit` (Accelerate picks up the torchrun
environment and uses gloo on CPU) and, after the last optimiser step, writes each rank's
weights to ``DUMP/rank_<r>.pt`` so the test can compare the ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.*

from medvl.train.distributed import finish_distributed_process  # noqa: E402
from medvl.train.loop import TrainConfig, fit  # noqa: E402
from tests.train.toy_stage import ToyConfig, ToyModelConfig, ToyStage  # noqa: E402


class DumpingStage(ToyStage):
    def __init__(self, config: ToyConfig, dump: Path, interrupt_at: int | None) -> None:
        super().__init__(config, interrupt_at=interrupt_at)
        self.dump = dump

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        if step == self.train.steps:
            rank = int(os.environ.get("RANK", "0"))
            torch.save(
                {k: v.detach().cpu() for k, v in model.state_dict().items()}, self.dump / f"rank_{rank}.pt"
            )
        super().on_step_end(model, step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dump", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--interrupt-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--late-rank1", type=float, default=0.0, help="rank 1 reaches fit() this many seconds after rank 0"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.late_rank1:
        # the process group joined before fit(), as the real stages do when they build a vocabulary
        from medvl.train.distributed import process_state

        process_state()
        if int(os.environ.get("RANK", "0")) == 1:
            time.sleep(args.late_rank1)
    cfg = ToyConfig(
        model=ToyModelConfig(dropout=0.0, samples=40),
        train=TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=1e-2,
            warmup_steps=1,
            checkpoint_every=2,
            eval_every=2,
            log_every=1,
        ),
    )
    fit(DumpingStage(cfg, args.dump, args.interrupt_at), args.out, resume=args.resume)
    finish_distributed_process(0)


if __name__ == "__main__":
    main()

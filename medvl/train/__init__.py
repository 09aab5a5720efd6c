"""Training: the shared loop (:mod:`medvl.train.loop`, with :mod:`~medvl.train.checkpoint`,
:mod:`~medvl.train.batches` and :mod:`~medvl.train.distributed`) and one module per stage
(:mod:`medvl.train.stages`)."""

from medvl.train.distributed import unwrap
from medvl.train.loop import FitResult, Stage, TrainConfig, fit

__all__ = ["FitResult", "Stage", "TrainConfig", "fit", "unwrap"]

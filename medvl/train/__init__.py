"""Training: the shared loop (:mod:`medvl.train.loop`) and the stage registry (:mod:`medvl.train.stages`)."""

from medvl.train.loop import FitResult, Stage, TrainConfig, fit, unwrap

__all__ = ["FitResult", "Stage", "TrainConfig", "fit", "unwrap"]

"""Deprecated home of the trainer: use :mod:`promptkd.train` (``from promptkd.train import TrainConfig,
train``). This module keeps the old import path working for the 0.2 release and warns."""

import warnings

from .errors import TrainingDiverged
from .train.checkpoints import checkpoints
from .train.config import TrainConfig
from .train.trainer import Trainer, train

warnings.warn("promptkd.trainer is deprecated: import train, Trainer and TrainConfig from promptkd.train",
              DeprecationWarning, stacklevel=2)

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "checkpoints", "train"]

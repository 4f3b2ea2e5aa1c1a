"""Deprecated home of ``TrainConfig``: use :mod:`promptkd.train` (``from promptkd.train import
TrainConfig``). This module keeps the old import path working for the 0.2 release and warns."""

import warnings

from .train.config import METHODS, TrainConfig, shipped_configs

warnings.warn("promptkd.config is deprecated: import TrainConfig from promptkd.train",
              DeprecationWarning, stacklevel=2)

__all__ = ["METHODS", "TrainConfig", "shipped_configs"]

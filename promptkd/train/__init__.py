"""Training: configuration (config), data (data), what each method computes (methods), the loop
(trainer), the run directory and checkpoints (checkpoints), processes (distributed), evaluation
(evaluate) and plots (plot).

    from promptkd.train import TrainConfig, train
    run_dir = train(TrainConfig(method="promptkd", student=..., teacher=..., train_file=...))

``TrainConfig`` is light to import; ``train`` and ``Trainer`` load the trainer (torch, the models'
code) on first use.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "Trainer", "train"]


def __getattr__(name: str):
    if name in ("Trainer", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Training: configuration (config), data (data), what each method computes (methods), the loop
(trainer), the run directory and checkpoints (checkpoints), processes (distributed), the teacher cache
(teacher_cache), evaluation (evaluate) and plots (plot).

    from promptkd.train import TrainConfig, train
    run_dir = train(TrainConfig(method="promptkd", student=..., teacher=..., train_file=...))

    from promptkd.train import cache_teacher
    cache_teacher(teacher, train_file, "caches/teacher", top_k=64)   # then: kd with teacher_cache="caches/teacher"

``TrainConfig`` is light to import; ``train``, ``Trainer``, ``cache_teacher`` and ``TeacherCache`` load the
trainer (torch, the models' code) on first use.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "Trainer", "train", "cache_teacher", "TeacherCache"]


def __getattr__(name: str):
    if name in ("Trainer", "train"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("cache_teacher", "TeacherCache"):
        from . import teacher_cache

        return getattr(teacher_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

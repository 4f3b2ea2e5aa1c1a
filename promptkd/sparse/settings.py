"""The keyword settings of the sparse-target KD loss, validated once, in one small object."""

from __future__ import annotations

from dataclasses import dataclass

from ..kd.settings import IGNORE_INDEX, REDUCTIONS, number

#: How far above 1 the teacher's probabilities on a row's ids may sum (their log-probabilities rounded to
#: the storage dtype) before the targets are refused; a sum in (1, 1 + tolerance] counts as 1.
SUM_TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-4, "float64": 1e-8}


@dataclass(frozen=True)
class SparseKDSettings:
    """Validated keyword settings of ``fused_linear_sparse_kd_loss`` / ``sparse_kd_loss``.

    Construction checks every value and raises ``ValueError`` / ``TypeError`` naming the argument.
    ``tail``: True for top-k targets (the teacher's remaining mass is one more bucket), False for sampled
    or renormalised targets (see ``promptkd.sparse.api``). ``student_logit_scale`` (> 0) and ``student_softcap``
    (> 0 or None): the student's logits z become softcap * tanh(scale * z / softcap) before the temperature, as
    ``promptkd.KDSettings``' fields of the same names.
    """

    tail: bool = True
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"
    vocab_size: int | None = None
    student_logit_scale: float = 1.0
    student_softcap: float | None = None

    def __post_init__(self):
        if not isinstance(self.tail, bool):
            raise TypeError(f"tail must be True or False, got {self.tail!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("temperature", "soft_weight", "hard_weight"):
            object.__setattr__(self, name, number(name, getattr(self, name)))
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.soft_weight < 0.0:
            raise ValueError(f"soft_weight must be >= 0, got {self.soft_weight}")
        if self.hard_weight < 0.0:
            raise ValueError(f"hard_weight must be >= 0, got {self.hard_weight}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        object.__setattr__(self, "student_logit_scale", number("student_logit_scale", self.student_logit_scale))
        if self.student_logit_scale <= 0.0:
            raise ValueError(f"student_logit_scale must be > 0, got {self.student_logit_scale}")
        if self.student_softcap is not None:
            object.__setattr__(self, "student_softcap", number("student_softcap", self.student_softcap))
            if self.student_softcap <= 0.0:
                raise ValueError(f"student_softcap must be > 0 (or None: no cap), got {self.student_softcap}")
        if self.vocab_size is not None:
            if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
                raise TypeError(f"vocab_size must be an int or None, got {type(self.vocab_size).__name__}")
            if self.vocab_size < 1:
                raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @property
    def has_hard(self) -> bool:
        return self.hard_weight > 0.0

    @property
    def transform(self) -> tuple[float, float | None]:
        """(scale, softcap) of the student's logits (``promptkd.kd.torch_impl.transform_``)."""
        return self.student_logit_scale, self.student_softcap

"""The keyword settings of a distillation loss, validated once, in one small object."""

from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
REDUCTIONS = ("mean", "sum", "none")
#: The label that marks a position without a target (the default ``ignore_index``; what collated batches use).
IGNORE_INDEX = -100

# Integer codes shared with the Triton kernels (kernels/common.py).
DIVERGENCE_CODES = {name: i + 1 for i, name in enumerate(DIVERGENCES)}


def number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python int or float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class KDSettings:
    """Validated keyword settings of ``fused_linear_kd_loss`` / ``kd_loss``.

    ``student_logit_scale`` / ``teacher_logit_scale`` (> 0) multiply a side's logits and
    ``student_softcap`` / ``teacher_softcap`` (> 0, or None) then cap them, c * tanh(z / c), as
    Cohere-style scales and Gemma 2's ``final_logit_softcapping`` do, before the temperature: the
    loss sees the logits the model itself gives.

    Construction checks every value and raises ``ValueError`` / ``TypeError`` naming the
    argument, so a settings object that exists is always valid.
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"
    vocab_size: int | None = None
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name in ("beta", "alpha", "temperature", "soft_weight", "hard_weight"):
            object.__setattr__(self, name, number(name, getattr(self, name)))
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(
                f"beta must lie strictly between 0 and 1 for divergence='jsd', got {self.beta}; "
                "for the endpoints use divergence='forward_kl' or 'reverse_kl'"
            )
        if self.divergence.startswith("skew") and not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must satisfy 0 <= alpha < 1 for {self.divergence!r}, got {self.alpha}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.soft_weight < 0.0:
            raise ValueError(f"soft_weight must be >= 0, got {self.soft_weight}")
        if self.hard_weight < 0.0:
            raise ValueError(f"hard_weight must be >= 0, got {self.hard_weight}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        for side in ("student", "teacher"):
            name = f"{side}_logit_scale"
            object.__setattr__(self, name, number(name, getattr(self, name)))
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
            name = f"{side}_softcap"
            if getattr(self, name) is not None:
                object.__setattr__(self, name, number(name, getattr(self, name)))
                if getattr(self, name) <= 0.0:
                    raise ValueError(f"{name} must be > 0 (or None: no cap), got {getattr(self, name)}")
        if self.vocab_size is not None:
            if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
                raise TypeError(f"vocab_size must be an int or None, got {type(self.vocab_size).__name__}")
            if self.vocab_size < 1:
                raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @property
    def has_hard(self) -> bool:
        return self.hard_weight > 0.0

    @property
    def transforms(self) -> bool:
        """Whether either side's logits are scaled or capped before the softmax."""
        return (self.student_logit_scale != 1.0 or self.teacher_logit_scale != 1.0
                or self.student_softcap is not None or self.teacher_softcap is not None)

    def transform(self, side: str) -> tuple[float, float | None]:
        """(scale, softcap) of ``side`` ("student" or "teacher"): its logits z become
        softcap * tanh(scale * z / softcap) (scale * z without a cap) before the temperature."""
        return getattr(self, f"{side}_logit_scale"), getattr(self, f"{side}_softcap")

    @property
    def mix_log_weights(self) -> tuple[float, float]:
        """(log weight of p, log weight of q) inside the mixture M of a JSD or skew divergence.

        jsd: M = beta*p + (1-beta)*q; skew_forward_kl: M = alpha*p + (1-alpha)*q;
        skew_reverse_kl: M = (1-alpha)*p + alpha*q. ``-inf`` stands for a zero weight.
        """

        def log(x: float) -> float:
            return math.log(x) if x > 0.0 else -math.inf

        if self.divergence == "jsd":
            return log(self.beta), log(1.0 - self.beta)
        if self.divergence == "skew_forward_kl":
            return log(self.alpha), log(1.0 - self.alpha)
        if self.divergence == "skew_reverse_kl":
            return log(1.0 - self.alpha), log(self.alpha)
        return 0.0, 0.0

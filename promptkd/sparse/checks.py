"""What makes sparse teacher targets unusable, found without a host synchronisation (:func:`target_problems`),
and the two ways the loss reacts: a ValueError naming the argument and the row where a check costs no device
synchronisation (CPU tensors, :func:`check_target_values`), NaN for that token's loss and gradient elsewhere
(never a finite, wrong value).

A row's targets are unusable when an id lies outside [0, vocab_size) and is not -1, a valid id repeats, a
valid id's log-probability is NaN, or the probabilities of the valid ids sum above 1 + tolerance (the
``SUM_TOLERANCE`` of the log-probabilities' dtype: they were rounded to it).
"""

from __future__ import annotations

import torch


def target_problems(ids: torch.Tensor, lp: torch.Tensor, vocab: int, tolerance: float) -> dict[str, torch.Tensor]:
    """[N] bool masks of the rows of ids / lp [N, k] with each problem: ``range``, ``repeat``, ``nan``, ``sum``."""
    valid = ids >= 0
    bad_range = ((ids < -1) | (ids >= vocab)).any(1)
    k = ids.shape[1]
    # Invalid slots get distinct negative stand-ins, so that only valid ids can repeat.
    keyed = torch.where(valid, ids, -2 - torch.arange(k, device=ids.device)).sort(1).values
    repeat = (keyed[:, 1:] == keyed[:, :-1]).any(1) if k > 1 else torch.zeros_like(bad_range)
    nan = (valid & lp.isnan()).any(1)
    p_sum = torch.where(valid & ~lp.isnan(), lp.double().exp(), 0.0).sum(1)
    return {"range": bad_range, "repeat": repeat, "nan": nan, "sum": p_sum > 1.0 + tolerance}


def bad_rows(ids: torch.Tensor, lp: torch.Tensor, vocab: int, tolerance: float) -> torch.Tensor:
    """[N] bool: rows with any problem (device tensors, no synchronisation)."""
    problems = target_problems(ids, lp, vocab, tolerance)
    return problems["range"] | problems["repeat"] | problems["nan"] | problems["sum"]


def check_target_values(ids: torch.Tensor, lp: torch.Tensor, vocab: int, tolerance: float) -> None:
    """ValueError naming the first unusable row of ids / lp [N, k] (a host read: CPU tensors)."""
    problems = target_problems(ids, lp, vocab, tolerance)
    for name, mask in problems.items():
        if not bool(mask.any()):
            continue
        row = int(mask.nonzero()[0, 0])
        values = ids[row].tolist()
        if name == "range":
            bad = next(v for v in values if v < -1 or v >= vocab)
            raise ValueError(f"teacher_ids must lie in [0, vocab_size={vocab}) or be -1 (no target); flattened "
                             f"row {row} holds {bad}")
        if name == "repeat":
            seen = set()
            dup = next(v for v in values if v >= 0 and (v in seen or seen.add(v)))
            raise ValueError(f"teacher_ids must not repeat an id within a row; flattened row {row} holds {dup} twice")
        if name == "nan":
            raise ValueError(f"teacher_logprobs is NaN at a target of flattened row {row}")
        p_sum = float(torch.where(ids[row] >= 0, lp[row].double().exp(), 0.0).sum())
        raise ValueError(f"teacher_logprobs: the probabilities of flattened row {row} sum to {p_sum:.6g}, above "
                         f"1 + {tolerance:g} (log-probabilities are expected, e.g. log_softmax of the teacher's "
                         "logits / T, not logits)")

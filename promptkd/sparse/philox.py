"""Philox4x32-10 in torch integer ops: the random numbers of ``fused_linear_topk(samples=S)``.

Draw ``s`` of a row with key ``key`` (uint64, as int64 bits) and counter ``counter`` (uint64) is the
double ``((w0 >> 5) * 2**26 + (w1 >> 6)) / 2**53`` in [0, 1), where (w0, w1, w2, w3) are the Philox4x32-10
words (Salmon et al., SC 2011) of key (key low, key high) and counter words (counter low, counter high,
s, 0). The native kernel (``kernels/cpu/sparse_rows.cpp``) draws the same numbers bit for bit, and the
generator is Triton's ``tl.philox`` (tests compare the three). Every value is held in int64 and every
product is split so that no intermediate exceeds 63 bits: the same on any device.
"""

from __future__ import annotations

import torch

ROUNDS = 10
MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of ``a`` (uint32 values in int64) and the constant ``m``."""
    lo16 = a * (m & 0xFFFF)  # < 2**48
    hi16 = a * (m >> 16)  # < 2**48
    low_sum = lo16 + ((hi16 & 0xFFFF) << 16)  # < 2**49
    return ((hi16 >> 16) + (low_sum >> 32)) & MASK32, low_sum & MASK32


def philox(key: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
           c3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four words of Philox4x32-10 for int64 tensors (broadcast together): ``key`` holds 64-bit keys (any
    int64 bits), ``c0..c3`` 32-bit counter words."""
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + KEY_STEPS[0]) & MASK32, (k1 + KEY_STEPS[1]) & MASK32
    return c0, c1, c2, c3


def uniforms(keys: torch.Tensor, counters: torch.Tensor, samples: int) -> torch.Tensor:
    """[rows, samples] float64 uniforms in [0, 1): draw s of row i from (``keys[i]``, ``counters[i]``, s)."""
    keys, counters = keys.long()[:, None], counters.long()[:, None]
    draw = torch.arange(samples, device=keys.device, dtype=torch.int64)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=keys.device)
    w0, w1, _, _ = philox(keys, counters & MASK32, (counters >> 32) & MASK32, draw, zero)
    return ((w0 >> 5).double() * 67108864.0 + (w1 >> 6).double()) / 9007199254740992.0

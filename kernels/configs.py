"""Launch configurations of the KD kernels, in one place.

The launchers pick from these tables only; tests/test_compile.py compiles every entry for sm_80
and sm_90 ahead of time, so a configuration that cannot compile or overflows shared memory fails CI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden-dimension step of the logit GEMM
    num_warps: int
    num_stages: int


# (kernel, operand bytes) -> configurations, smallest block_n first. The launcher takes the first whose
# block_n covers the token count, else the last. 16-bit operands take twice the hidden step of float32.
CONFIGS = {
    ("forward", 2): (TileConfig(16, 128, 64, 4, 3), TileConfig(64, 128, 64, 8, 3)),
    ("forward", 4): (TileConfig(16, 128, 32, 4, 3), TileConfig(64, 128, 32, 8, 3)),
    ("backward", 2): (TileConfig(16, 128, 64, 4, 3), TileConfig(64, 128, 64, 8, 3)),
    ("backward", 4): (TileConfig(16, 128, 32, 4, 3), TileConfig(64, 128, 32, 8, 3)),
}


def pick(kernel: str, element_size: int, n_tokens: int) -> TileConfig:
    options = CONFIGS[(kernel, 2 if element_size <= 2 else 4)]
    for cfg in options:
        if n_tokens <= cfg.block_n:
            return cfg
    return options[-1]


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# Prefix attention: (kernel, operand bytes, BLOCK_D) -> configuration. BLOCK_D is the head dim rounded
# up to 64 or 128 (smaller powers would add compile variants for no common model). "forward" walks keys
# for a query block; "dq" likewise; "dkdv" (own and prefix keys) walks query blocks for a key block.
# One row per kernel, one column per (operand bytes, BLOCK_D); entries (block_m, block_n, warps, stages).
_ATTENTION_COLUMNS = ((2, 64), (2, 128), (4, 64), (4, 128))
_ATTENTION_TILES = {
    "forward": ((128, 64, 8, 3), (128, 32, 8, 2), (16, 16, 4, 2), (16, 16, 4, 2)),
    "dq": ((64, 64, 4, 2), (64, 64, 8, 2), (16, 16, 4, 1), (16, 16, 4, 2)),
    "dkdv": ((32, 64, 4, 2), (64, 64, 8, 2), (16, 16, 4, 1), (16, 16, 4, 2)),
}
ATTENTION_CONFIGS = {
    (kernel, size, block_d): AttentionConfig(*tiles)
    for kernel, row in _ATTENTION_TILES.items()
    for (size, block_d), tiles in zip(_ATTENTION_COLUMNS, row, strict=True)
}
#: The largest head dim the prefix-attention kernels take.
ATTENTION_MAX_HEAD_DIM = 128


def attention_block_d(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def pick_attention(kernel: str, element_size: int, head_dim: int) -> AttentionConfig:
    return ATTENTION_CONFIGS[(kernel, 2 if element_size <= 2 else 4, attention_block_d(head_dim))]

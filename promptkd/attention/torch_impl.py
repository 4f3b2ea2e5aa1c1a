"""``impl="torch"``: prefix attention on ``scaled_dot_product_attention`` (CPU and fallback).

Each sample's prefix is put in front of its keys and a boolean [B, 1, N, P + N] mask (1 byte per
entry, shared by the heads) describes the pattern, so SDPA's fused CPU/GPU kernels run and no
[B, H, N, P + N] float score tensor is kept. The prefix enters through ``expand`` (one group) or a
one-hot matmul (several groups), whose backward sums the samples' prefix gradients in a fixed order.

Masked keys and values are zeroed first and rows that see nothing are selected to exactly 0 (their
queries too), so NaN or inf stored in masked positions reaches no output and no gradient. Double
backward: SDPA's fused kernels have no derivative of their backward (a cryptic error, or on some
backends a different graph), so the gradients flowing back through SDPA refuse to be differentiated
(``promptkd.autograd.first_order``); use impl="reference" for second derivatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..autograd import first_order
from .masks import allowed_mask, zero_masked

OP = "prefix_attention (impl='torch')"


def _spread(prefix: torch.Tensor, group: torch.Tensor, batch: int) -> torch.Tensor:
    """[G, H, P, D] -> [B, H, P, D], sample b getting prefix group[b]; backward: deterministic sum."""
    if prefix.shape[0] == 1:
        return prefix.expand(batch, *prefix.shape[1:])
    onehot = F.one_hot(group, prefix.shape[0]).to(prefix.dtype)  # [B, G]
    return (onehot @ prefix.reshape(prefix.shape[0], -1)).reshape(batch, *prefix.shape[1:])


def prefix_attention_torch(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale):
    b, _, n, _ = q.shape
    p = prefix_k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    # Zeroed per group, before the one-hot spread: 0 * NaN of another group's padding would be NaN.
    k, v, prefix_k, prefix_v = zero_masked(k, v, prefix_k, prefix_v, lengths, key_padding_mask)
    if p or prefix_k.requires_grad or prefix_v.requires_grad:  # an empty prefix still gets its (empty) gradient
        k = torch.cat([_spread(prefix_k, group, b), k], dim=2)
        v = torch.cat([_spread(prefix_v, group, b), v], dim=2)
    causal = p == 0 and key_padding_mask is None
    mask = alive = None
    if not causal:
        mask = allowed_mask(group, lengths, key_padding_mask, n, p)  # [B, 1, N, P+N]
    if key_padding_mask is not None:
        # A row that sees nothing: let it see everything (SDPA backends disagree on empty rows) with q = 0,
        # then select 0 (torch.where, not a product: 0 * NaN is NaN). Its zero output gradient then adds
        # exactly 0 to dk and dv, and its q (maybe NaN) gets a zero gradient.
        alive = mask.any(-1, keepdim=True)  # [B, 1, N, 1]
        q, mask = torch.where(alive, q, 0), mask | ~alive
    q, k, v = first_order(OP, q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    return out if alive is None else torch.where(alive, out, 0)

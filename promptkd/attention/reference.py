"""Plain-torch reference of prefix attention: the oracle of the tests (in float64) and ``impl="reference"``.

Each sample's prefix is gathered and concatenated in front of its own keys, and an explicit
[B, 1, N, P + N] mask says who sees what. It materializes the [B, Hq, N, P + N] scores: for checking.
Masked keys and values and the queries of rows that see nothing are zeroed first (``masks.zero_masked``):
whatever they hold (NaN, inf) reaches no output and no gradient. Plain autograd: double backward works.
"""

from __future__ import annotations

import torch

from .masks import allowed_mask, zero_masked


def prefix_attention_reference(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale, softcap=None):
    """Output [B, Hq, N, D] in q's dtype; products in the inputs' dtype, softmax in float32 for 16-bit
    inputs (as eager attention does). Rows that see no key give 0. ``softcap``: scores become
    softcap * tanh(scores / softcap) before the mask (Gemma 2's attention softcapping)."""
    n, p = q.shape[2], prefix_k.shape[2]
    rep = q.shape[1] // k.shape[1]
    allowed = allowed_mask(group, lengths, key_padding_mask, n, p)
    k, v, prefix_k, prefix_v = zero_masked(k, v, prefix_k, prefix_v, lengths, key_padding_mask)
    q = torch.where(allowed.any(-1, keepdim=True), q, 0)  # a row that sees nothing: its q must not reach dk
    keys = torch.cat([prefix_k[group], k], dim=2).repeat_interleave(rep, dim=1)  # [B, Hq, P+N, D]
    values = torch.cat([prefix_v[group], v], dim=2).repeat_interleave(rep, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [B, Hq, N, P+N]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    soft_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = scores.to(soft_dtype).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=q.device))
    return probs.to(q.dtype) @ values

"""Plain-torch reference of prefix attention: the oracle of the tests (in float64) and ``impl="reference"``.

Each sample's prefix is gathered and concatenated in front of its own keys, and an explicit
[B, 1, N, P + N] mask says who sees what. It materializes the [B, Hq, N, P + N] scores: for checking.
"""

from __future__ import annotations

import torch


def allowed_mask(group: torch.Tensor, lengths: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 n: int, p: int) -> torch.Tensor:
    """[B, 1, N, P + N] bool: query i of sample b sees prefix key j < lengths[group[b]] and own key j <= i
    with key_padding_mask[b, j]."""
    device = group.device
    b = group.shape[0]
    prefix = torch.ones(b, p, dtype=torch.bool, device=device)
    if lengths is not None:
        prefix = torch.arange(p, device=device)[None, :] < lengths[group][:, None]
    own = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None].expand(b, n, n)
    if key_padding_mask is not None:
        own = own & key_padding_mask[:, None, :]
    return torch.cat([prefix[:, None, :].expand(b, n, p), own], dim=2)[:, None]


def prefix_attention_reference(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale):
    """Output [B, Hq, N, D] in q's dtype; products in the inputs' dtype, softmax in float32 for 16-bit
    inputs (as eager attention does). Rows that see no key give 0."""
    n, p = q.shape[2], prefix_k.shape[2]
    rep = q.shape[1] // k.shape[1]
    keys = torch.cat([prefix_k[group], k], dim=2).repeat_interleave(rep, dim=1)  # [B, Hq, P+N, D]
    values = torch.cat([prefix_v[group], v], dim=2).repeat_interleave(rep, dim=1)
    allowed = allowed_mask(group, lengths, key_padding_mask, n, p)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [B, Hq, N, P+N]
    soft_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = scores.to(soft_dtype).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=q.device))
    return probs.to(q.dtype) @ values

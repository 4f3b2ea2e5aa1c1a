"""Plain-torch reference of prefix attention: the oracle of the tests (in float64) and ``impl="reference"``.

Each sample's prefix is gathered and concatenated in front of its own keys, and an explicit
[B, 1, N, P + N] mask says who sees what. It materializes the [B, Hq, N, P + N] scores: for checking.
Masked keys and values and the queries of rows that see nothing are zeroed first (``zero_masked``):
whatever they hold (NaN, inf) reaches no output and no gradient. Plain autograd: double backward works.
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


def zero_masked(k, v, prefix_k, prefix_v, lengths: torch.Tensor | None, key_padding_mask: torch.Tensor | None):
    """(k, v, prefix_k, prefix_v) with the masked positions set to 0, out of place (autograd gives them a zero
    gradient): own keys/values where key_padding_mask is False, prefix keys/values j >= lengths[g]. Masking
    scores alone is not enough: a zero probability times a NaN or infinite value is NaN."""
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]  # [B, 1, N, 1]
        k, v = torch.where(keep, k, 0), torch.where(keep, v, 0)
    if lengths is not None:
        real = (torch.arange(prefix_k.shape[2], device=lengths.device) < lengths[:, None])[:, None, :, None]
        prefix_k, prefix_v = torch.where(real, prefix_k, 0), torch.where(real, prefix_v, 0)  # [G, 1, P, 1]
    return k, v, prefix_k, prefix_v


def prefix_attention_reference(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, scale):
    """Output [B, Hq, N, D] in q's dtype; products in the inputs' dtype, softmax in float32 for 16-bit
    inputs (as eager attention does). Rows that see no key give 0."""
    n, p = q.shape[2], prefix_k.shape[2]
    rep = q.shape[1] // k.shape[1]
    allowed = allowed_mask(group, lengths, key_padding_mask, n, p)
    k, v, prefix_k, prefix_v = zero_masked(k, v, prefix_k, prefix_v, lengths, key_padding_mask)
    q = torch.where(allowed.any(-1, keepdim=True), q, 0)  # a row that sees nothing: its q must not reach dk
    keys = torch.cat([prefix_k[group], k], dim=2).repeat_interleave(rep, dim=1)  # [B, Hq, P+N, D]
    values = torch.cat([prefix_v[group], v], dim=2).repeat_interleave(rep, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [B, Hq, N, P+N]
    soft_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = scores.to(soft_dtype).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=q.device))
    return probs.to(q.dtype) @ values

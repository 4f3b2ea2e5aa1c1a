"""Who sees what in prefix attention, for the implementations that build the pattern in torch
(``reference`` and ``torch``): the boolean [B, 1, N, P + N] mask, and masked keys and values set to 0."""

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

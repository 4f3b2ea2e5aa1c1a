"""``impl="triton"``: launchers of the fused prefix-attention kernels (the autograd glue: ``promptkd.attention.ops``).

Forward (kernels/prefix_attention_forward.py): one program per (query block, sample x query head)
walks the group's prefix keys and its own keys up to the diagonal with an online softmax in base 2,
and stores the output and one combined log-sum-exp per row (float32; +inf for a row that sees
nothing, whose output is 0). A softcap (Gemma 2's attention) caps each score tile in float32 (the
backward recomputes the tile's tanh for the cap's derivative).

Backward (kernels/prefix_attention_backward.py): the dQ kernel also computes delta = rowsum(dO * O);
the own-keys kernel writes dK, dV of each sample's keys; the prefix kernel writes float32 partial
prefix dK, dV per (group, split of the group's samples), summed here over the splits in a fixed
order: the same bits on every run, no atomics. Only the requested gradients are computed, and
nothing waits on the device (no host synchronisation).

Masked keys and values are read as 0 (masked loads) and the queries of rows that see nothing as 0 in
the dK kernel, so NaN or inf stored there reaches no output and no gradient.
"""

from __future__ import annotations

import math

import torch

from .. import launch
from ..kernels import configs
from ..kernels.prefix_attention_backward import (
    prefix_attention_dkdv_kernel,
    prefix_attention_dq_kernel,
    prefix_attention_prefix_dkdv_kernel,
)
from ..kernels.prefix_attention_forward import prefix_attention_forward_kernel

#: Prefix-gradient splits per group under the interpreter (on CUDA: enough programs for the SMs).
INTERPRETER_SPLITS = 3


def _splits(device: torch.device, programs: int, batch: int) -> int:
    """Splits of each group's samples in the prefix-gradient kernel: about two programs per SM."""
    if device.type != "cuda":
        return max(1, min(batch, INTERPRETER_SPLITS))
    sms = launch.sm_count(device)
    return max(1, min(batch, launch.cdiv(2 * sms, programs)))


def _switches(x: torch.Tensor, kernel: str) -> dict:
    """Tiles, warps and the precision switches: UPCAST multiplies bfloat16 in float32 under the
    interpreter (its bfloat16 tl.dot is wrong); float32 uses tf32 only where torch matmuls may.
    Fused multiply-adds stay on (kernels/aot.py compiles the same way)."""
    d = x.shape[-1]
    cfg = configs.pick_attention(kernel, x.element_size(), d)
    block_d = configs.attention_block_d(d)
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    options = {} if launch.interpreting() else {"enable_fp_fusion": True}  # explicit: Triton's default may change
    return dict(UPCAST=launch.interpreting() and x.dtype == torch.bfloat16, PRECISION="tf32" if tf32 else "ieee",
                EVEN_D=d == block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor):
    """The kernels read keys and values (own or prefix) with one set of strides."""
    a, b = _unit_stride(a), _unit_stride(b)
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _caps(scale: float, softcap: float | None) -> tuple[float, float, bool]:
    """The kernels' (cap_scale, cap_l2, HAS_CAP): capped base-2 scores are cap_l2 * tanh(cap_scale * q . k)."""
    if softcap is None:
        return 1.0, 1.0, False
    return scale / softcap, softcap * math.log2(math.e), True


def triton_forward(q, k, v, pk, pv, lengths, group, key_padding_mask, scale: float, softcap: float | None = None):
    """(output [B, Hq, N, D] in q's dtype, log-sum-exp [B, Hq, N] float32) on inputs laid out by :func:`prepare`;
    ``softcap``: the scores become softcap * tanh(scores / softcap)."""
    keep = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    b, hq, n, d = q.shape
    o = launch.buffer(q.shape, q.dtype, q.device)
    lse = launch.buffer((b, hq, n), torch.float32, q.device)
    sw = _switches(q, "forward")
    grid = (launch.cdiv(n, sw["BLOCK_M"]), b * hq)
    cap_scale, cap_l2, has_cap = _caps(scale, softcap)
    prefix_attention_forward_kernel[grid](
        q, k, v, pk, pv, group if lengths is None else lengths, group, group if keep is None else keep, o, lse,
        n, pk.shape[2], d, hq, hq // k.shape[1], scale * math.log2(math.e), cap_scale, cap_l2,
        *_strides(q), *_strides(k), *_strides(pk), *_strides(o),
        HAS_LENGTHS=lengths is not None, HAS_PADDING=keep is not None, HAS_CAP=has_cap, **sw)
    return o, lse


def triton_backward(grad_out, q, k, v, pk, pv, o, lse, lengths, group, key_padding_mask, scale: float, need,
                    softcap: float | None = None) -> list:
    """The gradients of q, k, v, prefix_k, prefix_v flagged in ``need`` (None for the others), in their dtypes;
    ``o`` and ``lse`` from :func:`triton_forward` on the same inputs (the same ``softcap``)."""
    keep = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    b, hq, n, d = q.shape
    hkv, (g, _, p, _) = k.shape[1], pk.shape
    device = q.device
    grads = [None] * 5
    if not any(need):
        return grads
    do = grad_out.contiguous()  # shares the strides of o (contiguous)
    qk_scale = scale * math.log2(math.e)
    cap_scale, cap_l2, has_cap = _caps(scale, softcap)
    common = (n, d, hq, hq // hkv, qk_scale, scale, cap_scale, cap_l2)

    delta = launch.buffer((b, hq, n), torch.float32, device)
    if need[0]:
        grads[0] = launch.buffer(q.shape, q.dtype, device)
    sw = _switches(q, "dq")
    prefix_attention_dq_kernel[(launch.cdiv(n, sw["BLOCK_M"]), b * hq)](
        q, k, v, pk, pv, group if lengths is None else lengths, group, group if keep is None else keep,
        o, do, lse, delta, q if grads[0] is None else grads[0],
        n, p, d, hq, hq // hkv, qk_scale, scale, cap_scale, cap_l2,
        *_strides(q), *_strides(k), *_strides(pk), *_strides(o),
        NEED_DQ=need[0], HAS_LENGTHS=lengths is not None, HAS_PADDING=keep is not None, HAS_CAP=has_cap, **sw)

    sw = _switches(q, "dkdv")
    if need[1] or need[2]:
        dk = launch.buffer(k.shape, k.dtype, device) if need[1] else None
        dv = launch.buffer(v.shape, v.dtype, device) if need[2] else None
        out = dk if dk is not None else dv
        prefix_attention_dkdv_kernel[(launch.cdiv(n, sw["BLOCK_N"]), b * hkv)](
            q, k, v, group if keep is None else keep, do, lse, delta, out if dk is None else dk,
            out if dv is None else dv, *common,
            *_strides(q), *_strides(k), *_strides(o), *_strides(out),
            NEED_DK=need[1], NEED_DV=need[2], HAS_PADDING=keep is not None, HAS_CAP=has_cap, **sw)
        grads[1], grads[2] = dk, dv

    if need[3] or need[4]:
        if p == 0:
            grads[3] = torch.zeros_like(pk) if need[3] else None
            grads[4] = torch.zeros_like(pv) if need[4] else None
        else:
            # Samples of each group: order[offsets[g]:offsets[g + 1]], computed on the device.
            sorted_group, order = torch.sort(group, stable=True)
            offsets = torch.searchsorted(sorted_group, torch.arange(g + 1, device=device))
            blocks = launch.cdiv(p, sw["BLOCK_N"])
            splits = _splits(device, blocks * g * hkv, b)
            shape = (splits, g, hkv, p, d)
            dpk = launch.buffer(shape, torch.float32, device) if need[3] else None
            dpv = launch.buffer(shape, torch.float32, device) if need[4] else None
            out = dpk if dpk is not None else dpv
            prefix_attention_prefix_dkdv_kernel[(blocks, g * hkv, splits)](
                q, pk, pv, group if lengths is None else lengths, order, offsets, do, lse, delta,
                out if dpk is None else dpk, out if dpv is None else dpv,
                n, p, d, hq, hq // hkv, qk_scale, scale, cap_scale, cap_l2,
                *_strides(q), *_strides(pk), *_strides(o), *out.stride()[:4],
                NEED_DK=need[3], NEED_DV=need[4], HAS_LENGTHS=lengths is not None, HAS_CAP=has_cap, **sw)
            # Sum over splits in a fixed order (deterministic), then cast.
            grads[3] = None if dpk is None else dpk.sum(0).to(pk.dtype)
            grads[4] = None if dpv is None else dpv.sum(0).to(pv.dtype)
    return grads


def prepare(q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask):
    """Arguments checked and normalised by ``promptkd.attention.api`` (lengths int64 [G] or None, group int64
    [B] and key_padding_mask bool [B, N] or None, on the inputs' device), laid out as the kernels read them:
    unit stride along D, keys and values (own, prefix) with one set of strides, index tensors contiguous.
    Head dims up to 128 (non-powers of two are masked)."""
    d = q.shape[-1]
    if d > configs.ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"impl='triton' supports head dims up to {configs.ATTENTION_MAX_HEAD_DIM}, got {d} "
                         "(use impl='torch')")
    k, v = _same_strides(k, v)
    prefix_k, prefix_v = _same_strides(prefix_k, prefix_v)
    return (_unit_stride(q), k, v, prefix_k, prefix_v, None if lengths is None else lengths.contiguous(),
            group.contiguous(), None if key_padding_mask is None else key_padding_mask.contiguous())


def empty_output(q, k, v, prefix_k, prefix_v):
    """The output of an empty query set, connected to the inputs so that their gradients are zeros."""
    zero = sum(x.sum() * 0 for x in (k, v, prefix_k, prefix_v))
    return q * 0 + zero

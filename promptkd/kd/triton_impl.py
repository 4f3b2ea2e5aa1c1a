"""``impl="triton"``: launchers of the fused KD kernels (the autograd glue: ``promptkd.kd.ops``).

Forward: one Triton pass (forward/reverse KL) or two (log-sum-exps, then the mixture sums of JSD
and the skew KLs) over (token block x vocabulary split) programs; per-split statistics combine
over splits in a fixed order, so results are deterministic. No [tokens, vocab] tensor exists.
The planes of the statistics buffers are named in kernels/kd_planes.py (shared with the kernels).

Backward: the kernel recomputes logit tiles for one vocabulary chunk of all tokens and writes the
logit gradient of that chunk (at most ``BACKWARD_CHUNK_BYTES`` per side); cuBLAS turns it into
hidden, weight and bias gradients (deterministic: no atomics). Hidden gradients accumulate over
chunks in float32; weight and bias rows of a chunk are written once.
"""

from __future__ import annotations

import torch

from .. import launch
from ..kernels import configs
from ..kernels import kd_planes as plane
from ..kernels.kd_backward import kd_backward_kernel
from ..kernels.kd_forward import kd_online_kernel, kd_terms_kernel
from .settings import DIVERGENCE_CODES, KDSettings
from .tokens import row_scale

#: Bytes of one side's logit-gradient chunk [N, chunk of V] in backward.
BACKWARD_CHUNK_BYTES = 64 << 20


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: still exercise several vocabulary splits
    return 2 * launch.sm_count(device)


def _compile_switches(x: torch.Tensor) -> dict:
    """UPCAST / PRECISION: exact float32 products where tl.dot needs them. Fused multiply-adds are off
    so that the forward and backward kernels round a = s / T and a - max(a) identically."""
    upcast = launch.interpreting() and x.dtype == torch.bfloat16
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    options = {} if launch.interpreting() else {"enable_fp_fusion": False}
    return dict(UPCAST=upcast, PRECISION="tf32" if tf32 else "ieee", **options)


def _side_args(x, w, b):
    """(X, W, B, D, stride_x, stride_w, HAS_BIAS) of one side; W is None for logits input."""
    if w is None:
        return x, x, x, 0, x.stride(0), 0, False
    return x, w, (x if b is None else b), x.shape[1], x.stride(0), w.stride(0), b is not None


def _transforms(settings: KDSettings) -> tuple[tuple, dict]:
    """The logit transforms as the kernels take them: (s_scale, s_cap, t_scale, t_cap) runtime floats (a cap of
    1.0 where there is none: unread), and the S_CAP / T_CAP switches."""
    (s_scale, s_cap), (t_scale, t_cap) = settings.transform("student"), settings.transform("teacher")
    return (s_scale, s_cap or 1.0, t_scale, t_cap or 1.0), dict(S_CAP=s_cap is not None, T_CAP=t_cap is not None)


def _combine_lse(m: torch.Tensor, sums: torch.Tensor):
    """Merge per-split (max, rescaled sum) [N, splits] into (global max, sum) [N], in a fixed order."""
    mx = m.amax(1)
    return mx, (sums * torch.exp(m - mx[:, None])).sum(1)


def _combine_centred(m, sums, acc, at, m_all, sums_all):
    """Merge the per-split centred sums of a KL (see kd_online_kernel): returns (acc / l, x_at), each [N].

    The split that holds the global maximum provides x_at; the others shift by l ((m - M) - (x_at_k - x_at)).
    """
    x_at = at.gather(1, m.argmax(1, keepdim=True))[:, 0]
    acc = (torch.exp(m - m_all[:, None]) * (acc + sums * ((m - m_all[:, None]) - (at - x_at[:, None])))).sum(1)
    return acc / sums_all, x_at


def _forward(xs, ws, bs, xt, wt, bt, labels, settings: KDSettings):
    n, vocab, device = xs.shape[0], settings.vocab_size, xs.device
    code = DIVERGENCE_CODES[settings.divergence]
    inv_t = 1.0 / settings.temperature
    lw_p, lw_q = settings.mix_log_weights
    cfg = configs.pick("forward", xs.element_size(), n)
    n_tiles = launch.cdiv(vocab, cfg.block_v)
    row_blocks = launch.cdiv(n, cfg.block_n)
    splits = min(n_tiles, max(1, launch.cdiv(_target_programs(device), row_blocks)))
    tiles_per_split = launch.cdiv(n_tiles, splits)
    splits = launch.cdiv(n_tiles, tiles_per_split)  # every split holds at least one real column

    XS, WS, BS, DS, sxs, sws, has_bs = _side_args(xs, ws, bs)
    XT, WT, BT, DT, sxt, swt, has_bt = _side_args(xt, wt, bt)
    forms, caps = _transforms(settings)
    common = dict(FROM_LOGITS=ws is None, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, HAS_BIAS_S=has_bs, HAS_BIAS_T=has_bt,
                  **caps, **_compile_switches(xs))
    grid = (row_blocks, splits)
    online = code if settings.divergence in ("forward_kl", "reverse_kl") else 0
    stats = launch.buffer((plane.STAT_PLANES, n, splits), torch.float32, device)
    kd_online_kernel[grid](
        XS, WS, BS, XT, WT, BT, XS if labels is None else labels, stats,
        n, vocab, DS, DT, sxs, sws, sxt, swt, n * splits, tiles_per_split, inv_t, *forms,
        DIVERGENCE=online, HAS_HARD=settings.has_hard, **common)
    stat = stats.unbind(0)  # per split
    rows = launch.buffer((plane.GRAD, n), torch.float32, device)  # per token: all planes but GRAD (backward's)
    row = rows.unbind(0)
    ma, la = _combine_lse(stat[plane.MAX_A], stat[plane.SUM_A])
    mb, lb = _combine_lse(stat[plane.MAX_B], stat[plane.SUM_B])
    lla, llb = la.log(), lb.log()
    for k, value in ((plane.MAX_A, ma), (plane.SUM_A, lla), (plane.MAX_B, mb), (plane.SUM_B, llb)):
        row[k].copy_(value)
    if settings.divergence == "forward_kl":  # row planes: CP <- C = acc / l_b, CQ <- a_at
        c, a_at = _combine_centred(stat[plane.MAX_B], stat[plane.SUM_B], stat[plane.ACC], stat[plane.AT], mb, lb)
        div = c - llb + (ma - a_at) + lla
        cp, cq = c, a_at
    elif settings.divergence == "reverse_kl":  # row planes: CP <- b_at, CQ <- C = acc / l_a
        c, b_at = _combine_centred(stat[plane.MAX_A], stat[plane.SUM_A], stat[plane.ACC], stat[plane.AT], ma, la)
        div = c - lla + (mb - b_at) + llb
        cp, cq = b_at, c
    else:
        partial = launch.buffer((plane.TERM_PLANES, n, splits), torch.float32, device)
        kd_terms_kernel[grid](
            XS, WS, BS, XT, WT, BT, rows, partial,
            n, vocab, DS, DT, sxs, sws, sxt, swt, n * splits, tiles_per_split, inv_t, lw_p, lw_q, *forms,
            DIVERGENCE=code, **common)
        term = partial.sum(2).unbind(0)
        div, cp, cq = term[plane.F_SUM], term[plane.GP_SUM], term[plane.GQ_SUM]
    per_token = settings.soft_weight * div
    mc, llc = torch.zeros_like(ma), torch.zeros_like(ma)
    if settings.has_hard:
        mc, lc = _combine_lse(stat[plane.MAX_C], stat[plane.SUM_C])
        llc = lc.log()
        # A label outside [0, V) matches no column (target 0): finish_forward makes that token's loss NaN.
        ce = (mc - stat[plane.TARGET].sum(1)) + llc
        per_token = per_token + settings.hard_weight * ce
    for k, value in ((plane.MAX_C, mc), (plane.SUM_C, llc), (plane.CP, cp), (plane.CQ, cq)):
        row[k].copy_(value)
    return per_token, rows


def _linear_grads(dz, x, w, b, v0: int, v1: int, needs, grads):
    """Hidden, weight and bias gradients of one vocabulary chunk's logit gradient dz [N, v1 - v0]."""
    if needs[0]:
        if grads[0].dtype == dz.dtype:
            grads[0].addmm_(dz, w[v0:v1])
        else:  # 16-bit: products per chunk, accumulated in float32
            grads[0] += dz @ w[v0:v1]
    if needs[1]:
        torch.mm(dz.t(), x, out=grads[1][v0:v1])
    if b is not None and needs[2]:
        grads[2][v0:v1] = dz.sum(0, dtype=torch.float32)


def triton_backward(grad_out, xs, ws, bs, xt, wt, bt, labels, rows, settings: KDSettings, need) -> list:
    """The gradients of ``grad_out`` (scalar, or [N] for ``reduction="none"``) for the inputs flagged in
    ``need`` (xs, ws, bs, xt, wt, bt), each in its input's dtype, None for the others. ``rows``: the
    per-token statistics of :func:`triton_forward`."""
    need_s, need_t = any(need[0:3]), any(need[3:6])
    n, vocab, device = xs.shape[0], settings.vocab_size, xs.device
    from_logits = ws is None
    gs, gt = [None] * 3, [None] * 3
    for grads, (x, w, b), needs in ((gs, (xs, ws, bs), need[0:3]), (gt, (xt, wt, bt), need[3:6])):
        if needs[0]:
            if from_logits:
                grads[0] = torch.zeros_like(x) if x.shape[1] > vocab else launch.buffer(x.shape, x.dtype, device)
            else:
                grads[0] = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=device)
        # Every real row [0, vocab) of a weight or bias gradient is written once by its chunk (when there
        # are tokens): zero only the padding.
        for i, param in ((1, w), (2, b)):
            if param is not None and needs[i]:
                grads[i] = launch.buffer(param.shape, param.dtype, device)
                grads[i][vocab if n else 0:].zero_()
    if n == 0 or not (need_s or need_t):
        return [*gs, *gt]

    rows = torch.cat([rows, row_scale(grad_out, labels, settings, n, torch.float32)[None]])  # the last plane, GRAD
    cfg = configs.pick("backward", xs.element_size(), n)
    lw_p, lw_q = settings.mix_log_weights
    forms, caps = _transforms(settings)
    XS, WS, BS, DS, sxs, sws, has_bs = _side_args(xs, ws, bs)
    XT, WT, BT, DT, sxt, swt, has_bt = _side_args(xt, wt, bt)
    if from_logits:
        chunk = vocab
        dzs, dzt = gs[0], gt[0]
    else:
        per_column = n * xs.element_size() * (int(need_s) + int(need_t))
        chunk = max(cfg.block_v, BACKWARD_CHUNK_BYTES // max(per_column, 1) // cfg.block_v * cfg.block_v)
        chunk = min(chunk, launch.cdiv(vocab, cfg.block_v) * cfg.block_v)
        dzs = launch.buffer((n, chunk), xs.dtype, device) if need_s else None
        dzt = launch.buffer((n, chunk), xt.dtype, device) if need_t else None
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        # A chunk's logit gradients are a contiguous [N, v1 - v0] view of the buffer's leading elements, not
        # its columns [:, :v1 - v0]: torch 2.13's CPU bfloat16 GEMM (AVX-512 Xeons) reads a column-sliced
        # operand's padding columns (times zero), so NaN or Inf there leaked into the hidden gradient.
        # (From logits, the kernel writes the logit gradient itself, columns [0, vocab) of its rows.)
        cs, ct = (dz if dz is None or from_logits else dz.view(-1)[: n * (v1 - v0)].view(n, v1 - v0)
                  for dz in (dzs, dzt))
        grid = (launch.cdiv(n, cfg.block_n), launch.cdiv(v1 - v0, cfg.block_v))
        kd_backward_kernel[grid](
            XS, WS, BS, XT, WT, BT, XS if labels is None else labels, rows,
            XS if cs is None else cs, XS if ct is None else ct,
            n, vocab, DS, DT, sxs, sws, sxt, swt,
            0 if cs is None else cs.stride(0), 0 if ct is None else ct.stride(0),
            v0, v1, 1.0 / settings.temperature, lw_p, lw_q, settings.soft_weight, settings.hard_weight, *forms,
            DIVERGENCE=DIVERGENCE_CODES[settings.divergence], HAS_HARD=settings.has_hard, **caps,
            HAS_BIAS_S=has_bs, HAS_BIAS_T=has_bt, NEED_S=need_s, NEED_T=need_t, FROM_LOGITS=from_logits,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_compile_switches(xs))
        if not from_logits:
            if need_s:
                _linear_grads(cs, xs, ws, bs, v0, v1, need[0:3], gs)
            if need_t:
                _linear_grads(ct, xt, wt, bt, v0, v1, need[3:6], gt)
    gs[0] = None if gs[0] is None else gs[0].to(xs.dtype)
    gt[0] = None if gt[0] is None else gt[0].to(xt.dtype)
    return [*gs, *gt]


def triton_forward(xs, ws, bs, xt, wt, bt, labels, settings: KDSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token losses [N] float32, before the label rules of ``promptkd.kd.tokens``; the per-token
    statistics [GRAD, N] float32 that :func:`triton_backward` reads). Inputs as for
    ``promptkd.kd.torch_impl.torch_forward``, with unit stride along the last dimension."""
    if xs.shape[0] == 0:
        return xs.new_zeros(0, dtype=torch.float32), xs.new_zeros(plane.GRAD, 0, dtype=torch.float32)
    return _forward(xs, ws, bs, xt, wt, bt, labels, settings)


def unit_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with unit stride along its last dimension (what the kernels read), or None."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()

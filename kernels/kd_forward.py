"""Forward kernels: per-token statistics over (token block x vocabulary split) programs.

Each program owns BLOCK_N tokens and a contiguous range of vocabulary tiles (one "split"); it
computes student and teacher logit tiles in SRAM (tl.dot, float32 accumulation) and folds them
into per-split statistics that the launcher combines over splits in a fixed order (deterministic).
"""

import triton
import triton.language as tl

from .common import FORWARD_KL, REVERSE_KL, divergence_terms, student_teacher_tiles
from .kd_planes import ACC, AT, F_SUM, GP_SUM, GQ_SUM, MAX_A, MAX_B, MAX_C, SUM_A, SUM_B, SUM_C, TARGET

# Stands for -inf in running maxima and padding columns: e^(NEG - m) is exactly 0 and, unlike -inf,
# NEG - NEG is 0, so empty sums and masked lanes need no extra guards.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _program_range(OUT, N, V, tiles_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's tokens (int64 offsets, mask), its vocabulary tiles [t_start, t_end), and its
    output slot OUT[0, token, split] in plane 0 of a [planes, N, splits] buffer."""
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    t_start = i_s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(V, BLOCK_V))
    return o_n, o_n < N, t_start, t_end, OUT + o_n * tl.num_programs(1) + i_s


@triton.jit
def _at_argmax(b_x, b_y, BLOCK_V: tl.constexpr):
    """y at the first column where x is largest, per row of [BLOCK_N, BLOCK_V] tiles."""
    i_max = tl.argmax(b_x, 1)
    return tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == i_max[:, None], b_y, 0.0), 1)


@triton.jit(do_not_specialize=["N"])
def kd_online_kernel(
    XS, WS, BS, XT, WT, BT, LABELS, STATS,
    N, V, DS, DT, stride_xs, stride_ws, stride_xt, stride_wt, stride_stat,
    tiles_per_split, inv_t, s_scale, s_cap, t_scale, t_cap,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr, FROM_LOGITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online statistics of one split, written to STATS[plane, token, split] (float32; planes: kd_planes.py):

    a = s / T, b = t / T (s, t: student, teacher logits, each after its side's transform: scale, then the
    cap where S_CAP / T_CAP; common.transform). Running maxima m and rescaled sums l give
        MAX_A, SUM_A: m_a, l_a   lse(a) = m_a + log l_a
        MAX_B, SUM_B: m_b, l_b   lse(b) = m_b + log l_b
        ACC:    forward_kl  acc = sum_v e^(b - m_b) ((b - m_b) - (a - a_at)),  a_at = a at argmax b
                reverse_kl  acc = sum_v e^(a - m_a) ((a - m_a) - (b - b_at)),  b_at = b at argmax a
                LSE_ONLY: not written
        AT:     a_at (forward_kl) or b_at (reverse_kl); not written for LSE_ONLY
        MAX_C, SUM_C: m_c, l_c   lse(s) at T = 1 (cross-entropy; written with HAS_HARD only)
        TARGET: s[label]         the label's logit (0 in splits that do not hold it; HAS_HARD only)
    Centring on the argmax element makes acc exactly 0 for a one-hot distribution, and the backward
    forms the same differences from the same bits, so KL(p||q) = acc / l_b - log l_b + (m_a - a_at)
    + log l_a keeps full precision even for logits of 1e4 (for reverse_kl exchange a and b).
    When a maximum grows from m to m', sums rescale by e^(m - m'), and acc also gains
    l * ((m - m') - (x_at - x_at')).
    """
    o_n, m_n, t_start, t_end, p_out = _program_range(STATS, N, V, tiles_per_split, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)

    b_ma = tl.full([BLOCK_N], NEG, tl.float32)
    b_la = tl.zeros([BLOCK_N], tl.float32)
    b_mb = tl.full([BLOCK_N], NEG, tl.float32)
    b_lb = tl.zeros([BLOCK_N], tl.float32)
    b_acc = tl.zeros([BLOCK_N], tl.float32)
    b_at = tl.zeros([BLOCK_N], tl.float32)
    b_mc = tl.full([BLOCK_N], NEG, tl.float32)
    b_lc = tl.zeros([BLOCK_N], tl.float32)
    b_target = tl.zeros([BLOCK_N], tl.float32)
    if HAS_HARD:
        b_label = tl.load(LABELS + o_n, mask=m_n, other=-1)

    for i_t in range(t_start, t_end):
        o_v, m_v, b_s, b_t = student_teacher_tiles(  # b_s, b_t: [BLOCK_N, BLOCK_V]
            XS, WS, BS, XT, WT, BT, o_n, m_n, i_t * BLOCK_V, V, DS, DT, stride_xs, stride_ws, stride_xt, stride_wt,
            s_scale, s_cap, t_scale, t_cap, S_CAP=S_CAP, T_CAP=T_CAP,
            FROM_LOGITS=FROM_LOGITS, HAS_BIAS_S=HAS_BIAS_S, HAS_BIAS_T=HAS_BIAS_T, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
            BLOCK_D=BLOCK_D, UPCAST=UPCAST, PRECISION=PRECISION)
        b_a = tl.where(m_v[None, :], b_s * inv_t, NEG)
        b_b = tl.where(m_v[None, :], b_t * inv_t, NEG)
        ma_new = tl.maximum(b_ma, tl.max(b_a, 1))  # finite: every tile holds a real column
        mb_new = tl.maximum(b_mb, tl.max(b_b, 1))
        ra = tl.exp(b_ma - ma_new)
        rb = tl.exp(b_mb - mb_new)
        b_ea = tl.exp(b_a - ma_new[:, None])
        b_eb = tl.exp(b_b - mb_new[:, None])
        if DIVERGENCE == FORWARD_KL:
            at_new = tl.where(tl.max(b_b, 1) > b_mb, _at_argmax(b_b, b_a, BLOCK_V=BLOCK_V), b_at)
            b_d = (b_b - mb_new[:, None]) - (b_a - at_new[:, None])
            b_acc = rb * (b_acc + b_lb * ((b_mb - mb_new) - (b_at - at_new))) + tl.sum(b_eb * b_d, 1)
            b_at = at_new
        elif DIVERGENCE == REVERSE_KL:
            at_new = tl.where(tl.max(b_a, 1) > b_ma, _at_argmax(b_a, b_b, BLOCK_V=BLOCK_V), b_at)
            b_d = (b_a - ma_new[:, None]) - (b_b - at_new[:, None])
            b_acc = ra * (b_acc + b_la * ((b_ma - ma_new) - (b_at - at_new))) + tl.sum(b_ea * b_d, 1)
            b_at = at_new
        b_la = b_la * ra + tl.sum(b_ea, 1)
        b_lb = b_lb * rb + tl.sum(b_eb, 1)
        b_ma = ma_new
        b_mb = mb_new
        if HAS_HARD:
            b_c = tl.where(m_v[None, :], b_s, NEG)
            mc_new = tl.maximum(b_mc, tl.max(b_c, 1))
            b_lc = b_lc * tl.exp(b_mc - mc_new) + tl.sum(tl.exp(b_c - mc_new[:, None]), 1)
            b_mc = mc_new
            b_target += tl.sum(tl.where(o_v[None, :] == b_label[:, None], b_s, 0.0), 1)

    tl.store(p_out + MAX_A * stride_stat, b_ma, mask=m_n)
    tl.store(p_out + SUM_A * stride_stat, b_la, mask=m_n)
    tl.store(p_out + MAX_B * stride_stat, b_mb, mask=m_n)
    tl.store(p_out + SUM_B * stride_stat, b_lb, mask=m_n)
    if DIVERGENCE == FORWARD_KL or DIVERGENCE == REVERSE_KL:
        tl.store(p_out + ACC * stride_stat, b_acc, mask=m_n)
        tl.store(p_out + AT * stride_stat, b_at, mask=m_n)
    if HAS_HARD:
        tl.store(p_out + MAX_C * stride_stat, b_mc, mask=m_n)
        tl.store(p_out + SUM_C * stride_stat, b_lc, mask=m_n)
        tl.store(p_out + TARGET * stride_stat, b_target, mask=m_n)


@triton.jit(do_not_specialize=["N"])
def kd_terms_kernel(
    XS, WS, BS, XT, WT, BT, ROWS, PARTIAL,
    N, V, DS, DT, stride_xs, stride_ws, stride_xt, stride_wt, stride_stat,
    tiles_per_split, inv_t, lw_p, lw_q, s_scale, s_cap, t_scale, t_cap,
    DIVERGENCE: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr, FROM_LOGITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Second forward pass of the mixture divergences (jsd, skew_forward_kl, skew_reverse_kl).

    With the maxima and log-sums known (ROWS[plane, token], planes MAX_A, SUM_A, MAX_B, SUM_B:
    m_a, log l_a, m_b, log l_b): lq = (a - m_a) - log l_a, lp = (b - m_b) - log l_b (the maximum first,
    as log_softmax does), the mixture log M = logaddexp(lw_p + lp, lw_q + lq) in log space, and per split
        PARTIAL[F_SUM] = sum f = D,  PARTIAL[GP_SUM] = sum Gp = cp,  PARTIAL[GQ_SUM] = sum Gq = cq
    (f, Gp, Gq from common.divergence_terms; cp, cq feed the backward).
    """
    o_n, m_n, t_start, t_end, p_out = _program_range(PARTIAL, N, V, tiles_per_split, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
    b_ma = tl.load(ROWS + MAX_A * N + o_n, mask=m_n, other=0.0)
    b_lla = tl.load(ROWS + SUM_A * N + o_n, mask=m_n, other=0.0)
    b_mb = tl.load(ROWS + MAX_B * N + o_n, mask=m_n, other=0.0)
    b_llb = tl.load(ROWS + SUM_B * N + o_n, mask=m_n, other=0.0)

    b_div = tl.zeros([BLOCK_N], tl.float32)
    b_cp = tl.zeros([BLOCK_N], tl.float32)
    b_cq = tl.zeros([BLOCK_N], tl.float32)
    for i_t in range(t_start, t_end):
        o_v, m_v, b_s, b_t = student_teacher_tiles(  # b_s, b_t: [BLOCK_N, BLOCK_V]
            XS, WS, BS, XT, WT, BT, o_n, m_n, i_t * BLOCK_V, V, DS, DT, stride_xs, stride_ws, stride_xt, stride_wt,
            s_scale, s_cap, t_scale, t_cap, S_CAP=S_CAP, T_CAP=T_CAP,
            FROM_LOGITS=FROM_LOGITS, HAS_BIAS_S=HAS_BIAS_S, HAS_BIAS_T=HAS_BIAS_T, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
            BLOCK_D=BLOCK_D, UPCAST=UPCAST, PRECISION=PRECISION)
        b_lq = (b_s * inv_t - b_ma[:, None]) - b_lla[:, None]
        b_lp = (b_t * inv_t - b_mb[:, None]) - b_llb[:, None]
        b_f, b_gp, b_gq = divergence_terms(b_lp, b_lq, lw_p, lw_q, DIVERGENCE=DIVERGENCE)
        b_div += tl.sum(tl.where(m_v[None, :], b_f, 0.0), 1)
        b_cp += tl.sum(tl.where(m_v[None, :], b_gp, 0.0), 1)
        b_cq += tl.sum(tl.where(m_v[None, :], b_gq, 0.0), 1)

    tl.store(p_out + F_SUM * stride_stat, b_div, mask=m_n)
    tl.store(p_out + GP_SUM * stride_stat, b_cp, mask=m_n)
    tl.store(p_out + GQ_SUM * stride_stat, b_cq, mask=m_n)

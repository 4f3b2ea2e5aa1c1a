"""Backward kernel: recompute logit tiles and write the logit gradients of one vocabulary chunk."""

import triton
import triton.language as tl

from .common import FORWARD_KL, REVERSE_KL, divergence_terms, student_teacher_tiles, transform_derivative
from .kd_planes import CP, CQ, GRAD, MAX_A, MAX_B, MAX_C, SUM_A, SUM_B, SUM_C


@triton.jit(do_not_specialize=["N"])
def kd_backward_kernel(
    XS, WS, BS, XT, WT, BT, LABELS, ROWS, DZS, DZT,
    N, V, DS, DT, stride_xs, stride_ws, stride_xt, stride_wt, stride_dzs, stride_dzt,
    v_start, v_end, inv_t, lw_p, lw_q, soft_weight, hard_weight, s_scale, s_cap, t_scale, t_cap,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, S_CAP: tl.constexpr, T_CAP: tl.constexpr,
    FROM_LOGITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logit gradients of the tile (tokens i_n, columns v_start + i_v * BLOCK_V ...) of the chunk [v_start, v_end).

    ROWS[plane, token] (planes: kd_planes.py): MAX_A, SUM_A, MAX_B, SUM_B, MAX_C, SUM_C = m_a, log l_a,
    m_b, log l_b, m_c, log l_c (maxima and log-sums of a, b and s), CP, CQ = cp, cq and GRAD = g =
    d(loss)/d(token loss). With lq = (a - m_a) - log l_a (the maximum first,
    as log_softmax does: one stored lse would round log l away next to a large maximum),
    lp = (b - m_b) - log l_b, q = e^lq, p = e^lp and (Gp, Gq) from divergence_terms:
        dS = g (soft_weight / T (Gq - q cq) + hard_weight (softmax(s) - onehot(label)))   (NEED_S)
        dT = g  soft_weight / T (Gp - p cp)                                              (NEED_T)
    each times its side's transform derivative (common.transform_derivative: s and t above are the
    transformed logits), written to DZS / DZT at [token, v - v_start] in their element type. The KL divergences keep the
    forward's centring on the argmax element (kd_forward.kd_online_kernel): there cp, cq hold
    C = acc / l and x_at, and  forward_kl: dB = p ((b - m_b) - (a - a_at) - C), dA = q - p;
    reverse_kl: dA = q ((a - m_a) - (b - b_at) - C), dB = p - q.
    """
    i_n = tl.program_id(0)
    i_v = tl.program_id(1)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_n = o_n < N
    o_v, m_v, b_s, b_t = student_teacher_tiles(  # b_s, b_t: [BLOCK_N, BLOCK_V]
        XS, WS, BS, XT, WT, BT, o_n, m_n, v_start + i_v * BLOCK_V, v_end, DS, DT, stride_xs, stride_ws, stride_xt,
        stride_wt, s_scale, s_cap, t_scale, t_cap, S_CAP=S_CAP, T_CAP=T_CAP, FROM_LOGITS=FROM_LOGITS,
        HAS_BIAS_S=HAS_BIAS_S, HAS_BIAS_T=HAS_BIAS_T, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        UPCAST=UPCAST, PRECISION=PRECISION)
    b_ma = tl.load(ROWS + MAX_A * N + o_n, mask=m_n, other=0.0)
    b_lla = tl.load(ROWS + SUM_A * N + o_n, mask=m_n, other=0.0)
    b_mb = tl.load(ROWS + MAX_B * N + o_n, mask=m_n, other=0.0)
    b_llb = tl.load(ROWS + SUM_B * N + o_n, mask=m_n, other=0.0)
    b_cp = tl.load(ROWS + CP * N + o_n, mask=m_n, other=0.0)
    b_cq = tl.load(ROWS + CQ * N + o_n, mask=m_n, other=0.0)
    b_g = tl.load(ROWS + GRAD * N + o_n, mask=m_n, other=0.0)
    b_a = b_s * inv_t
    b_b = b_t * inv_t
    b_q = tl.exp((b_a - b_ma[:, None]) - b_lla[:, None])
    b_p = tl.exp((b_b - b_mb[:, None]) - b_llb[:, None])
    if DIVERGENCE == FORWARD_KL:
        b_da = b_q - b_p
        b_db = b_p * (((b_b - b_mb[:, None]) - (b_a - b_cq[:, None])) - b_cp[:, None])
    elif DIVERGENCE == REVERSE_KL:
        b_da = b_q * (((b_a - b_ma[:, None]) - (b_b - b_cp[:, None])) - b_cq[:, None])
        b_db = b_p - b_q
    else:
        b_lq = (b_a - b_ma[:, None]) - b_lla[:, None]
        b_lp = (b_b - b_mb[:, None]) - b_llb[:, None]
        _, b_gp, b_gq = divergence_terms(b_lp, b_lq, lw_p, lw_q, DIVERGENCE=DIVERGENCE)
        b_da = b_gq - b_q * b_cq[:, None]
        b_db = b_gp - b_p * b_cp[:, None]
    m_out = m_n[:, None] & m_v[None, :]
    o_out = o_v[None, :] - v_start
    if NEED_S:
        b_ds = (soft_weight * inv_t) * b_da
        if HAS_HARD:
            b_mc = tl.load(ROWS + MAX_C * N + o_n, mask=m_n, other=0.0)
            b_llc = tl.load(ROWS + SUM_C * N + o_n, mask=m_n, other=0.0)
            b_label = tl.load(LABELS + o_n, mask=m_n, other=-1)
            b_onehot = tl.where(o_v[None, :] == b_label[:, None], 1.0, 0.0)
            b_ds += hard_weight * (tl.exp((b_s - b_mc[:, None]) - b_llc[:, None]) - b_onehot)
        b_ds = b_ds * b_g[:, None] * transform_derivative(b_s, s_scale, s_cap, HAS_CAP=S_CAP)
        tl.store(DZS + o_n[:, None] * stride_dzs + o_out, b_ds.to(DZS.dtype.element_ty), mask=m_out)
    if NEED_T:
        b_dt = ((soft_weight * inv_t) * b_g)[:, None] * b_db * transform_derivative(b_t, t_scale, t_cap, HAS_CAP=T_CAP)
        tl.store(DZT + o_n[:, None] * stride_dzt + o_out, b_dt.to(DZT.dtype.element_ty), mask=m_out)

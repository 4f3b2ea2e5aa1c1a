"""Backward kernels of prefix attention. With the forward's p_ij = 2^(s_ij - lse_i) (0 for keys row i
does not see, and for every key of a row that sees nothing: lse = +inf) and delta_i = dO_i . O_i:

    dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
    dQ_i  = scale sum_j ds_ij k_j,   dK_j = scale sum_i ds_ij q_i,   dV_j = sum_i p_ij dO_i

prefix_attention_dq_kernel          (query block, sample x query head): delta and dQ over the keys
prefix_attention_dkdv_kernel        (own key block, sample x key head): dK, dV of the sample's keys
prefix_attention_prefix_dkdv_kernel (prefix key block, group x key head, split): float32 partial
    dK, dV of a prefix over one fixed slice of its group's samples; the launcher sums the splits in a
    fixed order, so the prefix gradients are deterministic (no atomics).

Masked keys and values are loaded as 0 and the queries of rows that see nothing (lse = +inf) read as 0
in the dK sums: p = 0 times a NaN or infinite value would be NaN.

With HAS_CAP (softcapped scores, kernels/prefix_attention_forward.py) ds_ij is the gradient with respect
to the capped score, and the chain rule through cap * tanh(scale * x / cap) multiplies it by
(1 - tanh^2) before the sums (the factor scale is applied at the end, as without a cap).
"""

import triton
import triton.language as tl

from .common import load_rows, scores


@triton.jit
def _dq_block(b_dq, b_q, b_do, b_lse, b_delta, K, V, o_n, m_n, o_m, o_d, m_d, stride_kn, qk_scale, cap_scale,
              cap_l2, MASK_LOAD: tl.constexpr, MASK_COLS: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_CAP: tl.constexpr):
    """Add key block o_n's share sum_j ds_ij k_j to dq (masks as in the forward's _online_block)."""
    # both [BLOCK_N, BLOCK_D]
    b_k = load_rows(K, o_n, m_n, o_d, m_d, stride_kn, MASK_ROWS=MASK_LOAD, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_v = load_rows(V, o_n, m_n, o_d, m_d, stride_kn, MASK_ROWS=MASK_LOAD, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_s, b_th = scores(b_q, b_k, qk_scale, cap_scale, cap_l2, HAS_CAP=HAS_CAP, PRECISION=PRECISION)
    if MASK_COLS:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    if CAUSAL:
        b_s = tl.where(o_n[None, :] <= o_m[:, None], b_s, float("-inf"))
    b_p = tl.exp2(b_s - b_lse[:, None])
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    b_ds = b_p * (b_dp - b_delta[:, None])
    if HAS_CAP:
        b_ds = b_ds * (1.0 - b_th * b_th)
    return tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=PRECISION)


@triton.jit
def _dkdv_block(b_dk, b_dv, b_k, b_v, Q, DO, LSE, DELTA, m0, o_n, m_n, o_d, m_d, N, stride_qn, stride_on,
                qk_scale, cap_scale, cap_l2, MASK_COLS: tl.constexpr, CAUSAL: tl.constexpr, NEED_DK: tl.constexpr,
                NEED_DV: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, DEAD_ROWS: tl.constexpr, HAS_CAP: tl.constexpr):
    """Add query block m0's share to the key block's dk, dv (transposed scores: keys are rows).

    Q, DO, LSE, DELTA point at one (sample, query head); query rows >= N read as q = dO = 0 with
    lse = +inf (p = 0). MASK_COLS: keys outside m_n get no weight; CAUSAL: key j only for queries i >= j.
    DEAD_ROWS: rows that see nothing (lse = +inf) may hold anything in q; they read as q = 0.
    """
    o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < N
    # both [BLOCK_M, BLOCK_D]
    b_q = load_rows(Q, o_m, m_m, o_d, m_d, stride_qn, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_do = load_rows(DO, o_m, m_m, o_d, m_d, stride_on, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_lse = tl.load(LSE + o_m, mask=m_m, other=float("inf"))  # [BLOCK_M]
    if DEAD_ROWS:
        b_q = tl.where((b_lse < float("inf"))[:, None], b_q, 0.0).to(b_q.dtype)
    # [BLOCK_N, BLOCK_M]
    b_st, b_tht = scores(b_k, b_q, qk_scale, cap_scale, cap_l2, HAS_CAP=HAS_CAP, PRECISION=PRECISION)
    if MASK_COLS:
        b_st = tl.where(m_n[:, None], b_st, float("-inf"))
    if CAUSAL:
        b_st = tl.where(o_n[:, None] <= o_m[None, :], b_st, float("-inf"))
    b_pt = tl.exp2(b_st - b_lse[None, :])  # [BLOCK_N, BLOCK_M]
    if NEED_DV:
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PRECISION)
    if NEED_DK:
        b_delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        if HAS_CAP:
            b_dst = b_dst * (1.0 - b_tht * b_tht)
        b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PRECISION)
    return b_dk, b_dv


@triton.jit(do_not_specialize=["N", "P"])
def prefix_attention_dq_kernel(
    Q, K, V, PK, PV, LENGTHS, GROUP, KEEP, OUT, DO, LSE, DELTA, DQ,
    N, P, D, HQ, REP, qk_scale, scale, cap_scale, cap_l2,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_pg, stride_ph, stride_pn, stride_ob, stride_oh, stride_on,
    NEED_DQ: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PADDING: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DELTA[b, h, i] = delta_i = dO_i . O_i (float32) and, when NEED_DQ, DQ[b, h, i] = dQ_i, walking
    the keys as the forward does. OUT, DO and DQ share strides (stride_o*); LSE, DELTA are [B, HQ, N]."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // REP
    m0 = i_m * BLOCK_M
    o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < N
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_o = i_b * stride_ob + i_h * stride_oh
    # both [BLOCK_M, BLOCK_D]
    b_do = load_rows(DO + p_o, o_m, m_m, o_d, m_d, stride_on, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_o = load_rows(OUT + p_o, o_m, m_m, o_d, m_d, stride_on, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=False)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(DELTA + i_bh * N + o_m, b_delta, mask=m_m)
    if NEED_DQ:
        b_q = load_rows(Q + i_b * stride_qb + i_h * stride_qh, o_m, m_m, o_d, m_d, stride_qn, MASK_ROWS=True,
                        EVEN_D=EVEN_D, UPCAST=UPCAST)  # [BLOCK_M, BLOCK_D]
        b_lse = tl.load(LSE + i_bh * N + o_m, mask=m_m, other=float("inf"))  # [BLOCK_M]
        b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        i_g = tl.load(GROUP + i_b)
        L = P
        if HAS_LENGTHS:
            L = tl.load(LENGTHS + i_g).to(tl.int32)
        PK += i_g * stride_pg + i_hk * stride_ph
        PV += i_g * stride_pg + i_hk * stride_ph
        l_full = (L // BLOCK_N) * BLOCK_N
        for j0 in range(0, l_full, BLOCK_N):
            o_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, PK, PV, o_n, o_n < L, o_m, o_d, m_d, stride_pn,
                             qk_scale, cap_scale, cap_l2, MASK_LOAD=False, MASK_COLS=False, CAUSAL=False,
                             EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION, HAS_CAP=HAS_CAP)
        if l_full < L:
            o_n = (l_full + tl.arange(0, BLOCK_N)).to(tl.int64)
            b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, PK, PV, o_n, o_n < L, o_m, o_d, m_d, stride_pn,
                             qk_scale, cap_scale, cap_l2, MASK_LOAD=True, MASK_COLS=True, CAUSAL=False,
                             EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION, HAS_CAP=HAS_CAP)
        K += i_b * stride_kb + i_hk * stride_kh
        V += i_b * stride_kb + i_hk * stride_kh
        off_end = (m0 // BLOCK_N) * BLOCK_N
        for j0 in range(0, off_end, BLOCK_N):
            o_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            m_n = o_n < N
            if HAS_PADDING:
                m_n = tl.load(KEEP + i_b * N + o_n) != 0
            b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, K, V, o_n, m_n, o_m, o_d, m_d, stride_kn,
                             qk_scale, cap_scale, cap_l2, MASK_LOAD=HAS_PADDING, MASK_COLS=HAS_PADDING, CAUSAL=False,
                             EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION, HAS_CAP=HAS_CAP)
        for j0 in range(off_end, tl.minimum(m0 + BLOCK_M, N), BLOCK_N):
            o_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            m_n = o_n < N
            if HAS_PADDING:
                m_n = m_n & (tl.load(KEEP + i_b * N + o_n, mask=m_n, other=0) != 0)
            b_dq = _dq_block(b_dq, b_q, b_do, b_lse, b_delta, K, V, o_n, m_n, o_m, o_d, m_d, stride_kn,
                             qk_scale, cap_scale, cap_l2, MASK_LOAD=True, MASK_COLS=True, CAUSAL=True,
                             EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION, HAS_CAP=HAS_CAP)
        p_dq = DQ + p_o + o_m[:, None] * stride_on + o_d[None, :]
        tl.store(p_dq, (b_dq * scale).to(DQ.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["N"])
def prefix_attention_dkdv_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DK, DV,
    N, D, HQ, REP, qk_scale, scale, cap_scale, cap_l2,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_on, stride_gb, stride_gh, stride_gn,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, HAS_PADDING: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DK, DV [b, hk, j] (strides stride_g*) of own keys j in the block, summed over the REP query heads
    of key head hk and the queries i >= j: the query blocks across the diagonal masked, those below not."""
    i_n = tl.program_id(0)
    i_bk = tl.program_id(1).to(tl.int64)
    i_b = i_bk // (HQ // REP)
    i_hk = i_bk % (HQ // REP)
    n0 = i_n * BLOCK_N
    o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_n = o_n < N
    if HAS_PADDING:
        m_n = m_n & (tl.load(KEEP + i_b * N + o_n, mask=m_n, other=0) != 0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_k = i_b * stride_kb + i_hk * stride_kh
    # both [BLOCK_N, BLOCK_D]
    b_k = load_rows(K + p_k, o_n, m_n, o_d, m_d, stride_kn, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_v = load_rows(V + p_k, o_n, m_n, o_d, m_d, stride_kn, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag_start = (n0 // BLOCK_M) * BLOCK_M
    diag_end = tl.minimum(n0 + BLOCK_N, N)
    below_start = diag_start + tl.cdiv(diag_end - diag_start, BLOCK_M) * BLOCK_M
    for i_r in range(REP):
        i_h = i_hk * REP + i_r
        i_bh = i_b * HQ + i_h
        p_q = Q + i_b * stride_qb + i_h * stride_qh
        p_do = DO + i_b * stride_ob + i_h * stride_oh
        for m0 in range(diag_start, diag_end, BLOCK_M):
            b_dk, b_dv = _dkdv_block(
                b_dk, b_dv, b_k, b_v, p_q, p_do, LSE + i_bh * N, DELTA + i_bh * N, m0, o_n, m_n, o_d, m_d, N,
                stride_qn, stride_on, qk_scale, cap_scale, cap_l2, MASK_COLS=HAS_PADDING, CAUSAL=True,
                NEED_DK=NEED_DK, NEED_DV=NEED_DV, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION,
                BLOCK_M=BLOCK_M, DEAD_ROWS=HAS_PADDING, HAS_CAP=HAS_CAP)
        for m0 in range(below_start, N, BLOCK_M):
            b_dk, b_dv = _dkdv_block(
                b_dk, b_dv, b_k, b_v, p_q, p_do, LSE + i_bh * N, DELTA + i_bh * N, m0, o_n, m_n, o_d, m_d, N,
                stride_qn, stride_on, qk_scale, cap_scale, cap_l2, MASK_COLS=HAS_PADDING, CAUSAL=False,
                NEED_DK=NEED_DK, NEED_DV=NEED_DV, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION,
                BLOCK_M=BLOCK_M, DEAD_ROWS=HAS_PADDING, HAS_CAP=HAS_CAP)

    m_out = (o_n < N)[:, None] & m_d[None, :]
    p_out = i_b * stride_gb + i_hk * stride_gh + o_n[:, None] * stride_gn + o_d[None, :]
    if NEED_DK:
        tl.store(DK + p_out, (b_dk * scale).to(DK.dtype.element_ty), mask=m_out)
    if NEED_DV:
        tl.store(DV + p_out, b_dv.to(DV.dtype.element_ty), mask=m_out)


@triton.jit(do_not_specialize=["N", "P"])
def prefix_attention_prefix_dkdv_kernel(
    Q, PK, PV, LENGTHS, ORDER, OFFSETS, DO, LSE, DELTA, DPK, DPV,
    N, P, D, HQ, REP, qk_scale, scale, cap_scale, cap_l2,
    stride_qb, stride_qh, stride_qn, stride_pg, stride_ph, stride_pn,
    stride_ob, stride_oh, stride_on, stride_ws, stride_wg, stride_wh, stride_wn,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, HAS_LENGTHS: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Float32 partials DPK, DPV [split, g, hk, j] (strides stride_w*) of prefix keys j < L_g in the block.

    The samples of group g are ORDER[OFFSETS[g]:OFFSETS[g + 1]] (sample indices sorted by group);
    split i_s takes the i_s-th of SPLITS equal contiguous slices of them and sums, in order, over its
    samples, the REP query heads of key head hk and all queries (every query sees every real prefix key).
    """
    i_n = tl.program_id(0)
    i_gk = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    i_g = i_gk // (HQ // REP)
    i_hk = i_gk % (HQ // REP)
    L = P
    if HAS_LENGTHS:
        L = tl.load(LENGTHS + i_g).to(tl.int32)
    n0 = i_n * BLOCK_N
    o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_n = o_n < L
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_k = i_g * stride_pg + i_hk * stride_ph
    # both [BLOCK_N, BLOCK_D]
    b_k = load_rows(PK + p_k, o_n, m_n, o_d, m_d, stride_pn, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_v = load_rows(PV + p_k, o_n, m_n, o_d, m_d, stride_pn, MASK_ROWS=True, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    first = tl.load(OFFSETS + i_g)
    count = tl.load(OFFSETS + i_g + 1) - first
    per_split = tl.cdiv(count, n_splits)
    lo = tl.minimum(i_s * per_split, count)
    hi = tl.minimum(lo + per_split, count)
    if n0 >= L:  # no real key in the block: zeros
        hi = lo
    for i_x in range(first + lo, first + hi):
        i_b = tl.load(ORDER + i_x)
        for i_r in range(REP):
            i_h = i_hk * REP + i_r
            i_bh = i_b * HQ + i_h
            p_q = Q + i_b * stride_qb + i_h * stride_qh
            p_do = DO + i_b * stride_ob + i_h * stride_oh
            for m0 in range(0, N, BLOCK_M):
                b_dk, b_dv = _dkdv_block(
                    b_dk, b_dv, b_k, b_v, p_q, p_do, LSE + i_bh * N, DELTA + i_bh * N, m0, o_n, m_n, o_d, m_d, N,
                    stride_qn, stride_on, qk_scale, cap_scale, cap_l2, MASK_COLS=True, CAUSAL=False,
                    NEED_DK=NEED_DK, NEED_DV=NEED_DV, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION,
                    BLOCK_M=BLOCK_M, DEAD_ROWS=False, HAS_CAP=HAS_CAP)

    m_out = (o_n < P)[:, None] & m_d[None, :]
    p_out = i_s.to(tl.int64) * stride_ws + i_g * stride_wg + i_hk * stride_wh + o_n[:, None] * stride_wn + o_d[None, :]
    if NEED_DK:
        tl.store(DPK + p_out, b_dk * scale, mask=m_out)
    if NEED_DV:
        tl.store(DPV + p_out, b_dv, mask=m_out)

"""Forward kernel of prefix attention: one program per (query block, sample x query head).

A query block walks its group's prefix keys (full blocks unmasked, the last partial one masked by
column), then its own keys left of the diagonal (unmasked; a key-padding column mask behind
HAS_PADDING) and the diagonal block(s) (causal mask), with an online softmax in base 2. Masked keys
(padding, prefix positions >= L) are loaded as 0: a zero weight times a NaN or infinite value is NaN.
With HAS_CAP the scores are softcapped (Gemma 2's attention): s = cap * tanh(scale * q . k / cap), in base 2
cap_l2 * tanh(cap_scale * q . k) with cap_scale = scale / cap and cap_l2 = cap * log2(e), runtime values.
"""

import triton
import triton.language as tl

from .common import load_rows, scores

# Start of the running maxima: finite, so a masked score (-inf) gives 2^(-inf - m) = 0 and a row that
# has seen nothing yet rescales by 2^(NEG - NEG) = 1 instead of NaN.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _online_block(b_acc, b_m, b_l, b_q, K, V, o_n, m_n, o_m, o_d, m_d, stride_kn, qk_scale, cap_scale, cap_l2,
                  MASK_LOAD: tl.constexpr, MASK_COLS: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_CAP: tl.constexpr):
    """Fold key block o_n (K, V: the head's key and value rows) into (acc, m, l) of query rows o_m.

    MASK_LOAD: rows outside m_n read as 0; MASK_COLS: columns outside m_n get no weight;
    CAUSAL: key j only for queries i >= j.
    """
    # both [BLOCK_N, BLOCK_D]
    b_k = load_rows(K, o_n, m_n, o_d, m_d, stride_kn, MASK_ROWS=MASK_LOAD, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_v = load_rows(V, o_n, m_n, o_d, m_d, stride_kn, MASK_ROWS=MASK_LOAD, EVEN_D=EVEN_D, UPCAST=UPCAST)
    b_s, _ = scores(b_q, b_k, qk_scale, cap_scale, cap_l2, HAS_CAP=HAS_CAP, PRECISION=PRECISION)
    if MASK_COLS:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    if CAUSAL:
        b_s = tl.where(o_n[None, :] <= o_m[:, None], b_s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_M]
    b_p = tl.exp2(b_s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    b_alpha = tl.exp2(b_m - m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PRECISION)
    return b_acc, m_new, b_l


@triton.jit(do_not_specialize=["N", "P"])
def prefix_attention_forward_kernel(
    Q, K, V, PK, PV, LENGTHS, GROUP, KEEP, OUT, LSE,
    N, P, D, HQ, REP, qk_scale, cap_scale, cap_l2,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_pg, stride_ph, stride_pn, stride_ob, stride_oh, stride_on,
    HAS_LENGTHS: tl.constexpr, HAS_PADDING: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Query i of sample b, head h (key head h // REP, prefix g = GROUP[b]); scores in base 2

        s_ij = qk_scale * q_i . key_j,   qk_scale = scale * log2(e)
        (HAS_CAP: s_ij = cap_l2 * tanh(cap_scale * q_i . key_j)),

    over the keys it sees: prefix keys j < L_g (LENGTHS[g], or P) and own keys j <= i with KEEP[b, j]:
        OUT[b, h, i] = sum_j 2^(s_ij - lse_i) value_j
        LSE[b, h, i] = lse_i = log2 sum_j 2^s_ij      (+inf, and OUT = 0, for a row that sees nothing)
    Online softmax: running maximum m (from NEG), rescaled sum l and accumulator acc, all float32.
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HQ
    i_hk = (i_bh % HQ) // REP
    i_g = tl.load(GROUP + i_b)
    m0 = i_m * BLOCK_M
    o_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < N
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_q = load_rows(Q + i_b * stride_qb + (i_bh % HQ) * stride_qh, o_m, m_m, o_d, m_d, stride_qn, MASK_ROWS=True,
                    EVEN_D=EVEN_D, UPCAST=UPCAST)  # [BLOCK_M, BLOCK_D]

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Prefix keys of the group: every query sees all L of them.
    L = P
    if HAS_LENGTHS:
        L = tl.load(LENGTHS + i_g).to(tl.int32)
    PK += i_g * stride_pg + i_hk * stride_ph
    PV += i_g * stride_pg + i_hk * stride_ph
    l_full = (L // BLOCK_N) * BLOCK_N
    for j0 in range(0, l_full, BLOCK_N):
        o_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        b_acc, b_m, b_l = _online_block(b_acc, b_m, b_l, b_q, PK, PV, o_n, o_n < L, o_m, o_d, m_d, stride_pn,
                                        qk_scale, cap_scale, cap_l2, MASK_LOAD=False, MASK_COLS=False,
                                        CAUSAL=False, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION,
                                        HAS_CAP=HAS_CAP)
    if l_full < L:
        o_n = (l_full + tl.arange(0, BLOCK_N)).to(tl.int64)
        b_acc, b_m, b_l = _online_block(b_acc, b_m, b_l, b_q, PK, PV, o_n, o_n < L, o_m, o_d, m_d, stride_pn,
                                        qk_scale, cap_scale, cap_l2, MASK_LOAD=True, MASK_COLS=True,
                                        CAUSAL=False, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION,
                                        HAS_CAP=HAS_CAP)

    # Own keys: blocks left of the diagonal (all j < m0 <= i), then the diagonal block(s). Padded keys
    # are loaded as 0 (whatever they hold must not reach the output).
    K += i_b * stride_kb + i_hk * stride_kh
    V += i_b * stride_kb + i_hk * stride_kh
    off_end = (m0 // BLOCK_N) * BLOCK_N
    for j0 in range(0, off_end, BLOCK_N):
        o_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < N
        if HAS_PADDING:
            m_n = tl.load(KEEP + i_b * N + o_n) != 0
        b_acc, b_m, b_l = _online_block(b_acc, b_m, b_l, b_q, K, V, o_n, m_n, o_m, o_d, m_d, stride_kn,
                                        qk_scale, cap_scale, cap_l2, MASK_LOAD=HAS_PADDING, MASK_COLS=HAS_PADDING,
                                        CAUSAL=False, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION,
                                        HAS_CAP=HAS_CAP)
    for j0 in range(off_end, tl.minimum(m0 + BLOCK_M, N), BLOCK_N):
        o_n = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < N
        if HAS_PADDING:
            m_n = m_n & (tl.load(KEEP + i_b * N + o_n, mask=m_n, other=0) != 0)
        b_acc, b_m, b_l = _online_block(b_acc, b_m, b_l, b_q, K, V, o_n, m_n, o_m, o_d, m_d, stride_kn,
                                        qk_scale, cap_scale, cap_l2, MASK_LOAD=True, MASK_COLS=True,
                                        CAUSAL=True, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION,
                                        HAS_CAP=HAS_CAP)

    m_seen = b_l > 0
    b_o = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]  # acc is 0 where nothing was seen
    b_lse = tl.where(m_seen, b_m + tl.log2(tl.where(m_seen, b_l, 1.0)), float("inf"))
    p_o = OUT + i_b * stride_ob + (i_bh % HQ) * stride_oh + o_m[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh * N + o_m, b_lse, mask=m_m)

"""Row kernel of the sparse-target KD loss on CUDA: the ``triton`` backend of ``promptkd.sparse.rows.sparse_rows``.

One program per row of a float32 [rows, V] chunk of student logits (what ``impl="chunked"`` builds with
cuBLAS), read BLOCK_V columns at a time, so any V fits; the row's k targets are one BLOCK_K tile. The launcher
is ``promptkd.sparse.rows.triton_sparse_rows``; it picks from ``CONFIGS`` only (kernels/aot.py compiles them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kd_rows import CONFIGS, RowsConfig, pick  # noqa: F401  (the same tile table as the KD row kernel)

# Marks the target columns while the rest of the row is summed, and pads the last tile: e^(NEG / T - m) is 0
# for any finite m. A rest whose maximum is NEG holds no mass.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def sparse_rows_kernel(
    S, IDS, LP, LABELS, SCALE, LOSS,
    V, K, stride_s, inv_t, soft_weight, hard_weight,
    TAIL: tl.constexpr, HAS_HARD: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row r = program_id(0) of S (float32 student logits, unit column stride), with targets IDS[r] (int64 [K],
    distinct, in [0, V) or -1) and teacher log-probabilities LP[r] (float32 [K]); g = SCALE[r]:

        LOSS[r] = soft_weight D + hard_weight (lse(s) - s[label])                   label = LABELS[r]
        S[r] <- g (soft_weight / T dD/da + hard_weight (softmax(s) - onehot(label)))  (NEED_GRAD)

    a = s / T, lse = log sum e^a over the whole row, lq = a - lse, p_i = e^LP_i (promptkd/sparse/rows.py):
    TAIL: D = sum_i p_i (lp_i - lq_i) + p_r (log p_r - log q_r), p_r = max(0, 1 - sum p), q_r the mass of q off
          the targets, from the rest's own maximum and sum (never 1 - sum q_i); dD/da = q - p on the targets,
          q (1 - p_r / q_r) off them.
    else: p^ = p / sum p, D = sum_i p^_i (log p^_i - lq_i), dD/da = q - p^; no soft term without target mass.

    Steps: the targets' logits are read and their columns set to NEG; sweep 1: the rest's maximum and online
    sums (a new maximum rescales them) of e^(a - max a) and, for the hard loss, e^(s - max s); the row's lse
    from those and the targets' own terms; sweep 2 (NEED_GRAD): the rest's gradient, a multiple of e^(a - max a)
    (plus the hard term), over S; then the targets' columns and the label's are written.
    """
    i_r = tl.program_id(0).to(tl.int64)
    p_s = S + i_r * stride_s
    o_b = tl.arange(0, BLOCK_V)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_ids = tl.load(IDS + i_r * K + o_k, mask=m_k, other=-1)  # [BLOCK_K]
    b_valid = b_ids >= 0
    b_at = tl.where(b_valid, b_ids, 0)
    b_lp = tl.load(LP + i_r * K + o_k, mask=m_k, other=0.0)
    b_saved = tl.load(p_s + b_at, mask=b_valid, other=NEG)  # the targets' logits
    label = 0
    s_label = 0.0
    if HAS_HARD:
        label = tl.load(LABELS + i_r)
        s_label = tl.load(p_s + label)
    tl.debug_barrier()
    tl.store(p_s + b_at, tl.full([BLOCK_K], NEG, tl.float32), mask=b_valid)
    tl.debug_barrier()

    # Sweep 1: the rest's maximum and online sums.
    m_s = tl.max(tl.full([BLOCK_V], NEG, tl.float32), 0)
    b_la = tl.zeros([BLOCK_V], tl.float32)
    b_lc = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + o_b
        b_s = tl.load(p_s + o_v, mask=o_v < V, other=NEG)  # [BLOCK_V]
        ms_new = tl.maximum(m_s, tl.max(b_s, 0))
        b_la = b_la * tl.exp((m_s - ms_new) * inv_t) + tl.exp(b_s * inv_t - ms_new * inv_t)
        if HAS_HARD:
            b_lc = b_lc * tl.exp(m_s - ms_new) + tl.exp(b_s - ms_new)
        m_s = ms_new
    rest_empty = m_s <= NEG
    mr = tl.where(rest_empty, 0.0, m_s * inv_t)
    zr = tl.where(rest_empty, 0.0, tl.sum(b_la, 0))

    # The row's log-sum from the rest's and the targets' terms; the loss.
    b_a = b_saved * inv_t
    m = tl.maximum(tl.where(rest_empty, NEG, mr), tl.max(tl.where(b_valid, b_a, NEG), 0))
    z = tl.where(rest_empty, 0.0, tl.exp(mr - m) * zr) + tl.sum(tl.where(b_valid, tl.exp(b_a - m), 0.0), 0)
    lse = m + tl.log(z)
    lq_rest = mr + tl.log(zr) - lse
    b_lq = b_a - lse
    p_sum = tl.sum(tl.where(b_valid, tl.exp(b_lp), 0.0), 0)
    if TAIL:
        soft = (p_sum == p_sum) | (p_sum != p_sum)  # True: every row has a soft term
        log_norm = 0.0
        p_rest = tl.where(rest_empty, 0.0, tl.maximum(1.0 - p_sum, 0.0))
    else:
        soft = (p_sum > 0.0) | (p_sum != p_sum)  # (a NaN target passes: a NaN loss)
        log_norm = tl.where(p_sum > 0.0, tl.log(p_sum), 0.0)
        p_rest = tl.zeros([BLOCK_K], tl.float32).sum(0)
    b_lph = b_lp - log_norm
    # p = 0 adds nothing; a NaN target passes (a NaN loss).
    d = tl.sum(tl.where(b_valid & (b_lph != float("-inf")), tl.exp(b_lph) * (b_lph - b_lq), 0.0), 0)
    d += tl.where(p_rest > 0.0, p_rest * (tl.log(tl.maximum(p_rest, 1e-38)) - lq_rest), 0.0)
    d = tl.where(soft, d, 0.0)
    loss = soft_weight * d
    lse1 = lse
    if HAS_HARD:
        if inv_t != 1.0:
            m1 = tl.maximum(tl.where(rest_empty, NEG, m_s), tl.max(tl.where(b_valid, b_saved, NEG), 0))
            z1 = tl.where(rest_empty, 0.0, tl.exp(m_s - m1) * tl.sum(b_lc, 0))
            z1 += tl.sum(tl.where(b_valid, tl.exp(b_saved - m1), 0.0), 0)
            lse1 = m1 + tl.log(z1)
        loss += hard_weight * (lse1 - s_label)
    tl.store(LOSS + i_r, loss)

    # Sweep 2: the gradient over S; then the targets' and the label's columns.
    if NEED_GRAD:
        g = tl.load(SCALE + i_r)
        k_soft = g * (soft_weight * inv_t)
        k_hard = g * hard_weight
        q_scale = tl.exp(mr - lse)  # q_v = e^(a_v - mr) q_scale off the targets
        c_soft = tl.where(soft, q_scale - tl.where(p_rest > 0.0, p_rest / zr, 0.0), 0.0)
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + o_b
            m_v = o_v < V
            b_s = tl.load(p_s + o_v, mask=m_v, other=NEG)
            b_g = (k_soft * c_soft) * tl.exp(b_s * inv_t - mr)
            if HAS_HARD:
                b_g += k_hard * tl.exp(b_s - lse1)
            tl.store(p_s + o_v, b_g, mask=m_v)
        tl.debug_barrier()
        b_g = tl.where(soft, k_soft * (tl.exp(b_lq) - tl.exp(b_lph)), 0.0)
        if HAS_HARD:
            b_g += k_hard * tl.exp(b_saved - lse1)
        tl.store(p_s + b_at, b_g, mask=b_valid)
        if HAS_HARD:
            tl.debug_barrier()
            tl.store(p_s + label, tl.load(p_s + label) - k_hard)

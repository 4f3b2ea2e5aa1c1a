"""Row kernel of the chunked KD loss on CUDA: the ``triton`` backend of ``promptkd.kd.rows.kd_rows``.

One program per row of a float32 [rows, V] chunk of student and teacher logits (what ``impl="chunked"``
builds with cuBLAS); the row is read BLOCK_V columns at a time, so any V fits. The launcher is
``promptkd.kd.rows.triton_rows``; it picks from ``CONFIGS`` only (kernels/aot.py compiles them).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from .common import FORWARD_KL, REVERSE_KL, divergence_terms

# Stands for -inf in padding columns and the running maxima: e^(NEG - m) is exactly 0, and NEG - NEG is 0.
NEG = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class RowsConfig:
    max_vocab: int | None  # the largest V this entry is for (None: any)
    block_v: int  # columns per tile
    num_warps: int
    num_stages: int


# The launcher takes the first entry whose max_vocab covers V. Large vocabularies (the case that matters:
# 32k-256k columns) get wide tiles and 16 warps: with one program per row and a chunk of ~130 rows at
# V = 128k, each SM holds about one row, so each must keep many bytes in flight.
CONFIGS = (RowsConfig(4096, 1024, 4, 1), RowsConfig(None, 4096, 16, 1))


def pick(vocab: int) -> RowsConfig:
    for cfg in CONFIGS:
        if cfg.max_vocab is None or vocab <= cfg.max_vocab:
            return cfg
    return CONFIGS[-1]


@triton.jit
def _student_grad(b_da, b_s, o_v, label, m_s, llc, k_soft, k_hard, HAS_HARD: tl.constexpr):
    """scale * d(loss)/ds for a tile: k_soft dD/da + k_hard (softmax(s) - onehot(label))."""
    b_ds = k_soft * b_da
    if HAS_HARD:
        b_ds += k_hard * (tl.exp((b_s - m_s) - llc) - tl.where(o_v == label, 1.0, 0.0))
    return b_ds


@triton.jit
def kd_rows_kernel(
    S, T, LABELS, SCALE, LOSS,
    V, stride_s, stride_t, inv_t, lw_p, lw_q, soft_weight, hard_weight,
    DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Row r = program_id(0) of S, T (float32 logits, unit column stride), with g = SCALE[r]:

        LOSS[r] = soft_weight D(p, q) + hard_weight (lse(s) - s[label])        label = LABELS[r]
        S[r] <- g (soft_weight / T dD/da + hard_weight (softmax(s) - onehot(label)))   (NEED_S)
        T[r] <- g  soft_weight / T dD/db                                               (NEED_T)

    a = s / T, b = t / T, lq = (a - max a) - log sum e^(a - max a) (the maximum first, as torch's
    log_softmax), lp likewise, q = e^lq, p = e^lp; dD/da = Gq - q cq, dD/db = Gp - p cp with
    (f, Gp, Gq) = common.divergence_terms and D = sum f, cp = sum Gp, cq = sum Gq (promptkd/kd/math.py).
    The KL divergences need only D: forward_kl dD/da = q - p, dD/db = p (lp - lq - D); reverse_kl
    dD/da = q (lq - lp - D), dD/db = p - q.

    Sweeps over the row, BLOCK_V columns at a time (sums kept per lane, reduced once per sweep):
      1. max s, max t and the online sums l_a = sum e^(a - max a), l_b, l_c = sum e^(s - max s) (CE at
         T = 1): a new maximum rescales the sums (max a = max s / T exactly, T > 0);
      2. D (and cp, cq); the gradient that needs no row sum (forward_kl's dD/da without NEED_T,
         reverse_kl's dD/db without NEED_S) is written here;
      3. otherwise the gradients, over S and T in place (each tile read before it is written).
    """
    i_r = tl.program_id(0).to(tl.int64)
    p_s = S + i_r * stride_s
    p_t = T + i_r * stride_t
    o_b = tl.arange(0, BLOCK_V)

    # Sweep 1: maxima and online sums.
    m_s = tl.max(tl.full([BLOCK_V], NEG, tl.float32), 0)
    m_t = m_s
    b_la = tl.zeros([BLOCK_V], tl.float32)
    b_lb = tl.zeros([BLOCK_V], tl.float32)
    b_lc = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + o_b
        m_v = o_v < V
        b_s = tl.load(p_s + o_v, mask=m_v, other=NEG)  # [BLOCK_V]
        b_t = tl.load(p_t + o_v, mask=m_v, other=NEG)
        ms_new = tl.maximum(m_s, tl.max(b_s, 0))
        mt_new = tl.maximum(m_t, tl.max(b_t, 0))
        ma_new = ms_new * inv_t
        mb_new = mt_new * inv_t
        b_la = b_la * tl.exp(m_s * inv_t - ma_new) + tl.exp(b_s * inv_t - ma_new)
        b_lb = b_lb * tl.exp(m_t * inv_t - mb_new) + tl.exp(b_t * inv_t - mb_new)
        if HAS_HARD:
            b_lc = b_lc * tl.exp(m_s - ms_new) + tl.exp(b_s - ms_new)
        m_s = ms_new
        m_t = mt_new
    ma = m_s * inv_t
    mb = m_t * inv_t
    lla = tl.log(tl.sum(b_la, 0))
    llb = tl.log(tl.sum(b_lb, 0))
    loss = 0.0
    label = 0
    llc = 0.0
    if HAS_HARD:
        llc = tl.log(tl.sum(b_lc, 0))
        label = tl.load(LABELS + i_r)
        s_label = tl.load(p_s + label)  # before any sweep overwrites S
        loss = -hard_weight * ((s_label - m_s) - llc)
    g = 0.0
    if NEED_S or NEED_T:
        g = tl.load(SCALE + i_r)
    k_soft = g * (soft_weight * inv_t)
    k_hard = g * hard_weight

    # Sweep 2: the divergence's row sums.
    MERGED_S: tl.constexpr = DIVERGENCE == FORWARD_KL and NEED_S and not NEED_T
    MERGED_T: tl.constexpr = DIVERGENCE == REVERSE_KL and NEED_T and not NEED_S
    b_d = tl.zeros([BLOCK_V], tl.float32)
    b_cp = tl.zeros([BLOCK_V], tl.float32)
    b_cq = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + o_b
        m_v = o_v < V
        # Padding columns read as the maxima: lq = -log l_a, lp = -log l_b there, every term finite.
        b_s = tl.load(p_s + o_v, mask=m_v, other=m_s)  # [BLOCK_V]
        b_t = tl.load(p_t + o_v, mask=m_v, other=m_t)
        b_lq = (b_s * inv_t - ma) - lla
        b_lp = (b_t * inv_t - mb) - llb
        if DIVERGENCE == FORWARD_KL:
            b_p = tl.exp(b_lp)
            b_d += tl.where(m_v, (b_lp - b_lq) * b_p, 0.0)
            if MERGED_S:
                b_ds = _student_grad(tl.exp(b_lq) - b_p, b_s, o_v, label, m_s, llc, k_soft, k_hard, HAS_HARD)
                tl.store(p_s + o_v, b_ds, mask=m_v)
        elif DIVERGENCE == REVERSE_KL:
            b_q = tl.exp(b_lq)
            b_d += tl.where(m_v, (b_lq - b_lp) * b_q, 0.0)
            if MERGED_T:
                tl.store(p_t + o_v, k_soft * (tl.exp(b_lp) - b_q), mask=m_v)
        else:
            b_f, b_gp, b_gq = divergence_terms(b_lp, b_lq, lw_p, lw_q, DIVERGENCE=DIVERGENCE)
            b_d += tl.where(m_v, b_f, 0.0)
            b_cp += tl.where(m_v, b_gp, 0.0)
            b_cq += tl.where(m_v, b_gq, 0.0)
    d = tl.sum(b_d, 0)
    cp = tl.sum(b_cp, 0)
    cq = tl.sum(b_cq, 0)
    tl.store(LOSS + i_r, soft_weight * d + loss)

    # Sweep 3: the gradients that need the row sums.
    if (NEED_S and not MERGED_S) or (NEED_T and not MERGED_T):
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + o_b
            m_v = o_v < V
            b_s = tl.load(p_s + o_v, mask=m_v, other=m_s)  # [BLOCK_V]
            b_t = tl.load(p_t + o_v, mask=m_v, other=m_t)
            b_lq = (b_s * inv_t - ma) - lla
            b_lp = (b_t * inv_t - mb) - llb
            b_q = tl.exp(b_lq)
            b_p = tl.exp(b_lp)
            if DIVERGENCE == FORWARD_KL:
                b_da = b_q - b_p
                b_db = ((b_lp - b_lq) - d) * b_p
            elif DIVERGENCE == REVERSE_KL:
                b_da = ((b_lq - b_lp) - d) * b_q
                b_db = b_p - b_q
            else:
                _, b_gp, b_gq = divergence_terms(b_lp, b_lq, lw_p, lw_q, DIVERGENCE=DIVERGENCE)
                b_da = b_gq - b_q * cq
                b_db = b_gp - b_p * cp
            if NEED_S:
                b_ds = _student_grad(b_da, b_s, o_v, label, m_s, llc, k_soft, k_hard, HAS_HARD)
                tl.store(p_s + o_v, b_ds, mask=m_v)
            if NEED_T:
                tl.store(p_t + o_v, k_soft * b_db, mask=m_v)

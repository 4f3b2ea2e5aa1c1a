"""What the kernels share: the KD kernels' divergence codes and @triton.jit helpers (logit tiles, log-space
mixtures, divergence terms; notation and formulas: promptkd/kd/math.py), and the prefix-attention kernels'
row loads. The planes of the KD statistics buffers are named in kd_planes.py."""

import triton
import triton.language as tl

# Divergence codes; promptkd.kd.settings.DIVERGENCE_CODES holds the same numbers.
LSE_ONLY = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
REVERSE_KL = tl.constexpr(2)
JSD = tl.constexpr(3)
SKEW_FORWARD_KL = tl.constexpr(4)
SKEW_REVERSE_KL = tl.constexpr(5)


@triton.jit
def logits_tile(X, W, B, o_n, o_v, m_n, m_v, D, stride_x, stride_w,
                FROM_LOGITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_V] tile: X[o_n] @ W[o_v].T (+ B[o_v]), or X[o_n, o_v] when FROM_LOGITS.

    o_n, o_v are int64 offsets; rows/columns outside (m_n, m_v) read as 0. UPCAST multiplies in
    float32 (the Triton interpreter's bfloat16 tl.dot is wrong; float32 products of bf16 are exact).
    """
    if FROM_LOGITS:
        b_z = tl.load(X + o_n[:, None] * stride_x + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.0)
        b_z = b_z.to(tl.float32)  # [BLOCK_N, BLOCK_V]
    else:
        b_z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_x = tl.load(X + o_n[:, None] * stride_x + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_w = tl.load(W + o_v[None, :] * stride_w + o_d[:, None], mask=m_v[None, :] & m_d[:, None], other=0.0)
            if UPCAST:
                b_x = b_x.to(tl.float32)  # [BLOCK_N, BLOCK_D]
                b_w = b_w.to(tl.float32)  # [BLOCK_D, BLOCK_V]
            b_z = tl.dot(b_x, b_w, b_z, input_precision=PRECISION)
    if HAS_BIAS:
        b_z += tl.load(B + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return b_z


@triton.jit
def tanh(x):
    """tanh in float32 without overflow: an odd series below |x| = 1/8 (where 1 - e^(-2|x|) would cancel; the
    first omitted term is below 2e-10 relative), (1 - e^(-2|x|)) / (1 + e^(-2|x|)) above."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    r = tl.where(ax < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -r, r)


@triton.jit
def transform(b_z, scale, cap, HAS_CAP: tl.constexpr):
    """A side's logit transform (promptkd.kd.settings.KDSettings.transform): cap * tanh(scale * z / cap), or
    scale * z without a cap. scale and cap are runtime values; HAS_CAP only switches the cap on."""
    b_z = b_z * scale
    if HAS_CAP:
        b_z = cap * tanh(b_z / cap)
    return b_z


@triton.jit
def transform_derivative(b_z, scale, cap, HAS_CAP: tl.constexpr):
    """d(transformed)/d(logit) from the transformed logits b_z: scale * (1 - (b_z / cap)^2), or scale."""
    if HAS_CAP:
        b_u = b_z / cap
        return scale * (1.0 - b_u * b_u)
    return tl.full(b_z.shape, 1.0, tl.float32) * scale


@triton.jit
def student_teacher_tiles(XS, WS, BS, XT, WT, BT, o_n, m_n, v0, v_end, DS, DT, stride_xs, stride_ws, stride_xt,
                          stride_wt, s_scale, s_cap, t_scale, t_cap, FROM_LOGITS: tl.constexpr,
                          HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, S_CAP: tl.constexpr,
                          T_CAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(o_v, m_v, s, t): the vocabulary columns o_v = v0 + [0, BLOCK_V) (int64; m_v = o_v < v_end) and
    the student and teacher logit tiles of tokens o_n there (logits_tile, float32 [BLOCK_N, BLOCK_V]), each
    after its side's transform (scale, then the cap where S_CAP / T_CAP)."""
    o_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    m_v = o_v < v_end
    b_s = logits_tile(XS, WS, BS, o_n, o_v, m_n, m_v, DS, stride_xs, stride_ws, FROM_LOGITS=FROM_LOGITS,
                      HAS_BIAS=HAS_BIAS_S, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, UPCAST=UPCAST,
                      PRECISION=PRECISION)
    b_t = logits_tile(XT, WT, BT, o_n, o_v, m_n, m_v, DT, stride_xt, stride_wt, FROM_LOGITS=FROM_LOGITS,
                      HAS_BIAS=HAS_BIAS_T, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, UPCAST=UPCAST,
                      PRECISION=PRECISION)
    return o_v, m_v, transform(b_s, s_scale, s_cap, HAS_CAP=S_CAP), transform(b_t, t_scale, t_cap, HAS_CAP=T_CAP)


@triton.jit
def log_add_exp(x, y):
    """log(exp(x) + exp(y)) without overflow; one argument may be -inf (a zero mixture weight)."""
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


@triton.jit
def divergence_terms(lp, lq, lw_p, lw_q, DIVERGENCE: tl.constexpr):
    """(f, Gp, Gq) per element from lp = log p, lq = log q; lw_p, lw_q = log weights of the mixture.

    D = sum f; dD/da = Gq - q sum(Gq); dD/db = Gp - p sum(Gp) (a, b: student, teacher logits / T).
    """
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIVERGENCE == FORWARD_KL:  # f = p (lp - lq)
        f = p * (lp - lq)
        gp = f + p
        gq = -p
    elif DIVERGENCE == REVERSE_KL:  # f = q (lq - lp)
        f = q * (lq - lp)
        gp = -q
        gq = f + q
    elif DIVERGENCE == JSD:  # f = b p (lp - lM) + (1-b) q (lq - lM), M = b p + (1-b) q
        lm = log_add_exp(lp + lw_p, lq + lw_q)
        gp = tl.exp(lp + lw_p) * (lp - lm)
        gq = tl.exp(lq + lw_q) * (lq - lm)
        f = gp + gq
    elif DIVERGENCE == SKEW_FORWARD_KL:  # f = p (lp - lM), M = a p + (1-a) q, w = (1-a) q / M
        lm = log_add_exp(lp + lw_p, lq + lw_q)
        pw = p * tl.exp(lq + lw_q - lm)
        f = p * (lp - lm)
        gp = f + pw
        gq = -pw
    else:  # SKEW_REVERSE_KL: f = q (lq - lM), M = (1-a) p + a q, w = (1-a) p / M
        lm = log_add_exp(lp + lw_p, lq + lw_q)
        qw = q * tl.exp(lp + lw_p - lm)
        f = q * (lq - lm)
        gp = -qw
        gq = f + qw
    return f, gp, gq


@triton.jit
def load_rows(base, o_r, m_r, o_d, m_d, stride_r, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
              UPCAST: tl.constexpr):
    """[rows, BLOCK_D] tile base[o_r * stride_r + o_d] (unit stride along d). Rows outside m_r (when
    MASK_ROWS) and columns outside m_d (unless EVEN_D: the head dim fills BLOCK_D) read as 0.
    UPCAST returns float32 (the interpreter's bfloat16 tl.dot is wrong; float32 products of bf16 are exact)."""
    ptrs = base + o_r[:, None] * stride_r + o_d[None, :]
    if MASK_ROWS:
        if EVEN_D:
            b_x = tl.load(ptrs, mask=m_r[:, None], other=0.0)
        else:
            b_x = tl.load(ptrs, mask=m_r[:, None] & m_d[None, :], other=0.0)
    else:
        if EVEN_D:
            b_x = tl.load(ptrs)
        else:
            b_x = tl.load(ptrs, mask=m_d[None, :], other=0.0)
    if UPCAST:
        b_x = b_x.to(tl.float32)
    return b_x


@triton.jit
def scores(b_q, b_k, qk_scale, cap_scale, cap_l2, HAS_CAP: tl.constexpr, PRECISION: tl.constexpr):
    """Prefix attention's base-2 scores of a [BLOCK_M, BLOCK_D] query tile and a [BLOCK_N, BLOCK_D] key tile
    (kernels/prefix_attention_forward.py), and the tanh of the cap (for the backward's derivative 1 - tanh^2;
    without a cap the raw scores, unused)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_CAP:
        b_th = tanh(b_s * cap_scale)
        b_s = b_th * cap_l2
    else:
        b_th = b_s
        b_s = b_s * qk_scale
    return b_s, b_th

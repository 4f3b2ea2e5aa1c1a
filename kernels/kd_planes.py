"""The planes of the KD kernels' float32 statistics buffers, named once for the kernels (kd_forward.py,
kd_backward.py) and their launcher (promptkd/kd/triton_impl.py). Plane k of a buffer [planes, N] or
[planes, N, splits] starts at k times the plane's size. The indices are ``tl.constexpr`` so that kernels
can use them; the launcher indexes with them too (they convert to int)."""

import triton.language as tl

# Every buffer but PARTIAL starts with the running maximum m and the sum of exponentials l (rescaled by
# m) of each of a = s / T, b = t / T and s: per split l itself, per token log l.
MAX_A, SUM_A = tl.constexpr(0), tl.constexpr(1)  # a = s / T
MAX_B, SUM_B = tl.constexpr(2), tl.constexpr(3)  # b = t / T
MAX_C, SUM_C = tl.constexpr(4), tl.constexpr(5)  # s at T = 1 (the cross-entropy; HAS_HARD only)

# STATS [STAT_PLANES, N, splits]: per split, from the online forward pass (kd_forward.kd_online_kernel).
ACC = tl.constexpr(6)  # the KL's centred sum (forward_kl, reverse_kl)
AT = tl.constexpr(7)  # a at argmax b (forward_kl) or b at argmax a (reverse_kl)
TARGET = tl.constexpr(8)  # s[label] (0 in splits that do not hold it)
STAT_PLANES = 9

# ROWS [GRAD + 1, N]: per token, what the forward keeps for the backward (kd_backward.kd_backward_kernel);
# the mixture-divergence pass (kd_forward.kd_terms_kernel) reads its planes MAX_A to SUM_B.
CP = tl.constexpr(6)  # sum Gp (forward_kl: C = acc / l_b, reverse_kl: b_at)
CQ = tl.constexpr(7)  # sum Gq (forward_kl: a_at, reverse_kl: C = acc / l_a)
GRAD = tl.constexpr(8)  # g = d(loss)/d(token loss): the last plane, added by the backward's launcher

# PARTIAL [TERM_PLANES, N, splits]: per split, from the mixture-divergence pass.
F_SUM = tl.constexpr(0)  # sum f = D
GP_SUM = tl.constexpr(1)  # sum Gp = cp
GQ_SUM = tl.constexpr(2)  # sum Gq = cq
TERM_PLANES = 3

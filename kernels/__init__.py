"""Triton kernels of promptkd (installed as ``promptkd.kernels``).

common.py     shared @triton.jit helpers: logit tiles, log-space mixtures, divergence terms (KD);
              row loads (prefix attention); the divergence codes
kd_planes.py  the named planes of the KD statistics buffers (kernels and launcher)
kd_forward.py forward kernels: online log-sum-exp (+ KL) statistics, mixture-divergence sums
kd_backward.py backward kernel: recomputed logit tiles -> logit gradients
prefix_attention_forward.py / prefix_attention_backward.py  prefix-attention kernels
configs.py    the launch configurations the launchers may pick (all compiled ahead of time in CI)
aot.py        ahead-of-time compilation of every configuration for sm_80 / sm_90 (no GPU needed)
"""

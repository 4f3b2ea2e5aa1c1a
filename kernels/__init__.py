"""Triton kernels of promptkd (installed as ``promptkd.kernels``).

common.py     shared @triton.jit helpers: logit tiles, log-space mixtures, divergence terms
kd_forward.py forward kernels: online log-sum-exp (+ KL) statistics, mixture-divergence sums
kd_backward.py backward kernel: recomputed logit tiles -> logit gradients
configs.py    the launch configurations the launchers may pick (all compiled ahead of time in CI)
"""

"""Agreement with TRL's chunked divergence (``trl.kernels.chunked_divergence``, TRL 1.16): for every setting it
supports (beta 0, 1 and between; temperature; each side's logit scale and final-logit softcap), promptkd's
per-token losses and student gradients are no further from float64 than TRL's, plus 1e-5.

TRL's beta convention is promptkd's: 0 the forward KL(teacher || student), 1 the reverse KL, between the JSD
with mixture beta * p + (1 - beta) * q (promptkd's ``jsd`` with the same beta). Its own error is checked
too, so the two compute the same thing (else the comparison would say nothing). Skipped where TRL is not
installed (it is not in the test extra: it pulls datasets, pandas and pyarrow).
"""

from __future__ import annotations

import pytest
import torch

import promptkd

chunked_divergence = pytest.importorskip("trl.kernels.chunked_divergence",
                                         reason="TRL is not installed (pip install 'trl==1.16.*')")

N, D, V = 37, 64, 1001
CASES = [(beta, t, forms) for beta in (0.0, 0.3, 0.5, 1.0) for t in (1.0, 2.0)
         for forms in ((1.0, None, 1.0, None), (0.5, 30.0, 2.0, 20.0))]


def inputs():
    """float64 hidden states and heads whose logits have std ~10 (where TRL's JSD gradient error shows)."""
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    ws = torch.randn(V, D, generator=g, dtype=torch.float64) * 10 / D ** 0.5
    wt = torch.randn(V, D, generator=g, dtype=torch.float64) * 10 / D ** 0.5
    upstream = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return hs, ws, ht, wt, upstream


def run(loss_fn, hs, ws, upstream, dtype):
    h, w = (x.detach().to(dtype, copy=True).requires_grad_() for x in (hs, ws))
    per_token = loss_fn(h, w)
    (per_token.double() * upstream).sum().backward()
    return per_token.double().detach(), h.grad.double(), w.grad.double()


def err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("beta,temperature,forms", CASES,
                         ids=[f"beta{b}-T{t}-{'capped' if f[1] else 'plain'}" for b, t, f in CASES])
def test_no_further_from_float64_than_trl(beta, temperature, forms):
    hs, ws, ht, wt, upstream = inputs()
    s_scale, s_cap, t_scale, t_cap = forms
    divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")

    def ours(impl, dtype):
        def loss(h, w):
            return promptkd.fused_linear_kd_loss(
                h, w, ht.to(dtype), wt.to(dtype), divergence=divergence, beta=beta if divergence == "jsd" else 0.5,
                temperature=temperature, reduction="none", student_logit_scale=s_scale, student_softcap=s_cap,
                teacher_logit_scale=t_scale, teacher_softcap=t_cap, impl=impl)
        return loss

    def trl(h, w):
        return chunked_divergence.ChunkedDivergenceFunction.apply(h, w, None, ht.float(), wt.float(), None, beta,
                                                                  temperature, s_scale, s_cap, t_scale, t_cap)[0]

    truth = run(ours("reference", torch.float64), hs, ws, upstream, torch.float64)
    theirs = run(trl, hs, ws, upstream, torch.float32)
    for impl in ("chunked", "torch"):
        mine = run(ours(impl, torch.float32), hs, ws, upstream, torch.float32)
        for name, t, o, x in zip(("loss", "student_hidden", "student_weight"), truth, mine, theirs, strict=True):
            assert err(x, t) < 1e-3, f"{name}: TRL computes something else ({err(x, t):.2g} from float64)"
            assert err(o, t) <= err(x, t) + 1e-5, f"{impl} {name}: {err(o, t):.3g} vs TRL's {err(x, t):.3g}"

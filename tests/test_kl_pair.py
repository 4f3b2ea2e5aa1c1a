"""``fused_linear_kl_pair_loss``: KL(p || q) + anchor_scale KL(p || a) with p's logits computed once (the
PromptKD prompt step), against float64 evaluations of the formula, and its GEMM count."""

import math

import pytest
import torch

import promptkd
import promptkd.kd.torch_impl
from helpers import TOL, CountOps, cpu_kernels, err

SIDES = ("hidden", "weight", "bias", "student_hidden", "student_weight", "student_bias",
         "anchor_hidden", "anchor_weight", "anchor_bias")


def make_pair(n=29, dims=(40, 56, 24), vocabs=(301, 301, 301), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, d, v in zip(("", "student_", "anchor_"), dims, vocabs, strict=True):
        out[prefix + "hidden"] = torch.randn(n, d, generator=g, dtype=torch.float64)
        out[prefix + "weight"] = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / d ** 0.5)
        if bias:
            out[prefix + "bias"] = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    return out


def truth(x: dict, labels, anchor_scale, temperature, vocab, reduction, grad_out):
    """The formula in float64 on full logits, its gradients by autograd."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}

    def logp(prefix):
        z = leaves[prefix + "hidden"] @ leaves[prefix + "weight"][:vocab].T
        if prefix + "bias" in leaves:
            z = z + leaves[prefix + "bias"][:vocab]
        return torch.log_softmax(z / temperature, -1)

    lp, lq, la = logp(""), logp("student_"), logp("anchor_")
    per_token = (lp.exp() * ((lp - lq) + anchor_scale * (lp - la))).sum(-1)
    counted = torch.ones_like(per_token) if labels is None else (labels != -100).double()
    total = (per_token * counted).sum()
    loss = total / counted.sum().clamp_min(1) if reduction == "mean" else total
    (loss * grad_out).backward()
    return {"loss": loss.detach(), **{k: v.grad for k, v in leaves.items()}}


def run_pair(x: dict, dtype, labels, frozen=(), grad_out=1.7, impl="chunked", **kwargs):
    leaves = {k: v.detach().to(dtype).requires_grad_(k not in frozen) for k, v in x.items()}
    with cpu_kernels(impl) as name:
        loss = promptkd.fused_linear_kl_pair_loss(
            leaves["hidden"], leaves["weight"], leaves["student_hidden"], leaves["student_weight"],
            leaves["anchor_hidden"], leaves["anchor_weight"], labels, bias=leaves.get("bias"),
            student_bias=leaves.get("student_bias"), anchor_bias=leaves.get("anchor_bias"), impl=name, **kwargs)
        (loss * grad_out).backward()
    out = {"loss": loss.detach().double()}
    out.update({k: v.grad.double() for k, v in leaves.items() if k not in frozen})
    return out


@pytest.mark.parametrize("impl", ["chunked", "chunked-torchops"])
@pytest.mark.parametrize("case", ["plain", "hot-ignored-sum", "padding-no-bias", "anchor-off"])
def test_pair_matches_fp64(impl, case, monkeypatch):
    monkeypatch.setattr(promptkd.kd.torch_impl, "CHUNK_BYTES", 8 * 301 * 6)  # 6-row chunks: several of them
    temperature, anchor_scale, reduction, labels, vocab = 1.0, 0.6, "mean", None, None
    vocabs, bias = (301, 301, 301), True
    if case == "hot-ignored-sum":
        temperature, reduction = 2.5, "sum"
        labels = torch.arange(29) % 7
        labels[::3] = -100
    if case == "padding-no-bias":
        vocabs, vocab, bias = (301, 320, 307), 290, False
    if case == "anchor-off":
        anchor_scale = 0.0
    x = make_pair(vocabs=vocabs, bias=bias)
    kw = dict(anchor_scale=anchor_scale, temperature=temperature, reduction=reduction, vocab_size=vocab)
    want = truth(x, labels, anchor_scale, temperature, vocab or 301, reduction, 1.7)
    got = run_pair(x, torch.float32, labels, impl=impl, **kw)
    eager = run_pair(x, torch.float32, labels, impl="reference", **kw)
    for key, ref in want.items():
        assert torch.isfinite(got[key]).all(), key
        e_got, e_eager = err(got[key], ref), err(eager[key], ref)
        assert e_got <= e_eager + TOL[torch.float32], f"{key}: {e_got:.3g} > eager {e_eager:.3g}"
    if vocab is not None:  # padding rows get exactly zero gradient
        for prefix, v in zip(("", "student_", "anchor_"), vocabs, strict=True):
            assert got[prefix + "weight"][vocab:v].abs().max() == 0
    if anchor_scale == 0.0:
        assert got["anchor_hidden"].abs().max() == 0 and got["anchor_weight"].abs().max() == 0


@pytest.mark.parametrize("frozen", [SIDES[1:], SIDES[:3] + SIDES[6:]])
def test_pair_one_side(frozen):
    """Gradients to p's hidden states alone (the prompt step) and to the student alone: the merged passes."""
    x = make_pair(n=13)
    want = truth(x, None, 0.3, 1.0, 301, "mean", 1.7)
    got = run_pair(x, torch.float32, None, frozen=frozen, anchor_scale=0.3)
    eager = run_pair(x, torch.float32, None, frozen=frozen, anchor_scale=0.3, impl="reference")
    assert set(got) == {"loss"} | set(SIDES) - set(frozen)
    for key in got:
        assert err(got[key], want[key]) <= err(eager[key], want[key]) + TOL[torch.float32], key


def test_pair_gemm_count_and_no_grad():
    """The prompt step's case, gradient to p's hidden states: 3 logit GEMMs and 1 contraction, all in forward;
    nothing in backward. Under no_grad: the 3 logit GEMMs only, and the same value."""
    x = {k: v.float() for k, v in make_pair(n=16, bias=False).items()}
    h = x["hidden"].clone().requires_grad_()
    args = (h, x["weight"], x["student_hidden"], x["student_weight"], x["anchor_hidden"], x["anchor_weight"])
    with cpu_kernels("chunked-torchops"):
        with CountOps() as fwd:
            loss = promptkd.fused_linear_kl_pair_loss(*args, anchor_scale=0.5)
        with CountOps() as bwd:
            loss.backward()
        with torch.no_grad(), CountOps() as plain:
            value = promptkd.fused_linear_kl_pair_loss(*args, anchor_scale=0.5)
    assert (fwd.matmuls, bwd.matmuls, plain.matmuls) == (4, 0, 3)
    assert torch.equal(value, loss.detach())
    assert torch.isfinite(h.grad).all() and h.grad.abs().max() > 0


def test_pair_first_order_only():
    x = {k: v.float().requires_grad_() for k, v in make_pair(n=5, bias=False).items()}
    loss = promptkd.fused_linear_kl_pair_loss(x["hidden"], x["weight"], x["student_hidden"], x["student_weight"],
                                              x["anchor_hidden"], x["anchor_weight"])
    (g,) = torch.autograd.grad(loss, x["hidden"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("change, match", [
    (dict(reduction="none"), "reduction"),
    (dict(anchor_scale=-1.0), "anchor_scale"),
    (dict(anchor_scale=math.nan), "anchor_scale"),
    (dict(impl="triton"), "impl"),
    (dict(temperature=0.0), "temperature"),
    (dict(anchor_weight=torch.zeros(300, 24)), "vocabularies differ"),
    (dict(vocab_size=400), "vocab_size"),
    (dict(student_hidden=torch.zeros(4, 56)), "student_hidden leading shape"),
    (dict(anchor_weight=torch.zeros(301, 23)), "anchor_weight must be"),
    (dict(bias=torch.zeros(300)), "bias must have shape"),
    (dict(student_weight=torch.zeros(301, 56, dtype=torch.float64)), "student_weight has dtype"),
    (dict(labels=torch.zeros(29)), "labels must be an integer"),
])
def test_pair_bad_input(change, match):
    x = {k: v.float() for k, v in make_pair(bias=False).items()}
    kw = dict(hidden=x["hidden"], weight=x["weight"], student_hidden=x["student_hidden"],
              student_weight=x["student_weight"], anchor_hidden=x["anchor_hidden"], anchor_weight=x["anchor_weight"])
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        promptkd.fused_linear_kl_pair_loss(**kw)

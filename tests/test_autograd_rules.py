"""The rules of promptkd/autograd.py for every op and implementation: double backward and autocast.

Double backward: ``reference`` is plain autograd (gradgradcheck in float64); ``torch`` and ``triton``
give unchanged first-order gradients under create_graph=True and raise a RuntimeError naming the op
as soon as anyone differentiates those gradients, also when they are summed with other terms.
Autocast (CPU, bfloat16): loss/output and gradients against float64 within eager autocast's error
+ tol, bit-identical to the same call outside autocast on inputs cast to bfloat16, and the same
whether backward runs inside or outside the autocast block.
"""

from __future__ import annotations

import re

import pytest
import torch

import promptkd
from helpers import SIDES, assert_close_to_truth, linear_loss, make_inputs, make_labels, run
from promptkd.attention.reference import prefix_attention_reference
from promptkd.kd.reference import fused_linear_kd_loss_reference
from promptkd.kd.settings import DIVERGENCES, KDSettings
from promptkd.kernels import configs

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
BF16 = torch.bfloat16
ATTENTION_TILES = {"forward": configs.AttentionConfig(32, 16, 4, 1), "dq": configs.AttentionConfig(32, 16, 4, 1),
                   "dkdv": configs.AttentionConfig(16, 32, 4, 1)}


@pytest.fixture(autouse=True)
def small_tiles_and_poison(monkeypatch):
    monkeypatch.setattr(configs, "ATTENTION_CONFIGS", {k: ATTENTION_TILES[k[0]] for k in configs.ATTENTION_CONFIGS})
    monkeypatch.setattr("promptkd.launch.POISON", float("nan"))


def _refusal(op: str) -> str:
    return re.escape(op) + r": double backward is not supported.*impl='reference'"


def _check_first_order_only(fn, leaves: list, op: str):
    """create_graph=True: the same first-order gradients (also through .backward); differentiating any of
    them, alone or summed with a differentiable term (a Hessian-vector product), raises naming ``op``."""
    plain = torch.autograd.grad(fn(*leaves), leaves)
    graph = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
    for a, b in zip(plain, graph, strict=True):
        assert b.requires_grad and torch.equal(a, b.detach())
    for g in graph:
        with pytest.raises(RuntimeError, match=_refusal(op)):
            torch.autograd.grad(g.sum(), leaves, retain_graph=True, allow_unused=True)
    x = leaves[0]
    mixed, = torch.autograd.grad(fn(*leaves) + (x.double() ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=_refusal(op)):  # a Hessian-vector product through the sum
        torch.autograd.grad((mixed * torch.ones_like(mixed)).sum(), x)
    fn(*leaves).backward(create_graph=True)
    for leaf, a in zip(leaves, plain, strict=True):
        assert torch.equal(leaf.grad.detach(), a)
        leaf.grad = None  # break the parameter <-> gradient cycle create_graph makes


# ---- double backward: KD losses ----

def _kd_leaves(dtype=torch.float32, n=5, vs=37):
    x = make_inputs(n=n, ds=6, dt=4, vs=vs)
    return [x[k].to(dtype).requires_grad_() for k in SIDES]


def _linear(impl, labels, **kw):
    def fn(hs, ws, bs, ht, wt, bt):
        return promptkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, impl=impl,
                                             **kw)
    return fn


def _logits(impl, labels, **kw):
    def fn(s, t):
        return promptkd.kd_loss(s, t, labels, impl=impl, **kw)
    return fn


@pytest.mark.parametrize("impl", ["chunked", "torch", "triton"])
@pytest.mark.parametrize("inputs", ["hidden", "logits"])
def test_kd_double_backward_is_refused(impl, inputs):
    labels = make_labels((5,), 37, "some")
    kw = dict(divergence="jsd", hard_weight=0.3, temperature=2.0)
    which = "'triton'" if impl == "triton" else "'chunked' / 'torch'"  # one Function runs both CPU impls
    op = f"fused_linear_kd_loss / kd_loss (impl={which})"
    if inputs == "hidden":
        _check_first_order_only(_linear(impl, labels, **kw), _kd_leaves(), op)
    else:
        g = torch.Generator().manual_seed(3)
        leaves = [torch.randn(5, 37, generator=g).requires_grad_() for _ in range(2)]
        _check_first_order_only(_logits(impl, labels, **kw), leaves, op)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_kd_reference_double_backward(div):
    """impl='reference' is plain autograd: second derivatives match finite differences (float64)."""
    labels = make_labels((3,), 5, "some")
    kw = dict(divergence=div, hard_weight=0.4, temperature=1.5, reduction="none", beta=0.3, alpha=0.2)
    leaves = _kd_leaves(torch.float64, n=3, vs=5)
    # fast_mode: random projections of the second derivative (the full Jacobian is 20x slower here)
    assert torch.autograd.gradgradcheck(_linear("reference", labels, **kw), leaves, fast_mode=True)
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    assert torch.autograd.gradgradcheck(_logits("reference", labels, vocab_size=5, **kw), logits, fast_mode=True)


# ---- double backward: prefix attention ----

def _attention_inputs(dtype=torch.float64, b=3, g=2, p=5, n=9, hq=2, hkv=1, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, n, d), (b, hkv, n, d), (b, hkv, n, d), (g, hkv, p, d), (g, hkv, p, d))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _keep(b, n):
    keep = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        keep[i, : 2 * i] = False  # sample 1 (group 0, no prefix key) has rows that see nothing
    return keep


ATTENTION_KW = dict(prefix_lengths=[0, 4], group_index=[1, 0, 1])


def _attention(impl, **kw):
    def fn(*tensors):
        out = promptkd.prefix_attention(*tensors, impl=impl, **kw)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return (out * weights).sum()  # a generic upstream gradient
    return fn


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_prefix_attention_double_backward_is_refused(impl):
    leaves = _attention_inputs(torch.float32)
    _check_first_order_only(_attention(impl, key_padding_mask=_keep(3, 9), **ATTENTION_KW), leaves,
                            f"prefix_attention (impl='{impl}')")


def test_prefix_attention_reference_double_backward():
    leaves = _attention_inputs(b=3, g=2, p=3, n=4, hq=2, hkv=1, d=2)
    kw = dict(prefix_lengths=[0, 2], group_index=[1, 0, 1], key_padding_mask=_keep(3, 4))
    assert torch.autograd.gradgradcheck(lambda *t: promptkd.prefix_attention(*t, impl="reference", **kw), leaves)


def test_hf_after_output_double_backward():
    """hf_attention._AfterOutput (identity on recorded keys, a zero gradient to the pass's output) passes
    gradients through unchanged, so its double backward is that of the identity: correct."""
    from promptkd.hf.attention import _AfterOutput

    gen = torch.Generator().manual_seed(5)
    after, a, b = (torch.randn(2, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))

    def fn(after, a, b):
        ta, tb = _AfterOutput.apply(after, a, b)
        return (ta.sin() * tb + after.cos()).sum()

    assert torch.autograd.gradgradcheck(fn, (after, a, b))


# ---- autocast ----

def _grad_out(out: torch.Tensor) -> torch.Tensor:
    """The upstream gradient of tests/helpers.run (seed 2, values in [0.5, 1.5))."""
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    return g.to(out.dtype)


def _autocast_run(fn, leaves: dict, inside: bool) -> dict:
    """Output and leaf gradients under CPU bfloat16 autocast, backward inside or after the block."""
    with torch.autocast("cpu", dtype=BF16):
        out = fn(**leaves)
        if inside:
            out.backward(_grad_out(out))
    if not inside:
        out.backward(_grad_out(out))
    return {"out": out.detach().double(), **{k: v.grad.double() for k, v in leaves.items()}}


def _leaves(x: dict, dtype) -> dict:
    return {k: v.detach().to(dtype).requires_grad_() for k, v in x.items()}


def _check_autocast(fn, eager_fn, x: dict, plain: dict, truth: dict):
    """The rule, for float32 leaves under bf16 autocast (see the module docstring)."""
    inside = _autocast_run(fn, _leaves(x, torch.float32), inside=True)
    after = _autocast_run(fn, _leaves(x, torch.float32), inside=False)
    eager = _autocast_run(eager_fn, _leaves(x, torch.float32), inside=False)
    assert_close_to_truth(inside, eager, truth, BF16)
    for key in truth:
        assert torch.equal(inside[key], plain[key]), f"{key}: differs from the call on bfloat16 inputs"
        assert torch.equal(inside[key], after[key]), f"{key}: backward inside autocast differs"


@pytest.mark.parametrize("impl", ["reference", "chunked", "torch", "triton"])
def test_kd_autocast(impl):
    x = make_inputs(n=20, ds=40, dt=24, vs=301)
    labels = make_labels((20,), 301, "some")
    kw = dict(divergence="jsd", hard_weight=0.3, temperature=2.0)
    settings = KDSettings(**kw, vocab_size=301)

    def fused(**t):
        return linear_loss(**t, labels=labels, impl=impl, **kw)

    def eager(**t):  # the textbook formulas under autocast itself
        return fused_linear_kd_loss_reference(t["student_hidden"], t["student_weight"], t["teacher_hidden"],
                                              t["teacher_weight"], labels, settings, t["student_bias"],
                                              t["teacher_bias"])

    truth, plain = (run(linear_loss, x, dtype, labels, impl=i, **kw)
                    for dtype, i in ((torch.float64, "reference"), (BF16, impl)))
    truth["out"], plain["out"] = truth.pop("loss"), plain.pop("loss")
    _check_autocast(fused, eager, x, plain, truth)


@pytest.mark.parametrize("impl", ["reference", "chunked", "torch", "triton"])
def test_kd_loss_autocast_keeps_logits_and_promotes_mixed(impl):
    """kd_loss under autocast: logits are not cast to bfloat16; mixed dtypes go to the wider one."""
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 33, generator=g), torch.randn(4, 33, generator=g)
    labels = make_labels((4,), 33, "some")
    kw = dict(divergence="reverse_kl", hard_weight=0.2, impl=impl)

    def call(s, t, autocast: bool):
        s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss = promptkd.kd_loss(s, t, labels, **kw)
            loss.backward()
        return loss.detach(), s.grad, t.grad

    same = call(s, t, autocast=True), call(s, t, autocast=False)
    assert all(torch.equal(a, b) for a, b in zip(*same, strict=True))
    mixed, wide = call(s.to(BF16), t, autocast=True), call(s.to(BF16).float(), t, autocast=False)
    assert mixed[1].dtype == BF16 and torch.equal(mixed[1], wide[1].to(BF16))
    assert torch.equal(mixed[0], wide[0]) and torch.equal(mixed[2], wide[2])
    with pytest.raises(ValueError, match="teacher_logits"):  # outside autocast, mixed dtypes are an error
        promptkd.kd_loss(s.to(BF16), t, labels, **kw)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_prefix_attention_autocast(impl):
    x = dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), (t.detach() for t in _attention_inputs()), strict=True))
    kw = dict(key_padding_mask=_keep(3, 9), **ATTENTION_KW)
    lengths, group = torch.tensor(kw["prefix_lengths"]), torch.tensor(kw["group_index"])

    def fused(impl=impl, **t):
        return promptkd.prefix_attention(**t, impl=impl, **kw)

    def eager(**t):  # the reference formulas under autocast itself
        return prefix_attention_reference(*t.values(), lengths, group, kw["key_padding_mask"], 1 / 16 ** 0.5)

    leaves = _leaves(x, torch.float64)
    out = fused(**leaves, impl="reference")
    out.backward(_grad_out(out))
    truth = {"out": out.detach(), **{k: v.grad for k, v in leaves.items()}}
    leaves = _leaves(x, BF16)
    out = fused(**leaves)
    out.backward(_grad_out(out))
    plain = {"out": out.detach().double(), **{k: v.grad.double() for k, v in leaves.items()}}
    _check_autocast(fused, eager, x, plain, truth)


def test_autocast_dtype_checks_name_the_argument():
    """float64 is left alone by autocast: mixing it with a float32 input under autocast is an error."""
    x = make_inputs(n=3, ds=4, dt=4, vs=7, bias=False)
    with torch.autocast("cpu", dtype=BF16), pytest.raises(ValueError, match="teacher_weight.*autocast"):
        promptkd.fused_linear_kd_loss(x["student_hidden"].float(), x["student_weight"].float(),
                                      x["teacher_hidden"].float(), x["teacher_weight"])
    q, k, v, pk, pv = _attention_inputs(torch.float32, b=1, g=1, p=2, n=3)
    with torch.autocast("cpu", dtype=BF16), pytest.raises(ValueError, match="prefix_v.*autocast"):
        promptkd.prefix_attention(q, k, v, pk, pv.double())

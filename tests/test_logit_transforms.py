"""Logit transforms in the KD losses: ``student_logit_scale`` / ``teacher_logit_scale`` and ``student_softcap`` /
``teacher_softcap`` (z -> c * tanh(s * z / c)), as Cohere-style scales and Gemma 2's final softcap make a
model's own logits.

Against float64 (rule of tests/helpers.py: fused error <= same-dtype eager error + tol) for every
divergence, the hard loss, temperature, biases, ignored tokens, both sides' gradients and one side's,
ordinary logits and logits far past the cap; the reference's transform itself against the formula
written out; the pair loss; the module forms; bad values; the fused Triton kernels (interpreter) and
their float32 tanh. The sparse ops: ``fused_linear_topk``'s ``logit_scale`` / ``softcap`` (the teacher's
targets) and the sparse loss's ``student_logit_scale`` / ``student_softcap``, against float64 the same way.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import promptkd
import promptkd.kd.reference
import promptkd.kd.torch_impl
import promptkd.kd.triton_impl
from helpers import (
    CPU_IMPLS,
    SIDES,
    assert_close_to_truth,
    cpu_kernels,
    linear_loss,
    logits_loss,
    make_inputs,
    make_labels,
    run,
)
from promptkd.kd.settings import DIVERGENCES
from promptkd.kernels.common import tanh


@pytest.fixture(autouse=True)
def small_chunks_and_poison(monkeypatch):
    monkeypatch.setattr(promptkd.kd.torch_impl, "CHUNK_BYTES", 4 * 1001 * 8)  # 8-row chunks, the last partial
    monkeypatch.setattr("promptkd.launch.POISON", float("nan"))


#: (id, logit std of make_inputs, transforms): both sides scaled and capped at ordinary sizes; logits
#: ~30x past the caps (the cap's derivative underflows to ~0 for most of them); one side only.
TRANSFORMS = [
    ("both", 20.0, dict(student_logit_scale=0.7, teacher_logit_scale=1.3, student_softcap=15.0, teacher_softcap=30.0)),
    ("far-past-cap", 600.0, dict(student_softcap=20.0, teacher_softcap=30.0)),
    ("scale-only", 5.0, dict(student_logit_scale=2.5, teacher_logit_scale=0.4)),
    ("teacher-cap", 50.0, dict(teacher_softcap=30.0)),
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("name,std,forms", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_fused_linear_with_transforms_matches_fp64(impl, div, name, std, forms):
    x = make_inputs(bias=True, logit_scale=std)
    labels = make_labels((37,), 1001, "some")
    kwargs = dict(divergence=div, temperature=2.0, hard_weight=0.3, beta=0.3, alpha=0.2, **forms)
    truth = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(linear_loss, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, torch.float32, labels, impl=impl, **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.float32)
    plain = run(linear_loss, x, torch.float64, labels, impl="reference", divergence=div, temperature=2.0,
                hard_weight=0.3, beta=0.3, alpha=0.2)
    assert not torch.allclose(plain["loss"], truth["loss"]), "the transforms changed nothing"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_one_side_with_transforms_matches_fp64(impl, side, div):
    """Gradients to one side only: the other side's cap keeps no derivative, the asked side's does."""
    x = make_inputs(bias=True, logit_scale=20.0)
    labels = make_labels((37,), 1001, "none")
    frozen = [k for k in SIDES if not k.startswith(side)]
    kwargs = dict(divergence=div, hard_weight=0.4, frozen=frozen, **TRANSFORMS[0][2])
    truth = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(linear_loss, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, torch.float32, labels, impl=impl, **kwargs)
    assert set(fused) == {"loss", *(k for k in SIDES if k.startswith(side))}
    assert_close_to_truth(fused, eager, truth, torch.float32)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("red", ["mean", "none"])
def test_kd_loss_on_logits_with_transforms(impl, red):
    g = torch.Generator().manual_seed(4)
    x = {"student_logits": torch.randn(3, 7, 1001, generator=g, dtype=torch.float64) * 40,
         "teacher_logits": torch.randn(3, 7, 1001, generator=g, dtype=torch.float64) * 40}
    labels = make_labels((3, 7), 1001, "some")
    kwargs = dict(divergence="reverse_kl", reduction=red, hard_weight=0.5, **TRANSFORMS[0][2])
    truth = run(logits_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(logits_loss, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(logits_loss, x, torch.float32, labels, impl=impl, **kwargs)
    assert fused["loss"].shape == ((3, 7) if red == "none" else ())
    assert_close_to_truth(fused, eager, truth, torch.float32)


def test_the_reference_transform_is_the_formula():
    """The float64 truth above applies z -> c * tanh(s * z / c) to each side before the loss: the same loss
    on logits transformed by hand, without transform arguments, gives the same value and gradients."""
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(9, 301, generator=g, dtype=torch.float64) * 50).requires_grad_()
    t = (torch.randn(9, 301, generator=g, dtype=torch.float64) * 50).requires_grad_()
    labels = torch.randint(0, 301, (9,), generator=g)
    kwargs = dict(divergence="jsd", temperature=1.5, hard_weight=0.2, impl="reference")
    ours = promptkd.kd_loss(s, t, labels, student_logit_scale=0.5, student_softcap=10.0, teacher_logit_scale=2.0,
                            teacher_softcap=30.0, **kwargs)
    by_hand = promptkd.kd_loss(10.0 * torch.tanh(0.5 * s / 10.0), 30.0 * torch.tanh(2.0 * t / 30.0), labels, **kwargs)
    torch.testing.assert_close(ours, by_hand, rtol=1e-14, atol=0)
    for a, b in zip(torch.autograd.grad(ours, (s, t)), torch.autograd.grad(by_hand, (s, t)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("anchor_scale", [0.0, 0.7])
def test_pair_loss_with_transforms(anchor_scale):
    """fused_linear_kl_pair_loss: the teacher's transform on p and the anchor, the student's on q, against
    float64; the reference equals two fused_linear_kd_loss references with the anchor as a teacher-transformed
    student."""
    g = torch.Generator().manual_seed(6)
    d, v = 24, 1001
    x = {name: torch.randn(*shape, generator=g, dtype=torch.float64) * sc for name, shape, sc in
         (("hidden", (21, d), 1.0), ("weight", (v, d), 8.0), ("student_hidden", (21, d), 1.0),
          ("student_weight", (v, d), 8.0), ("anchor_hidden", (21, d), 1.0), ("anchor_weight", (v, d), 8.0))}
    labels = make_labels((21,), v, "some")
    forms = dict(student_logit_scale=0.8, teacher_logit_scale=1.2, student_softcap=12.0, teacher_softcap=25.0)

    def pair(**kw):
        tensors = [kw.pop(k) for k in x]
        return promptkd.fused_linear_kl_pair_loss(*tensors, anchor_scale=anchor_scale, temperature=1.5, **forms, **kw)

    truth = run(pair, x, torch.float64, labels, impl="reference")
    eager = run(pair, x, torch.float32, labels, impl="reference")
    fused = run(pair, x, torch.float32, labels, impl="chunked")
    assert_close_to_truth(fused, eager, truth, torch.float32)
    f64 = {k: t.clone() for k, t in x.items()}
    two = (promptkd.fused_linear_kd_loss(f64["student_hidden"], f64["student_weight"], f64["hidden"], f64["weight"],
                                         labels, temperature=1.5, impl="reference", **forms)
           + anchor_scale * promptkd.fused_linear_kd_loss(
               f64["anchor_hidden"], f64["anchor_weight"], f64["hidden"], f64["weight"], labels, temperature=1.5,
               impl="reference", student_logit_scale=1.2, student_softcap=25.0, teacher_logit_scale=1.2,
               teacher_softcap=25.0))
    torch.testing.assert_close(pair(**f64, labels=labels, impl="reference"), two, rtol=1e-12, atol=0)


def test_modules_carry_the_transforms():
    x = make_inputs(bias=False, logit_scale=20.0)
    labels = make_labels((37,), 1001, "none")
    forms = TRANSFORMS[0][2]
    module = promptkd.FusedLinearKDLoss(divergence="jsd", **forms)
    assert "student_softcap=15.0" in repr(module)
    args = (x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], labels)
    torch.testing.assert_close(module(*args), promptkd.fused_linear_kd_loss(*args, divergence="jsd", **forms))
    s, t = args[0] @ args[1].T, args[2] @ args[3].T
    torch.testing.assert_close(promptkd.KDLoss(**forms)(s, t, labels), promptkd.kd_loss(s, t, labels, **forms))


@pytest.mark.parametrize("name,value,message", [
    ("student_softcap", 0.0, "student_softcap must be > 0"), ("teacher_softcap", -1.0, "teacher_softcap must be > 0"),
    ("student_logit_scale", 0.0, "student_logit_scale must be > 0"),
    ("teacher_logit_scale", float("nan"), "teacher_logit_scale must be finite"),
    ("teacher_softcap", float("inf"), "teacher_softcap must be finite"),
])
def test_bad_transform_values_are_refused(name, value, message):
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=message):
        promptkd.kd_loss(z, z, **{name: value})
    with pytest.raises(TypeError, match="student_softcap must be a Python int or float"):
        promptkd.kd_loss(z, z, student_softcap="30")


TRITON_CASES = [(dtype, *case) for case in TRANSFORMS[:2] for dtype in (torch.float32, torch.bfloat16)
                if dtype == torch.float32 or case[0] == "both"]  # bfloat16 on logits of 600: both errors are noise


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("dtype,name,std,forms", TRITON_CASES, ids=[f"{c[1]}-{str(c[0])[6:]}" for c in TRITON_CASES])
def test_triton_kernels_with_transforms_match_fp64(div, dtype, name, std, forms, monkeypatch):
    """The fused kernels (Triton's interpreter here) transform each logit tile (common.transform: a float32
    tanh without overflow) and chain the cap's derivative in backward; several vocabulary chunks."""
    monkeypatch.setattr(promptkd.kd.triton_impl, "BACKWARD_CHUNK_BYTES", 37 * 4 * 300)
    x = make_inputs(bias=True, logit_scale=std)
    labels = make_labels((37,), 1001, "some")
    kwargs = dict(divergence=div, temperature=2.0, hard_weight=0.3, beta=0.3, alpha=0.2, **forms)
    truth = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(linear_loss, x, dtype, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, dtype, labels, impl="triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)


def test_triton_kernels_on_logits_with_transforms():
    g = torch.Generator().manual_seed(4)
    x = {"student_logits": torch.randn(5, 301, generator=g, dtype=torch.float64) * 40,
         "teacher_logits": torch.randn(5, 301, generator=g, dtype=torch.float64) * 40}
    labels = make_labels((5,), 301, "none")
    kwargs = dict(divergence="jsd", hard_weight=0.5, **TRANSFORMS[0][2])
    truth = run(logits_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(logits_loss, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(logits_loss, x, torch.float32, labels, impl="triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.float32)


@triton.jit
def _apply_tanh(X, Y, N, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(Y + o, tanh(tl.load(X + o, mask=o < N)), mask=o < N)


def test_the_triton_tanh_is_accurate():
    """common.tanh against torch's in float64, over small arguments (the series), the switch at 1/8, large
    ones and past float32's exp range: within 2 float32 ulps of 1 absolute, and relative for small ones."""
    x = torch.cat([torch.logspace(-8, 2.5, 400), torch.tensor([0.0, 0.1249, 0.125, 0.1251, 1e4, 1e30])])
    x = torch.cat([x, -x]).float()
    y = torch.empty_like(x)
    _apply_tanh[(1,)](x, y, x.numel(), BLOCK=1024)
    want = torch.tanh(x.double())
    assert ((y.double() - want).abs() <= 2.4e-7).all()
    small = x.abs() < 0.125
    assert ((y.double() - want).abs()[small] <= 2.4e-7 * want.abs()[small]).all()


# ---- the sparse ops: fused_linear_topk (the teacher's targets) and the sparse loss (the student's side) ----

SPARSE_FORMS = [
    ("scaled-capped", 20.0, dict(student_logit_scale=0.7, student_softcap=15.0)),
    ("far-past-cap", 600.0, dict(student_softcap=20.0)),
    ("scale-only", 5.0, dict(student_logit_scale=2.5)),
]


def _sparse_case(std, seed=0, n=37, d=24, v=1001, k=8, sampled=False):
    """float64 student leaves with logits of std ~``std``, and targets from a capped, scaled teacher."""
    g = torch.Generator().manual_seed(seed)
    x = {"student_hidden": torch.randn(n, d, generator=g, dtype=torch.float64),
         "student_weight": torch.randn(v, d, generator=g, dtype=torch.float64) * (std / d ** 0.5),
         "student_bias": torch.randn(v, generator=g, dtype=torch.float64)}
    th = torch.randn(n, d, generator=g, dtype=torch.float64)
    tw = torch.randn(v, d, generator=g, dtype=torch.float64) * (40.0 / d ** 0.5)
    forms = dict(logit_scale=1.3, softcap=30.0)
    targets = (promptkd.fused_linear_topk(th.float(), tw.float(), k, samples=k, seed=seed + 3, **forms) if sampled
               else promptkd.fused_linear_topk(th, tw, k, **forms))
    return x, targets.ids, targets.logprobs.float()


def _sparse_loss(ids, lp):
    def fn(**kw):
        return promptkd.fused_linear_sparse_kd_loss(kw.pop("student_hidden"), kw.pop("student_weight"), ids, lp,
                                                    kw.pop("labels"), student_bias=kw.pop("student_bias"), **kw)
    return fn


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("name,std,forms", SPARSE_FORMS, ids=[f[0] for f in SPARSE_FORMS])
def test_sparse_loss_with_student_transform_matches_fp64(impl, tail, name, std, forms):
    x, ids, lp = _sparse_case(std, sampled=not tail)
    labels = make_labels((37,), 1001, "some")
    kwargs = dict(tail=tail, temperature=1.5, hard_weight=0.3, **forms)
    fn = _sparse_loss(ids, lp)
    truth = run(fn, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(fn, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(fn, x, torch.float32, labels, impl=impl, **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.float32)
    plain = run(fn, x, torch.float64, labels, impl="reference", tail=tail, temperature=1.5, hard_weight=0.3)
    assert not torch.allclose(plain["loss"], truth["loss"]), "the transform changed nothing"


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("red", ["mean", "none"])
def test_sparse_loss_on_logits_with_transform(impl, red):
    """sparse_kd_loss on logits: the transform applies to the given logits; the gradient flows through it."""
    _, ids, lp = _sparse_case(20.0)
    g = torch.Generator().manual_seed(4)
    x = {"student_logits": torch.randn(37, 1001, generator=g, dtype=torch.float64) * 40.0}
    labels = make_labels((37,), 1001, "some")

    def fn(**kw):
        return promptkd.sparse_kd_loss(kw.pop("student_logits"), ids, lp, kw.pop("labels"), **kw)

    kwargs = dict(temperature=2.0, hard_weight=0.2, reduction=red, student_logit_scale=0.8, student_softcap=12.0)
    truth = run(fn, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(fn, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(fn, x, torch.float32, labels, impl=impl, **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.float32)


def test_sparse_reference_transform_is_the_formula():
    """The sparse loss's float64 truth with a transform equals the loss on logits transformed by hand."""
    _, ids, lp = _sparse_case(20.0)
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(37, 1001, generator=g, dtype=torch.float64) * 50).requires_grad_()
    labels = torch.randint(0, 1001, (37,), generator=g)
    for tail in (True, False):
        kwargs = dict(tail=tail, temperature=1.5, hard_weight=0.2, impl="reference")
        ours = promptkd.sparse_kd_loss(s, ids, lp, labels, student_logit_scale=0.5, student_softcap=10.0, **kwargs)
        by_hand = promptkd.sparse_kd_loss(10.0 * torch.tanh(0.5 * s / 10.0), ids, lp, labels, **kwargs)
        torch.testing.assert_close(ours, by_hand, rtol=1e-14, atol=0)
        torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(by_hand, s)[0],
                                   rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("backend", ["chunked", "chunked-torchops"])
@pytest.mark.parametrize("forms", [dict(logit_scale=1.3, softcap=30.0), dict(softcap=5.0), dict(logit_scale=0.25)],
                         ids=["scaled-capped", "tight-cap", "scale-only"])
def test_topk_targets_of_a_transformed_teacher(backend, forms):
    """fused_linear_topk with a transform: the top-k of the transformed logits, with their log-probabilities
    under softmax(transformed logits / T), against float64 logits transformed by hand; sampled targets draw
    from the transformed distribution (the same draws as the reference sampler's)."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(29, 24, generator=g, dtype=torch.float64)
    w = torch.randn(1001, 24, generator=g, dtype=torch.float64) * (40.0 / 24 ** 0.5)
    b = torch.randn(1001, generator=g, dtype=torch.float64)
    z = promptkd.kd.reference.transform_logits(h @ w.T + b, forms.get("logit_scale", 1.0), forms.get("softcap"))
    want = torch.log_softmax(z / 1.7, dim=1).topk(6, dim=1)
    with cpu_kernels(backend) as impl:
        got = promptkd.fused_linear_topk(h.float(), w.float(), 6, bias=b.float(), temperature=1.7, impl=impl,
                                         **forms)
        sampled = promptkd.fused_linear_topk(h.float(), w.float(), 8, bias=b.float(), samples=8, seed=5,
                                             impl=impl, **forms)
    picked = torch.log_softmax(z / 1.7, dim=1).gather(1, got.ids)
    # the chosen ids hold the 6 largest values (a tight cap saturates many logits to one float32 value: the
    # ids among such near-ties may differ, the values may not), and their log-probabilities are float64's
    torch.testing.assert_close(picked, want.values, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.logprobs.double(), picked, rtol=0, atol=2e-5)
    ref = promptkd.fused_linear_topk(h.float(), w.float(), 8, bias=b.float(), samples=8, seed=5, impl="reference",
                                     **forms)
    assert torch.equal(sampled.ids, ref.ids)
    plain = promptkd.fused_linear_topk(h.float(), w.float(), 6, bias=b.float(), temperature=1.7)
    assert not torch.allclose(plain.logprobs, got.logprobs), "the transform changed nothing"


def test_sparse_modules_carry_the_transform():
    x, ids, lp = _sparse_case(20.0)
    forms = SPARSE_FORMS[0][2]
    module = promptkd.FusedLinearSparseKDLoss(tail=True, **forms)
    assert "student_softcap=15.0" in repr(module)
    args = (x["student_hidden"], x["student_weight"], ids, lp)
    torch.testing.assert_close(module(*args), promptkd.fused_linear_sparse_kd_loss(*args, **forms))
    s = args[0] @ args[1].T
    torch.testing.assert_close(promptkd.SparseKDLoss(**forms)(s, ids, lp), promptkd.sparse_kd_loss(s, ids, lp, **forms))


@pytest.mark.parametrize("call,name,value,error,message", [
    ("loss", "student_softcap", 0.0, ValueError, "student_softcap must be > 0"),
    ("loss", "student_logit_scale", -1.0, ValueError, "student_logit_scale must be > 0"),
    ("loss", "student_softcap", "30", TypeError, "student_softcap must be a Python int or float"),
    ("topk", "softcap", -2.0, ValueError, "softcap must be > 0"),
    ("topk", "logit_scale", float("nan"), ValueError, "logit_scale must be finite"),
    ("topk", "softcap", "30", TypeError, "softcap must be a Python int or float"),
])
def test_bad_sparse_transform_values_are_refused(call, name, value, error, message):
    h, w = torch.zeros(2, 4), torch.zeros(5, 4)
    ids, lp = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1)
    with pytest.raises(error, match=message):
        if call == "loss":
            promptkd.fused_linear_sparse_kd_loss(h, w, ids, lp, **{name: value})
        else:
            promptkd.fused_linear_topk(h, w, 1, **{name: value})

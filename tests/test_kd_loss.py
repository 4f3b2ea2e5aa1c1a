"""Losses and all six gradients against a float64 evaluation of the formulas.

Rule: |impl - fp64| <= |same-dtype eager - fp64| + tol (tests/helpers.py). Kernel buffers are
filled with NaN before kernels write them; chunk budgets are shrunk so several chunks run.
"""

import itertools

import pytest
import torch

import promptkd
import promptkd.torch_impl
import promptkd.triton_impl
from helpers import SIDES, assert_close_to_truth, exact_truth, linear_loss, logits_loss, make_inputs, make_labels, run
from promptkd.settings import DIVERGENCES


@pytest.fixture(autouse=True)
def small_chunks_and_poison(monkeypatch):
    monkeypatch.setattr(promptkd.torch_impl, "CHUNK_BYTES", 4 * 1001 * 8)  # 8-row chunks
    monkeypatch.setattr(promptkd.triton_impl, "BACKWARD_CHUNK_BYTES", 37 * 4 * 300)  # several vocab chunks
    monkeypatch.setattr("promptkd.launch.POISON", float("nan"))


IMPL_DTYPES = [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)]
# (temperature, bias, hard_weight) rotate through all 8 combinations across the other axes.
EXTRAS = list(itertools.product((1.0, 2.5), (False, True), (0.0, 0.3)))
CASES = []
AXES = itertools.product(DIVERGENCES, ("mean", "sum", "none"), ("none", "some", "all"))
for i, (div, red, ignored) in enumerate(AXES):
    for j in range(2):
        CASES.append((div, red, ignored, *EXTRAS[(2 * i + j * 3) % len(EXTRAS)]))


def _case_id(c):
    div, red, ignored, t, bias, hard = c
    return f"{div}-{red}-ign_{ignored}-T{t}-{'bias' if bias else 'nobias'}-hard{hard}"


def _check(impl, dtype, div, red, ignored, t, bias, hard, **shape):
    x = make_inputs(bias=bias, **shape)
    labels = make_labels(x["student_hidden"].shape[:-1], shape.get("vs", 1001), ignored)
    kwargs = dict(divergence=div, reduction=red, temperature=t, hard_weight=hard, beta=0.3, alpha=0.2)
    truth = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(linear_loss, x, dtype, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, dtype, labels, impl=impl, **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)
    return fused


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES, ids=[f"{i}-{str(d)[6:]}" for i, d in IMPL_DTYPES])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fused_linear_matches_fp64(impl, dtype, case):
    fused = _check(impl, dtype, *case)
    if case[2] == "all":  # no counted token: zero loss and zero gradients, never NaN
        for key, value in fused.items():
            assert torch.equal(value, torch.zeros_like(value)), key


@pytest.mark.parametrize("div", DIVERGENCES)
def test_triton_bfloat16(div):
    _check("triton", torch.bfloat16, div, "mean", "some", 2.5, True, 0.3)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("div", DIVERGENCES)
def test_different_vocabularies_with_padding(impl, div):
    """Vs != Vt: vocab_size real rows, the rest padding with zero gradient."""
    x = make_inputs(vs=1024, vt=1008, ds=48, dt=56)
    labels = make_labels((37,), 1001, "some")
    kwargs = dict(divergence=div, vocab_size=1001, hard_weight=0.3)
    truth = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(linear_loss, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, torch.float32, labels, impl=impl, **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.float32)
    for key in ("student_weight", "student_bias", "teacher_weight", "teacher_bias"):
        assert torch.equal(fused[key][1001:], torch.zeros_like(fused[key][1001:])), key


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES, ids=[f"{i}-{str(d)[6:]}" for i, d in IMPL_DTYPES])
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("red", ["mean", "none"])
def test_kd_loss_on_logits(impl, dtype, div, red):
    g = torch.Generator().manual_seed(3)
    x = {"student_logits": torch.randn(5, 7, 515, generator=g, dtype=torch.float64) * 2,
         "teacher_logits": torch.randn(5, 7, 515, generator=g, dtype=torch.float64) * 2}
    labels = make_labels((5, 7), 500, "some")
    kwargs = dict(divergence=div, reduction=red, temperature=1.5, hard_weight=0.2, vocab_size=500)
    truth = run(logits_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(logits_loss, x, dtype, labels, impl="reference", **kwargs)
    fused = run(logits_loss, x, dtype, labels, impl=impl, **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)
    assert fused["loss"].shape == ((5, 7) if red == "none" else ())
    assert torch.equal(fused["student_logits"][..., 500:], torch.zeros(5, 7, 15, dtype=torch.float64))


NUMERICS = [("huge_logits", dict(logit_scale=1e4), 1.0), ("one_hot_teacher", dict(), 1.0),
            ("T0.1", dict(logit_scale=5.0), 0.1), ("T10", dict(logit_scale=5.0), 10.0)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("name,scale,t", NUMERICS, ids=[n[0] for n in NUMERICS])
def test_extreme_numerics(impl, div, name, scale, t):
    """Finite and at least as close to the exact values as eager torch in the same dtype."""
    x = make_inputs(n=19, vs=301, bias=False, **scale)
    if name == "one_hot_teacher":  # teacher logits: one column 60 above the rest
        x["teacher_weight"][7] = x["teacher_hidden"].mean(0) * 60 / x["teacher_hidden"].mean(0).norm() ** 2
        x["teacher_hidden"] = x["teacher_hidden"].mean(0).expand(19, -1).clone()
    labels = make_labels((19,), 301, "some")
    kwargs = dict(divergence=div, temperature=t, hard_weight=0.5)
    truth, scales = exact_truth(x, labels, **kwargs)  # float64 itself is not precise enough here
    eager = run(linear_loss, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, torch.float32, labels, impl=impl, **kwargs)
    # Near one-hot, a gradient can be a cancellation of terms far larger than itself: every float32
    # method is then at its noise floor, so errors are measured against the size of the summed terms.
    assert_close_to_truth(fused, eager, truth, torch.float32, scales)


def test_exact_truth_agrees_with_float64_on_ordinary_inputs():
    x = make_inputs(n=5, vs=31, ds=8, dt=6)
    labels = make_labels((5,), 31, "some")
    for div in DIVERGENCES:
        kwargs = dict(divergence=div, temperature=1.5, hard_weight=0.3, reduction="none")
        truth, _ = exact_truth(x, labels, **kwargs)
        ref = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
        for key in truth:
            torch.testing.assert_close(truth[key], ref[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_leading_shape_and_module(impl):
    x = make_inputs(lead=(3, 11), vs=257)
    labels = make_labels((3, 11), 257, "some")
    module = promptkd.FusedLinearKDLoss(divergence="jsd", beta=0.4, reduction="none", hard_weight=0.1, impl=impl)
    got = module(x["student_hidden"].float(), x["student_weight"].float(), x["teacher_hidden"].float(),
                 x["teacher_weight"].float(), labels, student_bias=x["student_bias"].float(),
                 teacher_bias=x["teacher_bias"].float())
    want = promptkd.fused_linear_kd_loss(*(x[k].float() for k in SIDES[:2] + SIDES[3:5]), labels, divergence="jsd",
                                         beta=0.4, reduction="none", hard_weight=0.1, impl="reference",
                                         student_bias=x["student_bias"].float(),
                                         teacher_bias=x["teacher_bias"].float())
    assert got.shape == (3, 11)
    assert (got[labels == -100] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert "jsd" in repr(module)
    logits = promptkd.KDLoss(divergence="reverse_kl", impl=impl)(want[..., None].expand(3, 11, 4).float(),
                                                                   torch.zeros(3, 11, 4))
    assert logits.shape == ()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradients_only_where_asked(impl):
    x = {k: v.float() for k, v in make_inputs(vs=257).items()}
    x["teacher_hidden"].requires_grad_()
    loss = promptkd.fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                         x["teacher_weight"], impl=impl, divergence="reverse_kl")
    loss.backward()
    assert x["teacher_hidden"].grad is not None and torch.isfinite(x["teacher_hidden"].grad).all()
    assert all(x[k].grad is None for k in SIDES if k != "teacher_hidden")
    # Only the teacher side needs gradients: compare with the reference.
    ref_x = {k: v.detach().clone() for k, v in x.items()}
    ref_x["teacher_hidden"].requires_grad_()
    promptkd.fused_linear_kd_loss(ref_x["student_hidden"], ref_x["student_weight"], ref_x["teacher_hidden"],
                                  ref_x["teacher_weight"], impl="reference", divergence="reverse_kl").backward()
    torch.testing.assert_close(x["teacher_hidden"].grad, ref_x["teacher_hidden"].grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        out = promptkd.fused_linear_kd_loss(x["student_hidden"].requires_grad_(), x["student_weight"],
                                            x["teacher_hidden"], x["teacher_weight"], impl=impl)
    assert out.grad_fn is None


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_no_tokens(impl, red):
    x = {k: v.float().requires_grad_() for k, v in make_inputs(n=0, vs=129).items()}
    loss = promptkd.fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                         x["teacher_weight"], impl=impl, reduction=red)
    assert loss.shape == ((0,) if red == "none" else ())
    loss.sum().backward()
    assert loss.sum().item() == 0.0 and (x["student_weight"].grad == 0).all()


def test_triton_is_deterministic():
    x = make_inputs(n=45, vs=700)
    labels = make_labels((45,), 700, "some")
    a = run(linear_loss, x, torch.float32, labels, impl="triton", divergence="jsd", hard_weight=0.2)
    b = run(linear_loss, x, torch.float32, labels, impl="triton", divergence="jsd", hard_weight=0.2)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("div", DIVERGENCES)
def test_gpu_matches_fp64(dtype, div):
    x = {k: v.cuda() for k, v in make_inputs(n=300, ds=256, dt=384, vs=5003).items()}
    labels = make_labels((300,), 5003, "some").cuda()
    kwargs = dict(divergence=div, temperature=2.0, hard_weight=0.3)
    truth = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(linear_loss, x, dtype, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, dtype, labels, impl="triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_inputs_are_not_modified(impl, div):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(9, 130, generator=g).requires_grad_(), torch.randn(9, 130, generator=g)
    labels = make_labels((9,), 130, "some")
    s0, t0 = s.detach().clone(), t.clone()
    promptkd.kd_loss(s, t, labels, divergence=div, temperature=2.0, hard_weight=0.5, impl=impl).backward()
    assert torch.equal(s.detach(), s0) and torch.equal(t, t0)


def test_kernel_divergence_codes_match_settings():
    from promptkd.kernels import common
    from promptkd.settings import DIVERGENCE_CODES

    for name in DIVERGENCES:
        assert getattr(common, name.upper()).value == DIVERGENCE_CODES[name], name

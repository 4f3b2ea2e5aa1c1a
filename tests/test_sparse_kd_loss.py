"""The loss on sparse targets and its gradients against a float64 evaluation of the formulas (both ``tail``
settings, hard loss, ignored tokens, reductions, odd shapes, several chunks), its meaning (the full forward KL
with full targets; the expected gradient of sampled targets), stability where q_r underflows, the targets'
checks, gradients only where asked, double backward, torch.compile."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import promptkd
import promptkd.kd.torch_impl
from helpers import CPU_IMPLS, CountOps, assert_close_to_truth, cpu_kernels, run
from promptkd.sparse.settings import SparseKDSettings
from promptkd.sparse.torch_impl import sparse_forward


@pytest.fixture(autouse=True)
def small_chunks_and_poison(monkeypatch):
    monkeypatch.setattr(promptkd.kd.torch_impl, "CHUNK_BYTES", 4 * 1001 * 8)  # 8-row chunks
    monkeypatch.setattr("promptkd.launch.POISON", float("nan"))  # output buffers filled with NaN first


def make_case(n=37, d=40, v=1001, k=8, *, sampled=False, lead=None, seed=0, bias=True):
    """float64 student leaves, and targets from a teacher: top-k (rows with -1 padding, one row with none) or
    sampled."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    x = {"student_hidden": torch.randn(*shape, d, generator=g, dtype=torch.float64),
         "student_weight": torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / d ** 0.5)}
    if bias:
        x["student_bias"] = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    th = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    tw = torch.randn(v, d, generator=g, dtype=torch.float64) * (3.0 / d ** 0.5)
    if sampled:
        targets = promptkd.fused_linear_topk(th.float(), tw.float(), k, samples=k, seed=seed + 11)
    else:
        targets = promptkd.fused_linear_topk(th, tw, k)
    ids, lp = targets.ids.clone(), targets.logprobs.float().clone()
    flat_ids, flat_lp = ids.view(-1, k), lp.view(-1, k)
    if not sampled and flat_ids.shape[0] > 5:
        flat_ids[3, k // 2:] = -1  # a row with fewer targets
        flat_ids[5, :] = -1  # a row with none
        flat_lp[3, k // 2:] = 0.0  # (ignored where the id is -1)
    return x, ids, lp


def sparse_loss(ids, lp, **fixed):
    def fn(**kw):
        kw.update(fixed)
        return promptkd.fused_linear_sparse_kd_loss(kw.pop("student_hidden"), kw.pop("student_weight"), ids, lp,
                                                    kw.pop("labels"), **kw)
    return fn


def labels_for(shape, v, ignored, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, shape, generator=g)
    if ignored == "some":
        labels.view(-1)[::3] = -100
    elif ignored == "all":
        labels[...] = -100
    return labels


EXTRAS = list(itertools.product((1.0, 2.5), (False, True), (0.0, 0.3)))  # temperature, bias, hard_weight
CASES = []
for i, (tail, red, ignored) in enumerate(itertools.product((True, False), ("mean", "sum", "none"),
                                                           ("none", "some", "all"))):
    for j in range(2):
        CASES.append((tail, red, ignored, *EXTRAS[(2 * i + 3 * j) % len(EXTRAS)]))


def _case_id(c):
    tail, red, ignored, t, bias, hard = c
    return f"{'tail' if tail else 'renorm'}-{red}-ign_{ignored}-T{t}-{'bias' if bias else 'nobias'}-hard{hard}"


def _check(impl, dtype, tail, red, ignored, t, bias, hard, sampled=None, **shape):
    x, ids, lp = make_case(sampled=not tail if sampled is None else sampled, bias=bias, **shape)
    v = x["student_weight"].shape[0]
    labels = labels_for(x["student_hidden"].shape[:-1], v, ignored)
    kw = dict(tail=tail, reduction=red, temperature=t, hard_weight=hard, soft_weight=0.8)
    fn = sparse_loss(ids, lp)
    wrap = (lambda **a: fn(**{**a, "student_bias": a.pop("student_bias", None)}))
    truth = run(wrap, x, torch.float64, labels, impl="reference", **kw)
    eager = run(wrap, x, dtype, labels, impl="reference", **kw)
    fused = run(wrap, x, dtype, labels, impl=impl, **kw)
    assert_close_to_truth(fused, eager, truth, dtype)
    return fused


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_fp64(impl, case):
    fused = _check(impl, torch.float32, *case)
    if case[2] == "all":  # no counted token: zero loss and gradients
        for key, value in fused.items():
            assert torch.equal(value, torch.zeros_like(value)), key


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("red", ["mean", "none"])
def test_renormalised_topk_targets(impl, red):
    # tail=False on top-k targets (their probabilities sum below 1): p^ = p / sum p.
    _check(impl, torch.float32, False, red, "some", 1.5, True, 0.2, sampled=False)


@pytest.mark.parametrize("impl", ["chunked", "torch"])
@pytest.mark.parametrize("tail", [True, False])
def test_odd_shapes_and_leading_dims(impl, tail):
    _check(impl, torch.float32, tail, "mean", "some", 1.0, True, 0.0, n=None, lead=(3, 7), v=301, k=5)
    _check(impl, torch.float32, tail, "none", "none", 2.0, False, 0.2, n=1, v=17, k=17 if tail else 6)


@pytest.mark.parametrize("tail", [True, False])
def test_bfloat16_inputs(tail):
    _check("chunked", torch.bfloat16, tail, "mean", "some", 1.0, True, 0.3)


def test_full_vocabulary_targets_give_the_forward_kl():
    # With every id a target and the teacher's exact log-probabilities, tail=True is KL(p || q) exactly, and
    # so is tail=False (the targets sum to 1): loss and gradients equal fused_linear_kd_loss's.
    g = torch.Generator().manual_seed(4)
    n, d, v = 23, 16, 97
    hs, ws = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    ht, wt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    targets = promptkd.fused_linear_topk(ht, wt, v, temperature=1.5)
    for tail in (True, False):
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            a, b = (t.detach().to(dtype).clone().requires_grad_() for t in (hs, ws))
            loss = promptkd.fused_linear_sparse_kd_loss(a, b, targets.ids, targets.logprobs.to(dtype), tail=tail,
                                                        temperature=1.5)
            loss.backward()
            c, e = (t.detach().to(dtype).clone().requires_grad_() for t in (hs, ws))
            kd = promptkd.fused_linear_kd_loss(c, e, ht.to(dtype), wt.to(dtype), temperature=1.5)
            kd.backward()
            assert abs(loss.item() - kd.item()) <= tol * max(1.0, kd.item())
            for got, want in ((a.grad, c.grad), (b.grad, e.grad)):
                assert (got - want).abs().max() <= tol * want.abs().max()


def test_sampled_targets_give_the_forward_kl_gradient_in_expectation():
    # One student row, repeated 6000 times, each with its own 12 draws from the teacher: the mean logit gradient
    # of tail=False is (q - p) / T's, the full forward KL's, within the sampling error.
    g = torch.Generator().manual_seed(5)
    v, rows, s = 40, 6000, 12
    student = torch.randn(1, v, generator=g, dtype=torch.float64) * 1.5
    teacher = torch.randn(1, v, generator=g, dtype=torch.float64) * 2.0
    targets = promptkd.fused_linear_topk(torch.ones(rows, 1, dtype=torch.float64), teacher.T.contiguous(), s,
                                         samples=s, seed=3, temperature=2.0)
    logits = student.expand(rows, v).clone().requires_grad_()
    promptkd.sparse_kd_loss(logits, targets.ids, targets.logprobs, tail=False, temperature=2.0,
                            reduction="sum").backward()
    mean = logits.grad.mean(0)
    want = (torch.softmax(student[0] / 2.0, 0) - torch.softmax(teacher[0] / 2.0, 0)) / 2.0
    p = torch.softmax(teacher[0] / 2.0, 0)
    stderr = (p * (1 - p) / (rows * s)).sqrt() / 2.0  # of the p^ term (a mean of counts / S)
    assert ((mean - want).abs() <= 5 * stderr + 1e-12).all(), ((mean - want).abs() / stderr).max()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_tail_mass_that_rounds_away_stays_exact(impl):
    # The student puts all but ~1e-42 of its mass on the targets: 1 - sum q_i is 0 in any float, but the rest's
    # own log-sum keeps log q_r (about -97.6), so the tail term p_r (log p_r - log q_r) and the gradient are exact.
    v, k = 50, 4
    logits = torch.zeros(2, v, dtype=torch.float64)
    logits[:, :k] = 100.0
    ids = torch.arange(k).expand(2, k).contiguous()
    lp = torch.log(torch.full((2, k), 0.24, dtype=torch.float64))  # p_r = 0.04
    truth = logits.clone().requires_grad_()
    want = promptkd.sparse_kd_loss(truth, ids, lp, impl="reference")
    want.backward()
    got_logits = logits.float().requires_grad_()
    with cpu_kernels(impl) as name:
        got = promptkd.sparse_kd_loss(got_logits, ids, lp.float(), impl=name)
        got.backward()
    assert 3.5 < want.item() < 4.0
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    assert (got_logits.grad.double() - truth.grad).abs().max() <= 1e-6


# ---- the targets' checks ----

def _bad(ids, lp, match, error=ValueError, **kw):
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    with pytest.raises(error, match=match):
        promptkd.fused_linear_sparse_kd_loss(h, w, ids, lp, **kw)


def _good():
    return torch.tensor([[1, 2, -1]] * 4), torch.log(torch.tensor([[0.5, 0.25, 0.1]] * 4))


def test_bad_targets_are_named_before_any_work():
    ids, lp = _good()
    bad = ids.clone()
    bad[2, 0] = 50
    _bad(bad, lp, r"teacher_ids must lie in \[0, vocab_size=50\) or be -1 .* flattened row 2 holds 50")
    bad = ids.clone()
    bad[1, 2] = -5
    _bad(bad, lp, "flattened row 1 holds -5")
    bad = ids.clone()
    bad[3] = torch.tensor([7, 9, 7])
    _bad(bad, lp, "must not repeat an id within a row; flattened row 3 holds 7 twice")
    nan = lp.clone()
    nan[0, 1] = math.nan
    _bad(ids, nan, "teacher_logprobs is NaN at a target of flattened row 0")
    _bad(ids, torch.tensor([[3.0, 1.0, 0.0]] * 4), r"sum to .* above 1 \+ 0.0001 .* not logits")
    _bad(ids.float(), lp, "teacher_ids must be an integer tensor", TypeError)
    _bad(ids, ids, "teacher_logprobs must be a floating tensor", TypeError)
    _bad(ids[:, :2], lp, "teacher_logprobs must have teacher_ids' shape")
    _bad(ids[:3], lp[:3], "teacher_ids must have shape")
    _bad(ids[:, :0], lp[:, :0], "at least one target")
    _bad(ids, lp.requires_grad_(), "teacher_logprobs requires grad")
    _bad(ids, lp.detach(), "impl must be one of .* no Triton kernel", impl="triton")
    _bad(ids, lp.detach(), "vocab_size=60 exceeds", vocab_size=60)
    _bad(ids, lp.detach(), "labels are required when hard_weight > 0", hard_weight=0.5)


def test_rounded_logprobs_within_tolerance_are_accepted():
    ids = torch.tensor([[0, 1]])
    h, w = torch.randn(1, 8), torch.randn(10, 8)
    half = torch.log(torch.tensor([[0.5, 0.5]])).half()  # sums to 1 within float16's rounding
    promptkd.fused_linear_sparse_kd_loss(h, w, ids, half * 0.99)
    over = torch.log(torch.tensor([[0.5, 0.505]]))  # 1.005: refused in float32, accepted in float16
    with pytest.raises(ValueError, match="above 1"):
        promptkd.fused_linear_sparse_kd_loss(h, w, ids, over)
    promptkd.fused_linear_sparse_kd_loss(h, w, ids, over.half())


def test_unusable_rows_are_nan_where_no_check_runs():
    # Off the CPU no ValueError can be raised without a sync: the rows marked bad get NaN loss and gradient rows.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 8, generator=g).requires_grad_(), torch.randn(30, 8, generator=g)
    ids = torch.tensor([[1, 2]] * 6)
    lp = torch.log(torch.tensor([[0.4, 0.3]] * 6))
    bad = torch.tensor([False, True, False, False, False, False])
    settings = SparseKDSettings(vocab_size=30, reduction="none")
    loss, _ = sparse_forward(x.detach(), w, None, ids, lp, None, bad, settings, [False] * 3)
    assert loss[1].isnan() and loss[[0, 2, 3, 4, 5]].isfinite().all()
    settings = SparseKDSettings(vocab_size=30)
    _, (dx, _, _) = sparse_forward(x.detach(), w, None, ids, lp, None, bad, settings, [True, False, False])
    assert dx[1].isnan().all() and dx[[0, 2, 3, 4, 5]].isfinite().all()


# ---- work, autograd rules, compile ----

@pytest.mark.parametrize("frozen", [("student_weight",), ("student_hidden",), ()], ids=["hidden", "weight", "both"])
def test_gradients_only_where_asked(frozen):
    x, ids, lp = make_case(n=20, v=1001, bias=False)
    leaves = {k: v.float().requires_grad_(k not in frozen) for k, v in x.items()}
    with CountOps() as forward:
        loss = promptkd.fused_linear_sparse_kd_loss(leaves["student_hidden"], leaves["student_weight"], ids, lp)
    with CountOps() as backward:
        loss.backward()
    from promptkd.sparse import torch_impl

    chunks = -(-20 // torch_impl.chunk_rows(1001, torch_impl.LOSS_CHUNKS))  # 20 rows in chunks of 16
    assert chunks == 2
    assert forward.matmuls == chunks * (1 + 2 - len(frozen)) and backward.matmuls == 0
    with torch.no_grad(), CountOps() as ops:
        promptkd.fused_linear_sparse_kd_loss(leaves["student_hidden"], leaves["student_weight"], ids, lp)
    assert ops.matmuls == chunks


@pytest.mark.parametrize("impl", ["chunked", "torch"])
def test_double_backward_is_refused(impl):
    x, ids, lp = make_case(n=5, v=50, k=4)
    h = x["student_hidden"].float().requires_grad_()
    loss = promptkd.fused_linear_sparse_kd_loss(h, x["student_weight"].float(), ids, lp, reduction="sum", impl=impl)
    (grad,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad.sum().backward()


def test_modules_match_the_functions():
    x, ids, lp = make_case(n=9, v=200, k=5)
    h, w, b = (x[k].float() for k in ("student_hidden", "student_weight", "student_bias"))
    module = promptkd.FusedLinearSparseKDLoss(tail=False, temperature=2.0, hard_weight=0.1)
    labels = labels_for((9,), 200, "some")
    want = promptkd.fused_linear_sparse_kd_loss(h, w, ids, lp, labels, tail=False, temperature=2.0, hard_weight=0.1,
                                                student_bias=b)
    assert torch.equal(module(h, w, ids, lp, labels, student_bias=b), want)
    logits = torch.nn.functional.linear(h, w, b)
    assert torch.allclose(promptkd.SparseKDLoss(tail=False, temperature=2.0, hard_weight=0.1)(logits, ids, lp, labels),
                          want, rtol=1e-6)
    assert "tail=False" in repr(module)


@pytest.mark.parametrize("impl,reduction", [("chunked", "mean"), ("torch", "none")])
def test_compiled_loss_matches_eager(impl, reduction):
    torch._dynamo.reset()
    x, ids, lp = make_case(n=12, v=300, k=6)
    labels = labels_for((12,), 300, "some")

    def loss(h, w, b):
        out = promptkd.fused_linear_sparse_kd_loss(h * 1.5, w, ids, lp, labels, hard_weight=0.2, student_bias=b,
                                                   reduction=reduction, impl=impl)
        return (out * torch.linspace(0.5, 1.5, out.numel())).sum() if reduction == "none" else out * 1.25

    def leaves():
        return [x[k].float().clone().requires_grad_() for k in ("student_hidden", "student_weight", "student_bias")]

    eager_leaves, compiled_leaves = leaves(), leaves()
    want = loss(*eager_leaves)
    want.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(*compiled_leaves)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for a, b in zip(compiled_leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    bad = ids.clone()
    bad[0, 0] = 300
    with pytest.raises(ValueError, match="teacher_ids must lie in"):
        torch.compile(lambda h, w: promptkd.fused_linear_sparse_kd_loss(h, w, bad, lp), fullgraph=True,
                      backend="aot_eager")(*leaves()[:2])


def test_opcheck_sparse_ops():
    from promptkd.sparse import ops

    x, ids, lp = make_case(n=6, v=11, k=3, d=5)
    h, w, b = (x[k].float().requires_grad_() for k in ("student_hidden", "student_weight", "student_bias"))
    labels = torch.tensor([3, -100, 0, 10, 7, -100])
    ids, lp = ids.reshape(6, 3), lp.reshape(6, 3)
    for impl, reduction, transform in (("chunked", "mean", (1.0, 0.0)), ("torch", "none", (1.3, 2.0)),
                                       ("chunked", "sum", (0.7, 1.5))):
        settings = (True, 2.0, 0.7, 0.3, -100, reduction, 11, *transform)
        grads = [impl == "chunked"] * 3
        torch.library.opcheck(ops.sparse_kd_loss_op, (h, w, b, ids, lp, labels, None, *settings, impl, grads))
        grad = torch.rand(6 if reduction == "none" else ()) + 0.5
        torch.library.opcheck(ops.sparse_kd_loss_backward_op, (grad, h.detach(), w.detach(), b.detach(), ids, lp,
                                                               labels, None, *settings, impl, [True, False, True]))
    torch.library.opcheck(ops.checked_sparse_targets, (ids, lp, 11, 1e-4))
    torch.library.opcheck(ops.linear_topk_op, (h.detach(), w.detach(), b.detach(), 4, 1.5, 11, 0, None, None, 1.0,
                                               0.0))
    keys, counters = torch.full((6,), 3), torch.arange(6)
    torch.library.opcheck(ops.linear_topk_op, (h.detach(), w.detach(), None, 5, 1.0, 11, 4, keys, counters, 1.2,
                                               0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tail", [True, False])
def test_gpu_chunked_matches_fp64(dtype, tail):
    """On CUDA: cuBLAS chunks and the Triton row pass (kernels/sparse_rows.py), against float64 on the CPU."""
    x, ids, lp = make_case(sampled=not tail, n=300, v=5003, k=16)
    labels = labels_for((300,), 5003, "some")
    kw = dict(tail=tail, temperature=1.3, hard_weight=0.2, reduction="mean")
    truth = run(sparse_loss(ids, lp), x, torch.float64, labels, impl="reference", **kw)
    eager = run(sparse_loss(ids, lp), x, dtype, labels, impl="reference", **kw)
    cuda = {k: v.cuda() for k, v in x.items()}
    fused = run(sparse_loss(ids.cuda(), lp.cuda()), cuda, dtype, labels.cuda(), impl="chunked", **kw)
    assert_close_to_truth({k: v.cpu() for k, v in fused.items()}, eager, truth, dtype)

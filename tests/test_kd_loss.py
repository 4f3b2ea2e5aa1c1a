"""Losses and all six gradients against a float64 evaluation of the formulas.

Rule: |impl - fp64| <= |same-dtype eager - fp64| + tol (tests/helpers.py). Kernel buffers are
filled with NaN before kernels write them; chunk budgets are shrunk so several chunks run.
"""

import itertools

import pytest
import torch

import promptkd
import promptkd.kd.api
import promptkd.kd.torch_impl
import promptkd.kd.triton_impl
from helpers import (
    CPU_IMPLS,
    SIDES,
    CountOps,
    KernelLaunches,
    assert_close_to_truth,
    exact_truth,
    linear_loss,
    logits_loss,
    make_inputs,
    make_labels,
    run,
)
from promptkd import launch
from promptkd.kd.settings import DIVERGENCES


@pytest.fixture(autouse=True)
def small_chunks_and_poison(monkeypatch):
    monkeypatch.setattr(promptkd.kd.torch_impl, "CHUNK_BYTES", 4 * 1001 * 8)  # 8-row chunks
    monkeypatch.setattr(promptkd.kd.triton_impl, "BACKWARD_CHUNK_BYTES", 37 * 4 * 300)  # several vocab chunks
    monkeypatch.setattr("promptkd.launch.POISON", float("nan"))


IMPL_DTYPES = [*((i, torch.float32) for i in CPU_IMPLS), ("triton", torch.float32), ("triton", torch.float16)]
# (temperature, bias, hard_weight) rotate through all 8 combinations across the other axes.
EXTRAS = list(itertools.product((1.0, 2.5), (False, True), (0.0, 0.3)))
CASES = []
AXES = itertools.product(DIVERGENCES, ("mean", "sum", "none"), ("none", "some", "all"))
for i, (div, red, ignored) in enumerate(AXES):
    for j in range(2):
        CASES.append((div, red, ignored, *EXTRAS[(2 * i + j * 3) % len(EXTRAS)]))
# Triton in float16 runs the float32 kernels on float16 loads (every sum, term and switch in float32, the
# gradients cast on the way out): one case per (divergence, reduction), the ignored tokens and extras rotating,
# takes that path through every divergence and reduction; the whole grid runs in float32 (and in bfloat16 once
# per divergence, test_triton_bfloat16).
HALF_CASES = [CASES[6 * g + g % 6] for g in range(len(CASES) // 6)]
IMPL_CASES = [(impl, dtype, case) for impl, dtype in IMPL_DTYPES
              for case in (HALF_CASES if dtype == torch.float16 else CASES)]


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


@pytest.mark.parametrize("impl,dtype,case", IMPL_CASES,
                         ids=[f"{_case_id(c)}-{i}-{str(d)[6:]}" for i, d, c in IMPL_CASES])
def test_fused_linear_matches_fp64(impl, dtype, case):
    fused = _check(impl, dtype, *case)
    if case[2] == "all":  # no counted token: zero loss and zero gradients, never NaN
        for key, value in fused.items():
            assert torch.equal(value, torch.zeros_like(value)), key


@pytest.mark.parametrize("div", DIVERGENCES)
def test_triton_bfloat16(div):
    _check("triton", torch.bfloat16, div, "mean", "some", 2.5, True, 0.3)


@pytest.mark.parametrize("vs", [301, 1001])  # one chunk narrower than its buffer; several, the last partial
def test_triton_backward_hands_each_chunk_to_the_gemms_contiguous(vs, monkeypatch):
    """The hidden and weight gradients' GEMMs get each vocabulary chunk's logit gradient as a contiguous
    [N, width] tensor: torch 2.13's CPU bfloat16 GEMM (AVX-512 Xeons) reads a column slice's padding
    columns, where the buffer's poison (or stale values) then reached the student's hidden gradient."""
    seen, linear_grads = [], promptkd.kd.triton_impl._linear_grads

    def spy(dz, *args):
        seen.append((dz.is_contiguous(), tuple(dz.shape)))
        return linear_grads(dz, *args)

    monkeypatch.setattr(promptkd.kd.triton_impl, "_linear_grads", spy)
    _check("triton", torch.bfloat16, "jsd", "mean", "some", 2.0, True, 0.3, vs=vs)
    assert seen and all(contiguous for contiguous, _ in seen), seen
    assert sum(shape[1] for _, shape in seen) == 2 * vs  # every column once per side


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("t,hard", [(1.0, 0.0), (1.0, 0.4), (2.5, 0.4)])
def test_one_side_matches_fp64(impl, side, div, t, hard):
    """Gradients to one side only, as in training (student) or tuning a teacher prompt (teacher): the
    native kernel writes the gradient that needs no row sum in the same pass as the loss there."""
    x = make_inputs(bias=True)
    labels = make_labels((37,), 1001, "some")
    frozen = [k for k in SIDES if not k.startswith(side)]
    kwargs = dict(divergence=div, temperature=t, hard_weight=hard, beta=0.3, alpha=0.2, frozen=frozen)
    truth = run(linear_loss, x, torch.float64, labels, impl="reference", **kwargs)
    eager = run(linear_loss, x, torch.float32, labels, impl="reference", **kwargs)
    fused = run(linear_loss, x, torch.float32, labels, impl=impl, **kwargs)
    assert set(fused) == {"loss", *(k for k in SIDES if k.startswith(side))}
    assert_close_to_truth(fused, eager, truth, torch.float32)


@pytest.mark.parametrize("impl", [*CPU_IMPLS, "triton"])
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


_EXACT = {}  # (numerics case, divergence) -> exact_truth's (values, scales)
NUMERICS = [("huge_logits", dict(logit_scale=1e4), 1.0), ("one_hot_teacher", dict(), 1.0),
            ("T0.1", dict(logit_scale=5.0), 0.1), ("T10", dict(logit_scale=5.0), 10.0)]


@pytest.mark.parametrize("impl", ["chunked", "chunked-torchops", "triton"])  # torch: the same pass as chunked
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
    key = (name, div)  # the exact values are the same for every impl: computed once (they are slow)
    if key not in _EXACT:
        _EXACT[key] = exact_truth(x, labels, **kwargs)  # float64 itself is not precise enough here
    truth, scales = _EXACT[key]
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


@pytest.mark.parametrize("impl", ["chunked", "torch", "triton"])
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
    g = torch.Generator().manual_seed(4)
    logits = {"student_logits": torch.randn(3, 11, 40, generator=g, dtype=torch.float64),
              "teacher_logits": torch.randn(3, 11, 40, generator=g, dtype=torch.float64)}
    labels = make_labels((3, 11), 40, "some")
    kw = dict(divergence="reverse_kl", temperature=1.5, hard_weight=0.2)
    module = promptkd.KDLoss(**kw, impl=impl)

    def via_module(student_logits, teacher_logits, labels, impl):
        return module(student_logits, teacher_logits, labels)

    got = run(via_module, logits, torch.float32, labels, impl=impl)
    want = run(logits_loss, logits, torch.float32, labels, impl="reference", **kw)
    assert got["loss"].shape == ()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


# Requires-grad patterns over SIDES (student hidden, weight, bias; teacher hidden, weight, bias): all 63 for
# the torch implementation; for Triton (interpreter: slow) each input alone, each side whole, mixes, all.
PATTERNS = [p for p in itertools.product((False, True), repeat=6) if any(p)]
TRITON_PATTERNS = [tuple(i in chosen for i in range(6)) for chosen in
                   ((0,), (1,), (2,), (3,), (4,), (5,), (0, 1, 2), (3, 4, 5), (0, 4), (1, 5), (2, 3), tuple(range(6)))]


def _pattern_id(pattern):
    return "+".join(name for name, on in zip(("hs", "ws", "bs", "ht", "wt", "bt"), pattern, strict=True) if on)


@pytest.fixture
def work_setup(monkeypatch):
    """Inputs with 3 token chunks (torch) and 3 vocabulary chunks (triton), the reference's gradients, and
    a recorder standing in for the Triton backward kernel."""
    monkeypatch.setattr(promptkd.kd.torch_impl, "CHUNK_BYTES", 4 * 300 * 4)  # 4 rows per chunk
    monkeypatch.setattr(promptkd.kd.triton_impl, "BACKWARD_CHUNK_BYTES", 10 * 4 * 128)  # one 128-column tile
    kernel = KernelLaunches(promptkd.kd.triton_impl.kd_backward_kernel)
    monkeypatch.setattr(promptkd.kd.triton_impl, "kd_backward_kernel", kernel)
    x = make_inputs(n=10, ds=6, dt=4, vs=300)
    labels = make_labels((10,), 300, "some")
    kw = dict(divergence="reverse_kl", hard_weight=0.3)
    leaves = {k: v.float().requires_grad_() for k, v in x.items()}
    linear_loss(**leaves, labels=labels, impl="reference", **kw).backward()
    return x, labels, kw, {k: v.grad for k, v in leaves.items()}, kernel


def _check_backward_work(impl, pattern, x, labels, kw, want, kernel):
    """The gradients of exactly the inputs that require grad, and no work for the others: matmuls
    (hidden/weight gradients, and the logits per chunk), dim-0 sums (bias gradients), and for Triton the
    backward kernel's launches and its NEED_S / NEED_T switches. ``torch`` and ``triton`` count the
    backward; ``chunked`` (gradients in forward) counts the forward, and its backward must do no matmul."""
    need = dict(zip(SIDES, pattern, strict=True))
    leaves = {k: v.float().requires_grad_(need[k]) for k, v in x.items()}
    with CountOps() as forward_ops:
        loss = linear_loss(**leaves, labels=labels, impl=impl, **kw)
    kernel.launches.clear()
    with CountOps() as backward_ops:
        loss.backward()
    ops = forward_ops if impl == "chunked" else backward_ops
    grads = int(need["student_hidden"]) + int(need["student_weight"]) + int(need["teacher_hidden"]) + \
        int(need["teacher_weight"])
    biases = int(need["student_bias"]) + int(need["teacher_bias"])
    name = _pattern_id(pattern)
    if impl in ("torch", "chunked"):  # token chunks; each computes both sides' logits (2 matmuls)
        chunks = launch.cdiv(10, promptkd.kd.torch_impl._chunk_rows(300))
        assert chunks == 3 and ops.matmuls == chunks * (2 + grads) and not kernel.launches, name
        if impl == "chunked":
            assert backward_ops.matmuls == 0 and backward_ops.dim0_sums == 0, name
    else:  # vocabulary chunks: one kernel launch each, logits recomputed inside it
        spans = [(args[20], args[21]) for _, args, _ in kernel.launches]  # (v_start, v_end) of each launch
        assert spans == [(0, 128), (128, 256), (256, 300)], name
        chunks, need_s, need_t = len(spans), any(pattern[:3]), any(pattern[3:])
        assert all(kw_["NEED_S"] == need_s and kw_["NEED_T"] == need_t for *_, kw_ in kernel.launches), name
        assert ops.matmuls == chunks * grads, name
    assert ops.dim0_sums == chunks * biases, name
    for key, leaf in leaves.items():
        assert (leaf.grad is not None) == need[key], (name, key)
        if need[key]:
            torch.testing.assert_close(leaf.grad, want[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("impl", ["chunked", "torch"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=_pattern_id)
def test_cpu_gradients_only_where_asked(impl, pattern, work_setup):
    _check_backward_work(impl, pattern, *work_setup)


@pytest.mark.parametrize("pattern", TRITON_PATTERNS, ids=_pattern_id)
def test_triton_gradients_only_where_asked(pattern, work_setup):
    _check_backward_work("triton", pattern, *work_setup)


@pytest.mark.parametrize("impl", ["chunked", "torch", "triton"])
def test_no_backward_work_under_no_grad(impl, work_setup):
    """Under no_grad: no graph, and nothing beyond the forward's own logits (no backward kernel)."""
    x, labels, kw, _, kernel = work_setup
    leaves = {k: v.float().requires_grad_() for k, v in x.items()}
    with torch.no_grad(), CountOps() as ops:
        loss = linear_loss(**leaves, labels=labels, impl=impl, **kw)
    assert loss.grad_fn is None and not kernel.launches and ops.dim0_sums == 0
    assert ops.matmuls == (0 if impl == "triton" else 2 * 3)  # the chunks' logits only


@pytest.mark.parametrize("pattern", [(True, False), (False, True)], ids=["student", "teacher"])
def test_triton_logits_gradients_only_where_asked(pattern, work_setup):
    *_, kernel = work_setup
    g = torch.Generator().manual_seed(7)
    s, t = (torch.randn(6, 130, generator=g).requires_grad_(need) for need in pattern)
    promptkd.kd_loss(s, t, impl="triton", divergence="jsd").backward()
    assert [(kw_["NEED_S"], kw_["NEED_T"]) for *_, kw_ in kernel.launches] == [pattern]
    assert (s.grad is not None, t.grad is not None) == pattern


@pytest.mark.parametrize("impl", ["chunked", "torch", "triton"])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_no_tokens(impl, red):
    x = {k: v.float().requires_grad_() for k, v in make_inputs(n=0, vs=129).items()}
    loss = promptkd.fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                         x["teacher_weight"], impl=impl, reduction=red)
    assert loss.shape == ((0,) if red == "none" else ())
    loss.sum().backward()
    assert loss.sum().item() == 0.0 and (x["student_weight"].grad == 0).all()


BAD_LABELS = {3: 299 + 5, 7: -5}  # token -> label outside [0, 299): above, and negative (not ignore_index)


@pytest.mark.parametrize("impl", [*CPU_IMPLS, "triton"])
@pytest.mark.parametrize("red", ["none", "sum", "mean"])
def test_out_of_range_labels_without_host_check(impl, red, monkeypatch):
    """Where labels are not checked on the host (CUDA; forced here), a counted token with a label outside
    [0, vocab_size) gets a NaN loss and NaN gradients wherever it contributes, so no finite wrong value
    comes out, with hard_weight > 0 and == 0 alike. The CPU host check still raises."""
    x = make_inputs(n=10, ds=6, dt=4, vs=300)
    labels = make_labels((10,), 299, "some")
    with pytest.raises(ValueError, match="labels"):
        run(linear_loss, x, torch.float32, labels.index_put((torch.tensor([3]),), torch.tensor(304)), impl=impl)
    monkeypatch.setattr(promptkd.kd.api, "_labels_checked_on_host", lambda device: False)
    bad = labels.clone()
    for i, label in BAD_LABELS.items():
        bad[i] = label
    rows = torch.zeros(10, dtype=torch.bool)
    rows[list(BAD_LABELS)] = True
    valid = torch.where(rows, 0, bad)  # the same tokens counted, with labels in range
    kw = dict(divergence="jsd", reduction=red, vocab_size=299)
    got = run(linear_loss, x, torch.float32, bad, impl=impl, hard_weight=0.3, **kw)
    good = run(linear_loss, x, torch.float32, valid, impl=impl, hard_weight=0.3, **kw)
    if red == "none":
        assert got["loss"][rows].isnan().all()
        assert torch.equal(got["loss"][~rows], good["loss"][~rows])
    else:
        assert got["loss"].isnan()
    for key in ("student_hidden", "teacher_hidden"):  # the bad tokens' rows; the other rows as with good labels
        assert got[key][rows].isnan().all(), key
        torch.testing.assert_close(got[key][~rows], good[key][~rows], rtol=1e-5, atol=1e-7, msg=key)
    for key in ("student_weight", "student_bias", "teacher_weight", "teacher_bias"):  # sums over all tokens
        assert got[key][:299].isnan().all(), key
    # hard_weight == 0: the label only says "counted", but a counted label out of range is still refused
    got = run(linear_loss, x, torch.float32, bad, impl=impl, **kw)
    want = run(linear_loss, x, torch.float32, valid, impl=impl, **kw)
    if red == "none":
        assert got["loss"][rows].isnan().all() and torch.equal(got["loss"][~rows], want["loss"][~rows])
    else:
        assert got["loss"].isnan()
    for key in ("student_hidden", "teacher_hidden"):
        assert got[key][rows].isnan().all() and torch.equal(got[key][~rows], want[key][~rows]), key


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_chunked_gradients_survive_a_second_backward(red):
    """The gradients kept by ``chunked``'s forward are scaled on the way out, never in place: a second
    backward through the same graph (retain_graph), with another upstream gradient, gets its own."""
    x = make_inputs(n=11, vs=129)
    labels = make_labels((11,), 129, "some")
    leaves = {k: v.float().requires_grad_() for k, v in x.items()}
    loss = linear_loss(**leaves, labels=labels, impl="chunked", divergence="jsd", hard_weight=0.2, reduction=red)
    want = linear_loss(**{k: v.detach() for k, v in leaves.items()}, labels=labels, impl="reference",
                       divergence="jsd", hard_weight=0.2, reduction=red)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    first = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)
    second = torch.autograd.grad(loss, list(leaves.values()), grad_outputs=torch.tensor(2.5), retain_graph=True)
    third = torch.autograd.grad(loss, list(leaves.values()))
    for a, b, c in zip(first, second, third, strict=True):
        torch.testing.assert_close(b, 2.5 * a, rtol=1e-6, atol=0)
        assert torch.equal(a, c)


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


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 3, 40], ids=lambda s: f"splits_{s or 'auto'}")
@pytest.mark.parametrize("div", DIVERGENCES)
def test_gpu_triton_is_deterministic(div, splits, monkeypatch):
    """Five runs on the GPU, where programs really run concurrently: identical bits for the loss and all six
    gradients. 16 token blocks x several vocabulary splits in forward, 8 vocabulary chunks in backward."""
    n, vocab = 1000, 32003
    monkeypatch.setattr(promptkd.kd.triton_impl, "BACKWARD_CHUNK_BYTES", n * 2 * 2 * 4096)  # 4096 columns per chunk
    if splits is not None:  # programs per token block = splits (launch.cdiv(n, 64) token blocks of 64)
        monkeypatch.setattr(promptkd.kd.triton_impl, "_target_programs", lambda device: launch.cdiv(n, 64) * splits)
    forward = KernelLaunches(promptkd.kd.triton_impl.kd_online_kernel)
    monkeypatch.setattr(promptkd.kd.triton_impl, "kd_online_kernel", forward)
    x = {k: v.cuda() for k, v in make_inputs(n=n, ds=256, dt=384, vs=vocab, seed=3).items()}
    labels = make_labels((n,), vocab, "some").cuda()
    kwargs = dict(divergence=div, temperature=2.0, hard_weight=0.3, impl="triton")
    runs = [run(linear_loss, x, torch.bfloat16, labels, **kwargs) for _ in range(5)]
    grids = {grid for grid, _, _ in forward.launches}
    assert len(grids) == 1 and next(iter(grids))[0] == launch.cdiv(n, 64) and next(iter(grids))[1] > 1, grids
    for again in runs[1:]:
        for key, value in runs[0].items():
            assert torch.isfinite(value).all() and torch.equal(again[key], value), key


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
    from promptkd.kd.settings import DIVERGENCE_CODES
    from promptkd.kernels import common

    for name in DIVERGENCES:
        assert getattr(common, name.upper()).value == DIVERGENCE_CODES[name], name

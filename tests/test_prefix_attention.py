"""prefix_attention: output and all five gradients against a float64 evaluation of the reference.

Rule: |impl - fp64| <= |same-dtype reference - fp64| + tol (tests/helpers.py). Kernel buffers are
filled with NaN before kernels write them, and the Triton tiles are shrunk (16/32 rows) so that the
small shapes here walk several full, partial and diagonal blocks of every loop.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import promptkd.attention.triton_impl as triton_impl
from helpers import CountOps, KernelLaunches, assert_close_to_truth, err
from promptkd import prefix_attention
from promptkd.kernels import configs

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
SMALL_TILES = {"forward": configs.AttentionConfig(32, 16, 4, 1), "dq": configs.AttentionConfig(32, 16, 4, 1),
               "dkdv": configs.AttentionConfig(16, 32, 4, 1)}


LAUNCH_TABLE = configs.ATTENTION_CONFIGS


@pytest.fixture(autouse=True)
def small_tiles_and_poison(monkeypatch):
    monkeypatch.setattr(configs, "ATTENTION_CONFIGS", {key: SMALL_TILES[key[0]] for key in LAUNCH_TABLE})
    monkeypatch.setattr("promptkd.launch.POISON", float("nan"))


@pytest.fixture
def real_tiles(monkeypatch):
    """The launch table of kernels/configs.py itself."""
    monkeypatch.setattr(configs, "ATTENTION_CONFIGS", LAUNCH_TABLE)


def make_inputs(b, g, p, n, hq, hkv, d, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(q=(b, hq, n, d), k=(b, hkv, n, d), v=(b, hkv, n, d), prefix_k=(g, hkv, p, d), prefix_v=(g, hkv, p, d))
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for name, shape in shapes.items()}


def padding_mask(kind, b, n, device="cpu"):
    """None; "left": sample i's first 3 i keys masked; "holes": left padding and every 4th key masked."""
    if kind is None:
        return None
    keep = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        keep[i, : 3 * i] = False
    if kind == "holes":
        keep[:, 1::4] = False
    return keep.to(device)


def _leaf(x, dtype, layout):
    x = x.to(dtype)
    if layout == "bnhd":  # [B, N, H, D] memory seen as [B, H, N, D]: strided, like a projection's output
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.detach().requires_grad_()


def _grad(leaf):
    assert leaf.grad is not None, "an input that requires grad got no gradient"
    return leaf.grad


def run(inputs, dtype, impl, layout="bhnd", grad_seed=7, **kwargs):
    """Output and the gradients of all five inputs for a random upstream gradient, as float64."""
    leaves = {name: _leaf(x, dtype, layout) for name, x in inputs.items()}
    out = prefix_attention(**leaves, impl=impl, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=dtype))
    return {"out": out.detach().double(), **{name: _grad(leaf).double() for name, leaf in leaves.items()}}


# (B, G, P, N, Hq, Hkv, D, prefix_lengths, group_index, padding, layout)
CASES = [
    (1, 1, 0, 17, 2, 2, 64, None, None, None, "bhnd"),  # plain causal attention
    (3, 1, 7, 64, 4, 2, 80, None, None, "left", "bhnd"),
    (3, 2, 33, 17, 4, 2, 80, [0, 20], [1, 0, 1], "left", "bhnd"),  # sample 1: no prefix, rows 0-2 see nothing
    (1, 2, 1, 64, 2, 2, 64, None, [1], "holes", "bnhd"),
    (3, 2, 7, 1, 2, 2, 64, [7, 0], [0, 1, 1], "left", "bhnd"),  # samples 1, 2 see nothing at all
    (3, 1, 33, 64, 4, 2, 64, [30], None, None, "bnhd"),
    (3, 2, 0, 17, 4, 2, 80, None, [1, 0, 1], "holes", "bhnd"),
]


def _case_id(c):
    b, g, p, n, hq, hkv, d, lengths, group, pad, layout = c
    name = f"B{b}-G{g}-P{p}-N{n}-Hq{hq}Hkv{hkv}-D{d}"
    name += "-len" if lengths is not None else ""
    name += "-grp" if group is not None else ""
    name += f"-{pad}" if pad else ""
    return name + ("-bnhd" if layout == "bnhd" else "")


def _kwargs(case, device="cpu"):
    b, g, p, n, hq, hkv, d, lengths, group, pad, layout = case
    return dict(prefix_lengths=lengths, group_index=group, key_padding_mask=padding_mask(pad, b, n, device))


def _sees_nothing(case):
    """[B, N] bool: rows with no key to attend (from the case's lengths, groups and padding)."""
    b, g, p, n, hq, hkv, d, lengths, group, pad, layout = case
    keep = padding_mask(pad, b, n)
    own = torch.ones(b, n, dtype=torch.bool) if keep is None else keep.cumsum(1) > 0
    groups = torch.tensor(group) if group is not None else torch.arange(b) // (b // g)
    real = torch.full((g,), p) if lengths is None else torch.tensor(lengths)
    return ~own & (real[groups] == 0)[:, None]


IMPL_DTYPES = [("triton", torch.float32), ("triton", torch.float16), ("torch", torch.float32)]


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES, ids=[f"{i}-{str(d)[6:]}" for i, d in IMPL_DTYPES])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_fp64(case, impl, dtype):
    inputs = make_inputs(*case[:7])
    kwargs = _kwargs(case)
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, dtype, "reference", **kwargs)
    fused = run(inputs, dtype, impl, layout=case[-1], **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)
    empty = _sees_nothing(case)
    for name in ("out", "q"):  # rows that see nothing: exactly 0 output and query gradient
        rows = fused[name].transpose(1, 2)[empty]
        assert torch.equal(rows, torch.zeros_like(rows)), name


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=[_case_id(c) + "-bf16" for c in (CASES[2], CASES[3])])
def test_triton_bfloat16(case):
    inputs = make_inputs(*case[:7])
    kwargs = _kwargs(case)
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, torch.bfloat16, "reference", **kwargs)
    fused = run(inputs, torch.bfloat16, "triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.bfloat16)


def test_case_table_covers_every_value():
    values = list(zip(*CASES, strict=True))
    assert set(values[0]) == {1, 3} and set(values[1]) == {1, 2} and set(values[2]) == {0, 1, 7, 33}
    assert set(values[3]) == {1, 17, 64} and set(zip(values[4], values[5], strict=True)) == {(4, 2), (2, 2)}
    assert set(values[6]) == {64, 80} and any(_sees_nothing(c).any() for c in CASES)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launch_table_tiles(dtype, real_tiles):
    """The tiles of kernels/configs.py itself (64-128 rows: one partial block per loop here)."""
    case = CASES[2]
    inputs = make_inputs(*case[:7])
    kwargs = _kwargs(case)
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, dtype, "reference", **kwargs)
    fused = run(inputs, dtype, "triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_prefix_gradient_is_sum_over_samples(impl):
    """Each sample alone (its own prefix, G = 1), then the per-group sums, against the batched run."""
    case = CASES[2]
    b = case[0]
    lengths, group = case[7], case[8]
    inputs = make_inputs(*case[:7])
    keep = padding_mask(case[9], b, case[3])
    batched = run(inputs, torch.float32, impl, prefix_lengths=lengths, group_index=group, key_padding_mask=keep)
    summed = {"prefix_k": torch.zeros_like(batched["prefix_k"]), "prefix_v": torch.zeros_like(batched["prefix_v"])}
    for i in range(b):
        gi = group[i]
        alone = {"q": inputs["q"][i:i + 1], "k": inputs["k"][i:i + 1], "v": inputs["v"][i:i + 1],
                 "prefix_k": inputs["prefix_k"][gi:gi + 1], "prefix_v": inputs["prefix_v"][gi:gi + 1]}
        # The upstream gradient of sample i alone must equal its slice of the batched one.
        gen = torch.Generator().manual_seed(7)
        grad = torch.randn(batched["out"].shape, generator=gen, dtype=torch.float64)[i:i + 1].float()
        leaves = {name: x.float().requires_grad_() for name, x in alone.items()}
        out = prefix_attention(**leaves, prefix_lengths=[lengths[gi]], key_padding_mask=keep[i:i + 1], impl=impl)
        out.backward(grad)
        torch.testing.assert_close(out.double(), batched["out"][i:i + 1], rtol=1e-5, atol=1e-6)
        for name in ("q", "k", "v"):
            torch.testing.assert_close(leaves[name].grad.double(), batched[name][i:i + 1], rtol=1e-5, atol=1e-6)
        for name in summed:
            summed[name][gi] += leaves[name].grad.double()[0]
    for name in summed:
        torch.testing.assert_close(summed[name], batched[name], rtol=1e-5, atol=1e-6)
    assert batched["prefix_k"][0].abs().max() == 0  # group 0 has no real prefix key


def test_triton_is_deterministic():
    case = CASES[2]
    inputs = make_inputs(*case[:7])
    first = run(inputs, torch.float32, "triton", **_kwargs(case))
    second = run(inputs, torch.float32, "triton", **_kwargs(case))
    for key in first:
        assert torch.equal(first[key], second[key]), key


# Requires-grad patterns over NAMES: all 31 for the torch implementation; for Triton (interpreter: slow) each
# input alone, own keys and values, the prefix, a query + prefix mix, all.
PATTERNS = [p for p in itertools.product((False, True), repeat=5) if any(p)]
TRITON_PATTERNS = [tuple(n in chosen for n in NAMES) for chosen in
                   (("q",), ("k",), ("v",), ("prefix_k",), ("prefix_v",), ("k", "v"), ("prefix_k", "prefix_v"),
                    ("q", "prefix_v"), NAMES)]
WORK_CASE = (3, 2, 5, 9, 2, 1, 16, [0, 4], [1, 0, 1], "left", "bhnd")  # G = 2: the torch path's one-hot matmul
KERNELS = ("prefix_attention_forward_kernel", "prefix_attention_dq_kernel", "prefix_attention_dkdv_kernel",
           "prefix_attention_prefix_dkdv_kernel")


def _pattern_id(pattern):
    return "+".join(name for name, on in zip(NAMES, pattern, strict=True) if on)


@pytest.fixture
def work_setup(monkeypatch):
    """WORK_CASE's inputs, float64 truth and float32 reference gradients, and recorders standing in for the
    Triton kernels."""
    kernels = {name: KernelLaunches(getattr(triton_impl, name)) for name in KERNELS}
    for name, kernel in kernels.items():
        monkeypatch.setattr(triton_impl, name, kernel)
    inputs = make_inputs(*WORK_CASE[:7])
    kwargs = _kwargs(WORK_CASE)
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, torch.float32, "reference", **kwargs)
    return inputs, kwargs, truth, eager, kernels


def _check_backward_work(impl, pattern, inputs, kwargs, truth, eager, kernels):
    """Backward computes exactly the requested gradients. torch: one SDPA backward, and the prefix one-hot
    matmul's backward only for a prefix that requires grad. triton: the dQ kernel always runs (it also
    computes delta), NEED_DQ = q requires grad; the own-keys kernel only for k or v, the prefix kernel only
    for prefix_k or prefix_v, with NEED_DK / NEED_DV; no torch matmul."""
    need = dict(zip(NAMES, pattern, strict=True))
    leaves = {name: x.float().requires_grad_(need[name]) for name, x in inputs.items()}
    out = prefix_attention(**leaves, impl=impl, **kwargs)
    for kernel in kernels.values():
        kernel.launches.clear()
    with CountOps() as ops:
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float())
    launched = {name.split("_attention_")[1]: [kw for *_, kw in kernel.launches] for name, kernel in kernels.items()}
    sdpa = sum(n for op, n in ops.ops.items() if "scaled_dot_product" in op and op.endswith("backward"))
    name = _pattern_id(pattern)
    if impl == "torch":
        assert sdpa == 1 and ops.matmuls == int(need["prefix_k"]) + int(need["prefix_v"]), (name, ops.ops)
        assert not any(launched.values()), name
    else:
        assert sdpa == 0 and ops.matmuls == 0 and not launched["forward_kernel"], (name, ops.ops)
        assert [kw["NEED_DQ"] for kw in launched["dq_kernel"]] == [need["q"]], name
        own = [(need["k"], need["v"])] if need["k"] or need["v"] else []
        assert [(kw["NEED_DK"], kw["NEED_DV"]) for kw in launched["dkdv_kernel"]] == own, name
        prefix = [(need["prefix_k"], need["prefix_v"])] if need["prefix_k"] or need["prefix_v"] else []
        assert [(kw["NEED_DK"], kw["NEED_DV"]) for kw in launched["prefix_dkdv_kernel"]] == prefix, name
    for key, leaf in leaves.items():
        assert (leaf.grad is not None) == need[key], (name, key)
    wanted = [key for key in NAMES if need[key]]
    got = {key: leaves[key].grad.double() for key in wanted}
    assert_close_to_truth(got, eager, {key: truth[key] for key in wanted}, torch.float32)


@pytest.mark.parametrize("pattern", PATTERNS, ids=_pattern_id)
def test_torch_gradients_only_where_asked(pattern, work_setup):
    _check_backward_work("torch", pattern, *work_setup)


@pytest.mark.parametrize("pattern", TRITON_PATTERNS, ids=_pattern_id)
def test_triton_gradients_only_where_asked(pattern, work_setup):
    _check_backward_work("triton", pattern, *work_setup)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_backward_work_under_no_grad(impl, work_setup):
    inputs, kwargs, _, _, kernels = work_setup
    leaves = {name: x.float().requires_grad_() for name, x in inputs.items()}
    with torch.no_grad(), CountOps() as ops:
        out = prefix_attention(**leaves, impl=impl, **kwargs)
    assert out.grad_fn is None and not any("backward" in op for op in ops.ops), ops.ops
    assert [len(kernels[name].launches) for name in KERNELS] == [int(impl == "triton"), 0, 0, 0]


# Masked positions may hold anything. N = 33 > the 32-row query tiles: blocks left of the diagonal with
# padding inside; sample 1 (group 0, no real prefix key, left padding) has rows that see nothing.
MASKED_CASE = (2, 2, 9, 33, 2, 1, 16, [0, 5], [1, 0], "holes", "bhnd")


def _masked_positions(case):
    """{name: bool mask of the positions that must influence nothing}, broadcastable to each input."""
    b, g, p, n, hq, hkv, d, lengths, group, pad, layout = case
    keep = padding_mask(pad, b, n)
    prefix = torch.arange(p)[None, :] >= torch.tensor(lengths)[:, None]  # [G, P]
    own = ~keep[:, None, :, None]
    return {"q": _sees_nothing(case)[:, None, :, None], "k": own, "v": own, "prefix_k": prefix[:, None, :, None],
            "prefix_v": prefix[:, None, :, None]}


def _filled(inputs, masked, fill: str):
    """The inputs with ``fill`` at the masked positions: "zero", "nan", or "inf" (+inf and -inf alternating)."""
    out = {}
    for name, x in inputs.items():
        if fill == "inf":
            value = torch.where(torch.arange(x.numel()).reshape(x.shape) % 2 == 0, torch.inf, -torch.inf)
        else:
            value = torch.full_like(x, 0.0 if fill == "zero" else torch.nan)
        out[name] = torch.where(masked[name], value.to(x.dtype), x)
    return out


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_masked_positions_influence_nothing(impl):
    """NaN and +-inf in masked keys / values (padding, prefix positions >= L) and in the queries of rows
    that see nothing: the output and all five gradients equal those with zeros there, and the gradients
    at those positions are exactly 0."""
    inputs = make_inputs(*MASKED_CASE[:7])
    kwargs = _kwargs(MASKED_CASE)
    masked = _masked_positions(MASKED_CASE)
    assert all(m.any() for m in masked.values())
    zero = run(_filled(inputs, masked, "zero"), torch.float32, impl, **kwargs)
    for name, m in masked.items():
        grad = zero[name][m.expand_as(zero[name])]
        assert torch.equal(grad, torch.zeros_like(grad)), name
    for fill in ("nan", "inf"):
        got = run(_filled(inputs, masked, fill), torch.float32, impl, **kwargs)
        for key in zero:
            assert torch.equal(got[key], zero[key]), f"{fill}: {key}"


@pytest.mark.interpret
def test_no_grad_and_empty_batch():
    inputs = {name: x.float() for name, x in make_inputs(0, 1, 3, 5, 2, 1, 64).items()}
    leaves = {name: x.requires_grad_() for name, x in inputs.items()}
    out = prefix_attention(**leaves, impl="triton")
    assert out.shape == (0, 2, 5, 64)
    out.sum().backward()
    assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in leaves.values())
    with torch.no_grad():
        out = prefix_attention(*(x.float().requires_grad_() for x in make_inputs(1, 1, 3, 5, 2, 1, 64).values()),
                               impl="triton")
    assert out.grad_fn is None


@pytest.mark.interpret
def test_large_scores_and_custom_scale():
    """Scores up to about 100: the online maximum keeps exp2 finite; scale is passed through. (Far larger
    scores lose precision to the float32 rounding of the stored log-sum-exp, as in FlashAttention.)"""
    case = CASES[1]
    inputs = make_inputs(*case[:7])
    inputs["q"] *= 4
    kwargs = dict(_kwargs(case), scale=0.7)
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, torch.float32, "reference", **kwargs)
    fused = run(inputs, torch.float32, "triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.float32)
    assert err(fused["out"], truth["out"]) < 1e-5


@pytest.mark.parametrize("impl,dtype,case", [
    ("torch", torch.float32, 1), ("auto", torch.float32, 1),
    pytest.param("triton", torch.float32, 1, marks=pytest.mark.interpret),
    pytest.param("triton", torch.bfloat16, 1, marks=pytest.mark.interpret),
    pytest.param("triton", torch.float32, 2, marks=pytest.mark.interpret)], ids=lambda x: str(x).removeprefix("torch."))
def test_softcapped_scores_match_fp64(impl, dtype, case):
    """softcap: the scores scale * q . k capped as c * tanh(s / c) (tight, so it matters) against float64, every
    input's gradient included (the Triton kernels: the cap in each score tile, its derivative in the backward),
    and against the cap applied by hand to explicitly computed attention (prefix, padding and GQA included)."""
    case = CASES[case]
    inputs = make_inputs(*case[:7])
    inputs["q"] *= 4
    kwargs = dict(_kwargs(case), softcap=2.0)
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, dtype, "reference", **kwargs)
    fused = run(inputs, dtype, impl, **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)
    uncapped = run(inputs, torch.float64, "reference", **_kwargs(case))
    assert err(uncapped["out"], truth["out"]) > 1e-2, "the cap changed nothing: the test could not fail"
    # The cap by hand: one sample, no prefix groups, attention written out.
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    pk, pv = (torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    scores = 2.0 * torch.tanh((q @ keys.transpose(-1, -2)) * 8 ** -0.5 / 2.0)
    allowed = torch.ones(5, 8, dtype=torch.bool).tril(3)
    want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ values
    got = prefix_attention(q, k, v, pk, pv, softcap=2.0, impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# Bad input: a ValueError / TypeError naming the argument.
def _bad_cases():
    base = {name: x.float() for name, x in make_inputs(2, 2, 3, 5, 4, 2, 8).items()}
    yield "q-3d", dict(base, q=base["q"][0]), {}, "q"
    yield "q-int", dict(base, q=base["q"].long()), {}, "q"
    yield "k-length", dict(base, k=base["k"][:, :, :4]), {}, "k"
    yield "v-shape", dict(base, v=base["v"][:, :1]), {}, "v"
    yield "heads", dict(base, q=torch.randn(2, 3, 5, 8)), {}, "heads"
    yield "prefix_k-heads", dict(base, prefix_k=base["prefix_k"][:, :1]), {}, "prefix_k"
    yield "prefix_v-shape", dict(base, prefix_v=base["prefix_v"][:, :, :2]), {}, "prefix_v"
    yield "k-dtype", dict(base, k=base["k"].double()), {}, "k"
    yield "prefix_v-device", dict(base, prefix_v=base["prefix_v"].to("meta")), {}, "prefix_v"
    yield "group-range", base, dict(group_index=[0, 2]), "group_index"
    yield "group-negative", base, dict(group_index=torch.tensor([-1, 0])), "group_index"
    yield "group-length", base, dict(group_index=[0, 1, 1]), "group_index"
    yield "group-float", base, dict(group_index=torch.tensor([0.0, 1.0])), "group_index"
    yield "group-default", dict(base, q=torch.randn(3, 4, 5, 8), k=torch.randn(3, 2, 5, 8),
                                v=torch.randn(3, 2, 5, 8)), {}, "group_index"
    yield "lengths-over-P", base, dict(prefix_lengths=[3, 4]), "prefix_lengths"
    yield "lengths-negative", base, dict(prefix_lengths=[-1, 2]), "prefix_lengths"
    yield "lengths-shape", base, dict(prefix_lengths=[3]), "prefix_lengths"
    yield "mask-dtype", base, dict(key_padding_mask=torch.ones(2, 5)), "key_padding_mask"
    yield "mask-shape", base, dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), "key_padding_mask"
    yield "mask-type", base, dict(key_padding_mask=[[True] * 5] * 2), "key_padding_mask"
    yield "scale-negative", base, dict(scale=-1.0), "scale"
    yield "scale-tensor", base, dict(scale=torch.tensor(0.5)), "scale"
    yield "softcap-zero", base, dict(softcap=0.0), "softcap"
    yield "softcap-str", base, dict(softcap="50"), "softcap"
    yield "impl", base, dict(impl="cuda"), "impl"
    yield "impl-triton-fp64", {n: x.double() for n, x in base.items()}, dict(impl="triton"), "impl"
    wide = {name: x.float() for name, x in make_inputs(1, 1, 2, 3, 2, 2, 160).items()}
    yield "impl-triton-head-dim", wide, dict(impl="triton"), "impl='triton' supports head dims"


@pytest.mark.parametrize("tensors,kwargs,name", [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_bad_input(tensors, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        prefix_attention(**tensors, **kwargs)


def test_auto_takes_torch_for_head_dims_over_the_kernels():
    from promptkd.impls import pick_impl as _pick_impl

    cuda = torch.device("cuda")
    assert _pick_impl("auto", cuda, torch.bfloat16, 128) == "triton"
    assert _pick_impl("auto", cuda, torch.bfloat16, 160) == "torch"
    assert _pick_impl("auto", cuda, torch.float64, 64) == "torch"
    assert _pick_impl("auto", torch.device("cpu"), torch.float32, 64) == "torch"


GPU_CASES = [
    (2, 1, 256, 512, 8, 8, 128, None, None, None, "bhnd"),
    (2, 2, 256, 512, 8, 2, 128, [256, 100], [1, 0], "left", "bnhd"),
    (2, 2, 256, 512, 8, 2, 80, [0, 256], None, "holes", "bhnd"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_gpu_matches_fp64(case, dtype, real_tiles):
    inputs = make_inputs(*case[:7], device="cuda")
    kwargs = _kwargs(case, "cuda")
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, dtype, "reference", **kwargs)
    fused = run(inputs, dtype, "triton", layout=case[-1], **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)
    again = run(inputs, dtype, "triton", layout=case[-1], **kwargs)
    for key in fused:
        assert torch.equal(fused[key], again[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_softcap_matches_fp64(dtype, real_tiles):
    """On CUDA, the real tiles: softcapped scores (Gemma 2) through the Triton kernels against float64."""
    case = GPU_CASES[1]
    inputs = make_inputs(*case[:7], device="cuda")
    inputs["q"] *= 4
    kwargs = dict(_kwargs(case, "cuda"), softcap=2.0)
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, dtype, "reference", **kwargs)
    fused = run(inputs, dtype, "triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, dtype)


@pytest.mark.gpu
def test_gpu_float32(real_tiles):
    case = GPU_CASES[1]
    inputs = make_inputs(*case[:7], device="cuda")
    kwargs = _kwargs(case, "cuda")
    truth = run(inputs, torch.float64, "reference", **kwargs)
    eager = run(inputs, torch.float32, "reference", **kwargs)
    fused = run(inputs, torch.float32, "triton", **kwargs)
    assert_close_to_truth(fused, eager, truth, torch.float32)



@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 3], ids=["splits_auto", "splits_3"])
def test_gpu_triton_is_deterministic(splits, real_tiles, monkeypatch):
    """Five runs on the GPU: identical bits for the output and all five gradients, with G = 2 prefixes and
    the prefix-gradient kernel's samples cut into several splits (summed in a fixed order)."""
    if splits is not None:
        monkeypatch.setattr(triton_impl, "_splits", lambda device, programs, batch: splits)
    prefix_kernel = KernelLaunches(triton_impl.prefix_attention_prefix_dkdv_kernel)
    monkeypatch.setattr(triton_impl, "prefix_attention_prefix_dkdv_kernel", prefix_kernel)
    case = (8, 2, 256, 256, 8, 2, 128, [256, 100], [0, 1, 0, 1, 0, 1, 1, 1], "left", "bhnd")
    inputs = make_inputs(*case[:7], device="cuda")
    kwargs = _kwargs(case, "cuda")
    runs = [run(inputs, torch.bfloat16, "triton", **kwargs) for _ in range(5)]
    grids = {grid for grid, _, _ in prefix_kernel.launches}
    assert len(grids) == 1 and next(iter(grids))[2] > 1, grids  # (key blocks, G x Hkv, splits)
    for again in runs[1:]:
        for key, value in runs[0].items():
            assert torch.isfinite(value).all() and torch.equal(again[key], value), key

"""fused_linear_topk: teacher targets against float64 full logits (ids, log-probabilities, ties, temperature,
biases, vocab_size padding, chunks), the sampler (its Philox numbers, every draw in its interval, a chi-square
test, reproducibility over chunkings), argument errors, no gradient, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

import promptkd
import promptkd.kd.torch_impl
from helpers import cpu_kernels
from promptkd.kd import native
from promptkd.sparse.philox import philox, uniforms

# The row backends the tests run: native C++ (CI builds it) and torch ops.
BACKENDS = ["chunked", "chunked-torchops"]


@pytest.fixture(autouse=True)
def small_chunks_and_poison(monkeypatch):
    monkeypatch.setattr(promptkd.kd.torch_impl, "CHUNK_BYTES", 4 * 1001 * 8)  # 8-row chunks
    monkeypatch.setattr("promptkd.launch.POISON", float("nan"))  # output buffers filled with NaN first


def inputs(n=37, d=24, v=1001, seed=0, scale=3.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    return (torch.randn(*shape, d, generator=g, dtype=torch.float64),
            torch.randn(v, d, generator=g, dtype=torch.float64) * (scale / d ** 0.5),
            torch.randn(v, generator=g, dtype=torch.float64))


def topk(backend, h, w, k, **kw):
    with cpu_kernels(backend) as impl:
        return promptkd.fused_linear_topk(h, w, k, impl=impl, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,t,bias,lead", [(1, 1.0, False, None), (7, 2.5, True, None), (64, 0.7, True, (3, 13)),
                                           (1001, 1.0, True, None)], ids=["k1", "k7-T2.5-bias", "k64-T0.7-lead",
                                                                          "k=V"])
def test_topk_matches_float64(backend, k, t, bias, lead):
    h, w, b = inputs(lead=lead)
    b = b if bias else None
    out = topk(backend, h.float(), w.float(), k, bias=None if b is None else b.float(), temperature=t)
    logits = torch.nn.functional.linear(h, w, b).reshape(-1, w.shape[0])
    ids, lp = out.ids.reshape(-1, k), out.logprobs.reshape(-1, k)
    assert out.ids.shape == (*h.shape[:-1], k) and out.ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    # The chosen logits are the k largest (float32 GEMMs may swap near-ties: compare values), in order.
    want = logits.sort(1, descending=True).values[:, :k]
    chosen = logits.gather(1, ids)
    assert (chosen - want).abs().max() < 1e-5
    assert (chosen[:, 1:] <= chosen[:, :-1] + 1e-5).all()
    assert (ids.sort(1).values[:, 1:] != ids.sort(1).values[:, :-1]).all()  # distinct
    # log-probabilities: no further from float64 than float32 eager's, plus 1e-5
    truth = torch.log_softmax(logits / t, 1).gather(1, ids)
    eager = torch.log_softmax(torch.nn.functional.linear(h.float(), w.float(), None if b is None else b.float())
                              .reshape(-1, w.shape[0]) / t, 1).gather(1, ids).double()
    err = (lp.double() - truth).abs().max().item()
    assert err <= (eager - truth).abs().max().item() + 1e-5, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_id(backend):
    # Logits are exactly the bias (hidden 0): many ties, several of them across the k-th place.
    v, k = 203, 16
    bias = torch.tensor([float((7 * j) % 5) for j in range(v)])
    h, w = torch.zeros(4, 8), torch.randn(v, 8)
    out = topk(backend, h, w, k, bias=bias)
    want = sorted(range(v), key=lambda j: (-bias[j].item(), j))[:k]
    for row in out.ids.tolist():
        assert row == want
    lp = torch.log_softmax(bias.double(), 0)[torch.tensor(want)]
    assert torch.allclose(out.logprobs.double(), lp.expand(4, k), atol=1e-6)
    # -0.0 and +0.0 are equal logits too
    signed = torch.tensor([0.0, -0.0, 0.0, -0.0, -1.0])
    out = topk(backend, torch.zeros(1, 2), torch.zeros(5, 2), 3, bias=signed)
    assert out.ids.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_ignores_padding_rows(backend):
    h, w, b = inputs(v=300)
    b = b.clone()
    b[250:] = 100.0  # padding rows with the largest logits: never chosen, not in the softmax
    out = topk(backend, h.float(), w.float(), 5, bias=b.float(), vocab_size=250)
    assert (out.ids < 250).all()
    logits = torch.nn.functional.linear(h, w[:250], b[:250])
    truth = torch.log_softmax(logits, 1).gather(1, out.ids)
    assert (out.logprobs.double() - truth).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_gets_nan_logprobs(backend):
    h, w, b = inputs(n=5)
    h = h.float()
    h[2, 3] = math.nan
    out = topk(backend, h, w.float(), 4)
    assert out.logprobs[2].isnan().all()
    assert out.logprobs[[0, 1, 3, 4]].isfinite().all()


def test_float64_inputs_give_float64_logprobs():
    h, w, _ = inputs(n=5)
    out = promptkd.fused_linear_topk(h, w, 3)
    assert out.logprobs.dtype == torch.float64
    ref = promptkd.fused_linear_topk(h, w, 3, impl="reference")
    assert torch.equal(out.ids, ref.ids) and torch.allclose(out.logprobs, ref.logprobs, atol=1e-12)


# ---- the sampler ----

KAT = [  # Philox4x32-10 known answers (Random123): key, counter, words
    (0, (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (0xFFFFFFFFFFFFFFFF, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (0x299F31D0A4093822, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                                              0x24126EA1)),
]


@pytest.mark.parametrize("key,counter,words", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(key, counter, words):
    as_int64 = torch.tensor(key - 2**64 if key >= 2**63 else key, dtype=torch.int64)
    got = philox(as_int64, *(torch.tensor(c, dtype=torch.int64) for c in counter))
    assert tuple(int(x) for x in got) == words
    if native.library() is not None:
        assert native.philox(key, counter) == words


def _draws(logits: torch.Tensor, t: float, keys, counters, samples: int) -> list[list[int]]:
    """Each row's draws by inverse transform on float64 probabilities (the sampler's definition)."""
    p = torch.softmax(logits.double() / t, 1)
    cdf = p.cumsum(1)
    u = uniforms(keys, counters, samples) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=logits.shape[1] - 1).tolist(), (u, cdf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1.0, 1.7])
def test_every_draw_is_the_inverse_transform_of_its_uniform(backend, t):
    h, w, b = inputs(n=40, v=500, scale=4.0)
    s = 12
    logits = torch.nn.functional.linear(h, w, b)
    n = logits.shape[0]
    # A draw within 1e-6 of a boundary of the float64 intervals could go either way in float32: the seed is the
    # first one whose draws all land farther from every boundary (a choice of test data, made in float64).
    for seed in range(1000, 1100):
        want, (u, cdf) = _draws(logits, t, torch.full((n,), seed), torch.arange(n), s)
        if (cdf[:, :, None] - u[:, None, :]).abs().min(1).values.min() > 1e-6:
            break
    else:
        raise AssertionError("no seed keeps every draw 1e-6 away from the interval boundaries")
    out = topk(backend, h.float(), w.float(), 16, bias=b.float(), temperature=t, samples=s, seed=seed)
    for r in range(n):
        counts = {}
        for j in want[r]:
            counts[j] = counts.get(j, 0) + 1
        expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        got = [(i, lp) for i, lp in zip(out.ids[r].tolist(), out.logprobs[r].tolist(), strict=True) if i >= 0]
        assert [i for i, _ in got] == [i for i, _ in expected], r
        assert all(abs(lp - math.log(c / s)) < 1e-6 for (_, lp), (_, c) in zip(got, expected, strict=True))
        pad = out.ids[r] < 0
        assert (out.logprobs[r][pad] == -math.inf).all() and int((~pad).sum()) == len(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_follow_the_distribution(backend):
    # 4000 rows of the same 6 logits, 12 draws each: a chi-square test over 48000 draws. The critical value
    # 35.9 (5 degrees of freedom) has probability 1e-6 under the right sampler; the seed is fixed.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for t in (1.0, 2.0):
        out = topk(backend, torch.ones(4000, 1), logits[:, None], 12, temperature=t, samples=12, seed=99)
        counts = torch.zeros(6, dtype=torch.float64)
        ids, n = out.ids.reshape(-1), (out.logprobs.double().exp() * 12).round().reshape(-1)
        counts.index_add_(0, ids[ids >= 0], n[ids >= 0])
        assert counts.sum() == 48000
        expected = torch.softmax(logits.double() / t, 0) * 48000
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 35.9, (t, chi2, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_targets_on_any_chunking(backend, monkeypatch):
    h, w, b = inputs(n=29, v=700)
    args = (h.float(), w.float(), 12)
    kw = dict(bias=b.float(), samples=12, seed=77)
    first = topk(backend, *args, **kw)
    for chunk_rows in (1, 5, 64):
        monkeypatch.setattr(promptkd.kd.torch_impl, "CHUNK_BYTES", 4 * 700 * chunk_rows)
        again = topk(backend, *args, **kw)
        assert torch.equal(first.ids, again.ids) and torch.equal(first.logprobs, again.logprobs)
    other = topk(backend, *args, **{**kw, "seed": 78})
    assert not torch.equal(first.ids, other.ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_tensors_key_each_row(backend):
    h, w, _ = inputs(n=10, v=400)
    h = torch.cat([h, h]).float()  # rows 10..19 repeat rows 0..9
    keys = torch.arange(20) % 10 * 7919  # the same key for a row and its repeat
    out = topk(backend, h, w.float(), 12, samples=12, seed=keys)
    assert torch.equal(out.ids[:10], out.ids[10:])
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    moved = topk(backend, h[perm], w.float(), 12, samples=12, seed=keys[perm])
    assert torch.equal(moved.ids, out.ids[perm])  # a row's draws follow its key, not its position
    lead = topk(backend, h.reshape(4, 5, -1), w.float(), 12, samples=12, seed=keys.reshape(4, 5))
    assert torch.equal(lead.ids.reshape(20, 12), out.ids)


def test_native_and_torch_samplers_agree():
    h, w, b = inputs(n=40, v=500)
    native_out = topk("chunked", h.float(), w.float(), 12, bias=b.float(), samples=12, seed=5)
    torch_out = topk("chunked-torchops", h.float(), w.float(), 12, bias=b.float(), samples=12, seed=5)
    assert torch.equal(native_out.ids, torch_out.ids)
    assert torch.allclose(native_out.logprobs, torch_out.logprobs)


# ---- the rest of the contract ----

def test_no_gradient_and_no_graph():
    h, w, b = (x.float().requires_grad_() for x in inputs(n=5))
    out = promptkd.fused_linear_topk(h, w, 3, bias=b)
    assert not out.logprobs.requires_grad and out.logprobs.grad_fn is None
    out = promptkd.fused_linear_topk(h, w, 3, bias=b, samples=2, seed=1)
    assert not out.logprobs.requires_grad


def test_compiles_without_graph_breaks():
    h, w, b = (x.float() for x in inputs(n=9, v=300))

    def fn(h, w, b):
        out = promptkd.fused_linear_topk(h * 2.0, w, 5, bias=b)
        return out.ids, out.logprobs * 1.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ids, lp = compiled(h, w, b)
    eager_ids, eager_lp = fn(h, w, b)
    assert torch.equal(ids, eager_ids) and torch.equal(lp, eager_lp)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=2000), ValueError, "k=2000 exceeds the vocabulary"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(k=4, samples=8), ValueError, "must be >= samples=8"),
    (dict(k=4, samples=-1), ValueError, "samples must be >= 0"),
    (dict(k=4, seed=3), ValueError, "seed applies to sampled targets"),
    (dict(k=4, samples=4, seed=-1), ValueError, r"seed must lie in \[0, 2\*\*64\)"),
    (dict(k=4, samples=4, seed=1.5), TypeError, "seed must be an int"),
    (dict(k=4, samples=4, seed=torch.zeros(3, dtype=torch.long)), ValueError, "leading shape"),
    (dict(k=4, temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(k=4, vocab_size=2000), ValueError, "vocab_size=2000 exceeds"),
    (dict(k=4, impl="triton"), ValueError, "impl must be one of"),
    (dict(k=4, bias=torch.zeros(7)), ValueError, r"bias must have shape \[1001\]"),
    (dict(k=4, weight=torch.zeros(1001, 5)), ValueError, r"weight must be \[V, 24\]"),
    (dict(k=4, weight=torch.zeros(1001, 24, dtype=torch.float64)), ValueError, "weight has dtype"),
    (dict(k=4, hidden=torch.zeros(37, 24, dtype=torch.long)), ValueError, "hidden must be a floating tensor"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    h, w, _ = inputs()
    args = dict(hidden=h.float(), weight=w.float())
    args.update(kwargs)
    with pytest.raises(error, match=match):
        promptkd.fused_linear_topk(args.pop("hidden"), args.pop("weight"), args.pop("k"), **args)


@pytest.mark.gpu
def test_gpu_targets_match_the_cpu():
    h, w, b = inputs(n=300, v=5003)
    cpu = promptkd.fused_linear_topk(h.float(), w.float(), 64, bias=b.float(), temperature=1.5)
    gpu = promptkd.fused_linear_topk(h.float().cuda(), w.float().cuda(), 64, bias=b.float().cuda(), temperature=1.5)
    logits = torch.nn.functional.linear(h, w, b)
    chosen = logits.gather(1, gpu.ids.cpu())
    assert (chosen - logits.gather(1, cpu.ids)).abs().max() < 1e-4
    assert (gpu.logprobs.cpu() - torch.log_softmax(logits / 1.5, 1).gather(1, gpu.ids.cpu())).abs().max() < 1e-4
    sampled = promptkd.fused_linear_topk(h.float().cuda(), w.float().cuda(), 12, samples=12, seed=3)
    again = promptkd.fused_linear_topk(h.float().cuda(), w.float().cuda(), 12, samples=12, seed=3)
    assert torch.equal(sampled.ids, again.ids) and (sampled.logprobs.exp().sum(1) - 1).abs().max() < 1e-5

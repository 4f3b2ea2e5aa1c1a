"""The native CPU kernels (kernels/cpu/kd_rows.cpp) beside the torch-ops backend, the fallback when the
library is missing, and ``promptkd info``. The losses' float64 comparisons run both backends in
tests/test_kd_loss.py (``CPU_IMPLS``)."""

import json
import math
import os
import warnings

import pytest
import torch

import promptkd
from helpers import require_native
from promptkd import cli
from promptkd.kd import native, rows
from promptkd.kd.settings import DIVERGENCES, KDSettings


@pytest.fixture
def missing_library(monkeypatch, tmp_path):
    """As if the native build had not run: the library path points at nothing (and the load cache and the
    once-only warning are reset before and after)."""
    monkeypatch.setenv("PROMPTKD_NATIVE_LIB", str(tmp_path / "libpromptkd_cpu.so"))
    monkeypatch.delenv("PROMPTKD_CPU_KERNELS", raising=False)
    native._load.cache_clear()
    monkeypatch.setattr(rows, "_warned", False)
    yield
    native._load.cache_clear()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in ((9, 16), (203, 16), (9, 12), (203, 12))]


def _chunked_loss(*leaves):
    hs, ws, ht, wt = leaves
    return promptkd.fused_linear_kd_loss(hs, ws, ht, wt, divergence="jsd", impl="chunked")


def test_missing_library_falls_back_with_one_warning(missing_library):
    assert native.library() is None and "does not exist" in native.unavailable_reason()
    leaves = [x.requires_grad_() for x in _inputs()]
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable.*does not exist") as record:
        loss = _chunked_loss(*leaves)
        loss.backward()
        _chunked_loss(*leaves)  # warned once per process, not per call
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    want = promptkd.fused_linear_kd_loss(*(x.detach() for x in leaves), divergence="jsd", impl="reference")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_torch_ops_chosen_explicitly_do_not_warn(missing_library, monkeypatch):
    monkeypatch.setenv("PROMPTKD_CPU_KERNELS", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _chunked_loss(*_inputs())


def test_native_asked_for_but_missing_is_an_error(missing_library, monkeypatch):
    monkeypatch.setenv("PROMPTKD_CPU_KERNELS", "native")
    with pytest.raises(RuntimeError, match="PROMPTKD_CPU_KERNELS=native, but .*does not exist"):
        _chunked_loss(*_inputs())


def test_bad_backend_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("PROMPTKD_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="PROMPTKD_CPU_KERNELS must be one of"):
        _chunked_loss(*_inputs())


def test_a_foreign_library_is_refused(monkeypatch):
    """A file at the library path that is not promptkd's (here: libc) is not called."""
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    if not os.path.exists(libc):
        pytest.skip(f"no {libc} on this machine to stand in for a foreign library")
    monkeypatch.setenv("PROMPTKD_NATIVE_LIB", libc)
    native._load.cache_clear()
    try:
        assert native.library() is None and "not promptkd's native library" in native.unavailable_reason()
    finally:
        native._load.cache_clear()


def _rows(seed, r, v, scale_logits=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, v, generator=g) * scale_logits, torch.randn(r, v, generator=g) * scale_logits


ADVERSARIAL = {
    "huge": lambda s, t: (s * 1e4, t * 1e4),          # exp underflows for all but a few entries
    "one_hot": lambda s, t: (s, t.index_fill(1, torch.tensor([5]), 200.0)),
    "flat": lambda s, t: (torch.zeros_like(s), torch.zeros_like(t)),
    "offset": lambda s, t: (s + 1e3, t - 1e3),        # large maxima next to small log-sums
}


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_native_matches_float64_on_adversarial_rows(div, case):
    """Row losses and logit gradients of both backends against a float64 evaluation (the torch backend on
    float64 rows), on rows that stress the exp/log polynomials: no worse than the torch backend in float32."""
    require_native()
    s, t = ADVERSARIAL[case](*_rows(1, 6, 1037))
    settings = KDSettings(divergence=div, beta=0.3, alpha=0.2, temperature=1.7, hard_weight=0.4, vocab_size=1037)
    targets = torch.tensor([0, 5, 1036, 17, 5, 999])
    scale = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25])
    truth = rows.torch_rows(s.double(), t.double(), targets, scale.double(), settings, True, True)
    got = {b: rows.kd_rows(s.clone(), t.clone(), targets, scale, settings, True, True, backend=b)
           for b in ("native", "torch")}
    for i, name in enumerate(("loss", "ds", "dt")):
        ref = truth[i]
        # gradients are measured against the size of a probability (a one-hot row's exact teacher
        # gradient can be ~1e-48, while every float32 evaluation leaves eps-sized residues there)
        size = max(ref.abs().max().item(), 1.0)
        err = {b: (g[i].double() - ref).abs().max().item() / size for b, g in got.items()}
        assert torch.isfinite(got["native"][i]).all(), name
        assert err["native"] <= err["torch"] + 2e-6, (name, err)


def test_native_propagates_nan():
    require_native()
    s, t = _rows(2, 3, 257)
    s[1, 40] = math.nan
    for div in DIVERGENCES:
        settings = KDSettings(divergence=div, vocab_size=257)
        loss, ds, _ = rows.kd_rows(s.clone(), t.clone(), None, torch.ones(3), settings, True, False, backend="native")
        assert loss[1].isnan() and ds[1].isnan().all(), div
        assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(ds[[0, 2]]).all(), div


def test_info_reports_the_backends(capsys, monkeypatch):
    monkeypatch.delenv("PROMPTKD_CPU_KERNELS", raising=False)
    assert cli.main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["promptkd"] == promptkd.__version__ and report["torch"] == torch.__version__
    assert report["native_cpu_kernels"]["available"] == (native.library() is not None)
    assert report["cpu_elementwise_backend"] == ("native" if native.library() is not None else
                                                 "torch (the native kernels are unavailable)")
    assert cli.main(["info"]) == 0
    assert "native CPU kernels" in capsys.readouterr().out


def test_info_says_why_the_native_kernels_are_missing(missing_library, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "UNAVAILABLE" in out and "does not exist" in out and "cmake" in out


def _openmp_threads() -> int | None:
    """omp_get_max_threads() of the libgomp this process loaded (torch's, which the native library shares)."""
    import ctypes

    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libgomp" in line}
    for path in paths:
        return ctypes.CDLL(path).omp_get_max_threads()
    return None


def test_native_rows_are_the_same_bits_on_one_thread_and_two():
    """The suite runs each xdist worker on one thread (tests/conftest.py); the native passes must not depend on
    it: rows split over two OpenMP threads (each with its own scratch rows) give the one-thread bits, for the KD
    pass, top-k, sampling and the sparse loss."""
    require_native()
    s, t = _rows(3, 64, 1037)
    settings = KDSettings(divergence="jsd", beta=0.3, temperature=1.3, hard_weight=0.2, vocab_size=1037)
    targets = torch.randint(0, 1037, (64,), generator=torch.Generator().manual_seed(5))
    scale = torch.rand(64, generator=torch.Generator().manual_seed(6))
    ids, lp = native.topk_rows(t.clone(), 16, 1 / 1.3)
    keys, counters = torch.arange(64, dtype=torch.int64) * 7919, torch.zeros(64, dtype=torch.int64)

    def passes():
        a, b = s.clone(), t.clone()
        kd = native.kd_rows(a, b, targets, scale, settings, True, True)
        sp = s.clone()
        sparse = native.sparse_rows(sp, ids, lp, targets, scale, True, 1 / 1.3, 1.0, 0.2)
        return [kd, a, b, *native.topk_rows(t.clone(), 16, 1 / 1.3), *native.sample_rows(t.clone(), 12, 12, 1.0, keys,
                                                                                         counters), sparse, sp]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = passes()
        torch.set_num_threads(2)
        assert _openmp_threads() in (None, 2)
        two = passes()
    finally:
        torch.set_num_threads(threads)
    for i, (x, y) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(x, y), i

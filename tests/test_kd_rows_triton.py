"""The ``triton`` backend of the chunked loss's row pass (kernels/kd_rows.py via promptkd.kd.rows.triton_rows).

Truth: the torch backend on float64 copies of the rows (the formulas of promptkd.kd.math in float64). Rule:
the Triton kernel's error is at most the float32 torch backend's error + TOL, errors measured against the
size of the value (at least 1: a probability's size, as tests/test_native.py does). Small tiles make the
kernel's column loop run several times and end in a partial tile; the rows sit in a buffer with padding
columns filled with NaN (a read past V would leak NaN; a write past V shows up there), and the loss buffer
is filled with NaN first (launch.POISON). Runs under Triton's interpreter on CPU tensors (every test name
says "triton": tests/conftest.py), and on CUDA in the gpu test.
"""

import pytest
import torch

import promptkd
from promptkd import launch
from promptkd.kd import rows, torch_impl
from promptkd.kd.settings import DIVERGENCES, KDSettings
from promptkd.kernels import kd_rows as kernels

TOL = 2e-6
NEEDS = {"st": (True, True), "s": (True, False), "t": (False, True)}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", float("nan"))


def _tiles(monkeypatch, block_v: int):
    monkeypatch.setattr(kernels, "CONFIGS", (kernels.RowsConfig(None, block_v, 4, 1),))


def _logits(r, v, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, v, generator=g) * scale, torch.randn(r, v, generator=g) * scale


def _padded(x: torch.Tensor, pad: int = 3):
    """(view, padding): x in the leading columns of a NaN-filled [rows, V + pad] buffer (row stride V + pad)."""
    buf = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]], buf[:, x.shape[1]:]


def _check(s, t, targets, scale, settings, need_s, need_t):
    """kd_rows with backend="triton" against float64 truth, no worse than the float32 torch backend."""
    truth = rows.torch_rows(s.double(), t.double(), targets, None if scale is None else scale.double(), settings,
                            need_s, need_t)
    eager = rows.torch_rows(s.clone(), t.clone(), targets, scale, settings, need_s, need_t)
    (fs, pad_s), (ft, pad_t) = _padded(s), _padded(t)
    fused = rows.kd_rows(fs, ft, targets, scale, settings, need_s, need_t, backend="triton")
    assert pad_s.isnan().all() and pad_t.isnan().all(), "wrote past V"
    for name, got, want, ref in zip(("loss", "ds", "dt"), fused, eager, truth, strict=True):
        if ref is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        size = max(ref.abs().max().item(), 1.0)
        e_fused = (got.double() - ref).abs().max().item() / size
        e_eager = (want.double() - ref).abs().max().item() / size
        assert e_fused <= e_eager + TOL, f"{name}: triton error {e_fused:.3g} > torch float32 {e_eager:.3g} + {TOL}"
    if need_s and scale is not None:
        assert fused[1].data_ptr() == fs.data_ptr()  # written in place


def _settings(div, v, temperature=1.7, hard_weight=0.4, soft_weight=0.8, beta=0.3, alpha=0.2):
    return KDSettings(divergence=div, beta=beta, alpha=alpha, temperature=temperature, soft_weight=soft_weight,
                      hard_weight=hard_weight, vocab_size=v)


@pytest.mark.parametrize("need", list(NEEDS))
@pytest.mark.parametrize("div", DIVERGENCES)
def test_triton_rows_match_float64(div, need, monkeypatch):
    """R5-V200, tiles of 64 (4 tiles, the last partial), T = 1.7, soft and hard weights, scale != 1."""
    _tiles(monkeypatch, 64)
    s, t = _logits(5, 200)
    targets = torch.tensor([0, 199, 17, 64, 128])
    scale = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.25])
    _check(s, t, targets, scale, _settings(div, 200), *NEEDS[need])


CASES = {  # (rows, V, BLOCK_V, settings keywords)
    "R7-V37-B16-T1-soft": (7, 37, 16, dict(temperature=1.0, hard_weight=0.0, soft_weight=1.0)),
    "R3-V37-B64-T0.5-hard": (3, 37, 64, dict(temperature=0.5, hard_weight=0.5, beta=0.9, alpha=0.0)),
    "R2-V200-B128-T1-hard": (2, 200, 128, dict(temperature=1.0, hard_weight=1.0, soft_weight=0.0, beta=0.1,
                                               alpha=0.7)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("div", DIVERGENCES)
def test_triton_rows_shapes_and_settings(div, case, monkeypatch):
    """Odd row counts and V (one masked tile, or several), T = 1 (CE shares the student's sums) and not, no hard
    loss, no soft loss, the mixing parameters near their ends (alpha = 0: a skew KL's mixture is one side)."""
    r, v, block_v, kw = CASES[case]
    _tiles(monkeypatch, block_v)
    s, t = _logits(r, v, seed=1)
    g = torch.Generator().manual_seed(2)
    _check(s, t, torch.randint(0, v, (r,), generator=g), torch.rand(r, generator=g) + 0.5, _settings(div, v, **kw),
           True, True)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_triton_rows_loss_only(div, monkeypatch):
    """Without a scale only the loss is computed: no gradient returned, the logits free to be anything after."""
    _tiles(monkeypatch, 32)
    s, t = _logits(4, 70, seed=3)
    _check(s, t, torch.tensor([1, 2, 69, 0]), None, _settings(div, 70), True, True)


def _one_hot_ish(s, t):
    s, t = torch.zeros_like(s), torch.zeros_like(t)
    s[:, 0] = 1e4
    t[:, 0], t[1:, 5] = 1e4, 2e4  # row 0 agrees with the student, the others put the teacher's mass elsewhere
    return s, t


EXTREME = {
    "huge": lambda s, t: (s * 1e4, t * 1e4),  # every exponential but a few underflows
    "one_hot_ish": _one_hot_ish,  # rows like [1e4, 0, 0, ...]
    "offset": lambda s, t: (s + 1e3, t - 1e3),  # large maxima next to small log-sums
    "flat": lambda s, t: (torch.zeros_like(s), torch.zeros_like(t)),
}


@pytest.mark.parametrize("case", list(EXTREME))
@pytest.mark.parametrize("div", DIVERGENCES)
def test_triton_rows_extreme(div, case, monkeypatch):
    """Rows that stress the online maximum and sums; the maximum in a later tile than the first in some rows."""
    _tiles(monkeypatch, 32)
    s, t = EXTREME[case](*_logits(3, 101, seed=4))
    targets = torch.tensor([0, 5, 100])
    scale = torch.tensor([1.0, 0.5, 2.0])
    _check(s, t, targets, scale, _settings(div, 101), True, True)


def test_triton_rows_no_rows():
    settings = _settings("jsd", 9)
    loss, ds, dt = rows.kd_rows(torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0, dtype=torch.long),
                                torch.zeros(0), settings, True, True, backend="triton")
    assert loss.shape == (0,) and ds.shape == (0, 9) and dt.shape == (0, 9)


def test_triton_rows_backend_choice(monkeypatch):
    """backend="triton": float32 only, CPU tensors only under the interpreter; auto on the CPU never picks it;
    PROMPTKD_CPU_KERNELS keeps its three values."""
    x = torch.zeros(2, 5)
    assert rows.pick_backend(x, "triton") == "triton"
    assert rows.pick_backend(x, "auto") in ("native", "torch")
    with pytest.raises(ValueError, match="float32 CUDA chunks"):
        rows.pick_backend(x.double(), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"float32 CUDA chunks \(CPU ones only under TRITON_INTERPRET=1\)"):
        rows.pick_backend(x, "triton")
    monkeypatch.setenv("PROMPTKD_CPU_KERNELS", "triton")
    with pytest.raises(ValueError, match="PROMPTKD_CPU_KERNELS must be one of"):
        rows.pick_backend(x)


def _leaves(n, d, v, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"student_hidden": torch.randn(n, d, generator=g, dtype=torch.float64),
            "student_weight": torch.randn(v, d, generator=g, dtype=torch.float64) * d ** -0.5 * 2,
            "teacher_hidden": torch.randn(n, d + 4, generator=g, dtype=torch.float64),
            "teacher_weight": torch.randn(v, d + 4, generator=g, dtype=torch.float64) * (d + 4) ** -0.5 * 2,
            "student_bias": torch.randn(v, generator=g, dtype=torch.float64) * 0.5}


def _loss_and_grads(leaves: dict, dtype, labels, impl, reduction, kwargs):
    x = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    loss = promptkd.fused_linear_kd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                         x["teacher_weight"], labels, student_bias=x["student_bias"], impl=impl,
                                         reduction=reduction, **kwargs)
    g = torch.Generator().manual_seed(6)
    loss.backward((torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=loss.device))
    return {"loss": loss.detach().double(), **{k: v.grad.double() for k, v in x.items()}}


@pytest.mark.parametrize("div,reduction", [("forward_kl", "mean"), ("skew_reverse_kl", "mean"), ("jsd", "none")])
def test_triton_rows_in_the_chunked_loss(div, reduction, monkeypatch):
    """impl="chunked" with its row pass forced onto the Triton kernel, chunks of 4 rows (the last partial) and
    tiles of 32: loss and all five gradients match impl="reference" (float64 truth; no worse than the float32
    reference + 1e-5). mean: gradients computed in forward; none: the loss in forward, the gradients in backward."""
    _tiles(monkeypatch, 32)
    calls = []

    def forced(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return rows.kd_rows(*args, **{**kwargs, "backend": "triton"})

    monkeypatch.setattr(torch_impl, "kd_rows", forced)
    monkeypatch.setattr(torch_impl, "CHUNK_BYTES", 4 * 4 * 90)  # 4 rows of V = 90 per chunk
    n, v = 11, 90
    leaves = _leaves(n, 24, v)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(7))
    labels[::4] = -100
    kwargs = dict(divergence=div, temperature=2.0, hard_weight=0.3, beta=0.4, alpha=0.25)
    truth = _loss_and_grads(leaves, torch.float64, labels, "reference", reduction, kwargs)
    eager = _loss_and_grads(leaves, torch.float32, labels, "reference", reduction, kwargs)
    fused = _loss_and_grads(leaves, torch.float32, labels, "chunked", reduction, kwargs)
    assert len(calls) == (3 if reduction == "mean" else 6)  # 3 chunks, forward (and backward)
    _no_worse_than_reference(fused, eager, truth)


def _no_worse_than_reference(fused: dict, eager: dict, truth: dict, tol: float = 1e-5):
    for key, ref in truth.items():
        assert torch.isfinite(fused[key]).all(), key
        size = ref.abs().max().item()
        e_fused, e_eager = ((r[key] - ref).abs().max().item() / size for r in (fused, eager))
        assert e_fused <= e_eager + tol, f"{key}: chunked+triton {e_fused:.3g} > reference fp32 {e_eager:.3g} + {tol}"


@pytest.mark.gpu
@pytest.mark.parametrize("div", DIVERGENCES)
def test_gpu_triton_rows(div):
    """On CUDA, compiled: auto picks the kernel for float32 chunks; V = 128256-like rows (several 4096-column
    tiles, a partial last one), and the chunked loss through it against the reference."""
    s, t = (x.cuda() for x in _logits(67, 50257, seed=8))
    assert rows.pick_backend(s) == "triton" and rows.pick_backend(s.double()) == "torch"
    targets = torch.randint(0, 50257, (67,), device="cuda")
    scale = torch.rand(67, device="cuda") + 0.5
    settings = _settings(div, 50257)
    truth = rows.torch_rows(s.double(), t.double(), targets, scale.double(), settings, True, True)
    eager = rows.torch_rows(s.clone(), t.clone(), targets, scale, settings, True, True)
    fused = rows.kd_rows(s.clone(), t.clone(), targets, scale, settings, True, True)
    for name, got, want, ref in zip(("loss", "ds", "dt"), fused, eager, truth, strict=True):
        size = max(ref.abs().max().item(), 1.0)
        e_fused = (got.double() - ref).abs().max().item() / size
        e_eager = (want.double() - ref).abs().max().item() / size
        assert e_fused <= e_eager + 1e-5, f"{name}: triton {e_fused:.3g} > torch float32 {e_eager:.3g} + 1e-5"
    leaves = {k: v.cuda() for k, v in _leaves(300, 64, 5003).items()}
    labels = torch.randint(0, 5003, (300,), device="cuda")
    kwargs = dict(divergence=div, temperature=2.0, hard_weight=0.3)
    truth = _loss_and_grads(leaves, torch.float64, labels, "reference", "mean", kwargs)
    eager = _loss_and_grads(leaves, torch.float32, labels, "reference", "mean", kwargs)
    _no_worse_than_reference(_loss_and_grads(leaves, torch.float32, labels, "chunked", "mean", kwargs), eager, truth)


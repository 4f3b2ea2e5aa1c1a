"""The ``triton`` backend of the sparse loss's row pass (kernels/sparse_rows.py via
promptkd.sparse.rows.triton_sparse_rows).

Truth: the torch backend on float64 copies of the rows. Rule: the Triton kernel's error is at most the float32
torch backend's error + TOL, errors measured against the size of the value (at least 1). Small tiles make the
column loops run several times and end in a partial tile; the rows sit in a buffer whose padding columns hold
NaN (a read past V would leak NaN; a write past V shows up there), and the loss buffer is filled with NaN first
(launch.POISON). Runs under Triton's interpreter on CPU tensors (every test name says "triton").
"""

import itertools

import pytest
import torch

from promptkd import launch
from promptkd.kernels import sparse_rows as kernels
from promptkd.sparse import rows
from promptkd.sparse.settings import SparseKDSettings

TOL = 2e-6
# Masked-out lanes compute log(0) and 0 * inf in the interpreter's numpy (never selected): not this test's business.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture(autouse=True)
def poison_and_small_tiles(monkeypatch):
    monkeypatch.setattr(launch, "POISON", float("nan"))
    monkeypatch.setattr(kernels, "pick", lambda vocab: kernels.RowsConfig(None, 64, 4, 1))


def _padded(x: torch.Tensor, pad: int = 3):
    buf = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]], buf[:, x.shape[1]:]


def _targets(r, v, k, seed=0, sampled=False):
    """Distinct ids per row (some -1) and teacher log-probabilities summing below 1 (top-k) or to 1 (sampled)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(r)])
    p = torch.rand(r, k, generator=g) + 0.05
    p = p / p.sum(1, keepdim=True) * (1.0 if sampled else 0.7)
    ids[1, k // 2:] = -1
    ids[2, :] = -1  # no target
    return ids, p.log()


def _check(s, ids, lp, targets, scale, settings):
    truth = rows.torch_sparse_rows(s.double(), ids, lp.double(), targets, None if scale is None else scale.double(),
                                   settings)
    eager = rows.torch_sparse_rows(s.clone(), ids, lp, targets, scale, settings)
    fs, pad = _padded(s)
    fused = rows.sparse_rows(fs, ids, lp, targets, scale, settings, backend="triton")
    assert pad.isnan().all(), "wrote past V"
    for name, got, want, ref in zip(("loss", "grad"), fused, eager, truth, strict=True):
        if ref is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        size = max(ref.abs().max().item(), 1.0)
        e_fused = (got.double() - ref).abs().max().item() / size
        e_eager = (want.double() - ref).abs().max().item() / size
        assert e_fused <= e_eager + TOL, f"{name}: triton error {e_fused:.3g} > torch float32 {e_eager:.3g} + {TOL}"
    if scale is not None:
        assert fused[1].data_ptr() == fs.data_ptr()  # written in place


CASES = list(itertools.product((True, False), (0.0, 0.4), (1.0, 1.7), (True, False)))


@pytest.mark.parametrize("tail,hard,t,grad", CASES,
                         ids=[f"{'tail' if c[0] else 'renorm'}-hard{c[1]}-T{c[2]}-{'grad' if c[3] else 'loss'}"
                              for c in CASES])
def test_triton_sparse_rows_match_float64(tail, hard, t, grad):
    """R6-V200-k9, tiles of 64 (4 tiles, the last partial), a row with fewer targets and one with none."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 200, generator=g) * 3.0
    ids, lp = _targets(6, 200, 9, sampled=not tail)
    targets = torch.tensor([0, 199, 17, 64, ids[4, 0].item(), 128])  # one label is a target id
    scale = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.25, 1.5]) if grad else None
    settings = SparseKDSettings(tail=tail, temperature=t, hard_weight=hard, soft_weight=0.8, vocab_size=200)
    _check(s, ids, lp, targets, scale, settings)


def test_triton_sparse_rows_edge_rows():
    """Every column a target (no rest), a rest of -inf logits, and a confident student (q_r ~ 1e-40)."""
    v = 16
    s = torch.randn(3, v, generator=torch.Generator().manual_seed(2))
    s[1, 8:] = float("-inf")
    s[2, :4] = 100.0
    ids = torch.stack([torch.arange(v), torch.cat([torch.arange(8), torch.full((8,), -1)]),
                       torch.cat([torch.arange(4), torch.full((12,), -1)])])
    p = torch.full((3, v), 1.0 / v)
    p[1, :8] = 0.12
    p[2, :4] = 0.24
    lp = torch.where(ids >= 0, p.log(), 0.0)
    settings = SparseKDSettings(tail=True, vocab_size=v, hard_weight=0.3)
    _check(s, ids, lp, torch.tensor([3, 2, 5]), torch.ones(3), settings)

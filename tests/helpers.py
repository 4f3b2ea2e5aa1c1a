"""Shared inputs and the tolerance rule of the loss tests."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import promptkd

# fused error <= same-dtype eager error + TOL[dtype], errors measured against float64 and
# normalised by the largest magnitude of the float64 value.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
SIDES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def make_inputs(n=37, ds=72, dt=40, vs=1001, vt=None, *, bias=True, seed=0, logit_scale=1.0, lead=None):
    """float64 leaves: hidden states, weights, biases. Weights scaled so logits have std ~ logit_scale."""
    g = torch.Generator().manual_seed(seed)
    vt = vs if vt is None else vt
    shape = (n,) if lead is None else lead
    x = {
        "student_hidden": torch.randn(*shape, ds, generator=g, dtype=torch.float64),
        "student_weight": torch.randn(vs, ds, generator=g, dtype=torch.float64) * (logit_scale / ds ** 0.5),
        "teacher_hidden": torch.randn(*shape, dt, generator=g, dtype=torch.float64),
        "teacher_weight": torch.randn(vt, dt, generator=g, dtype=torch.float64) * (logit_scale / dt ** 0.5),
    }
    if bias:
        x["student_bias"] = torch.randn(vs, generator=g, dtype=torch.float64) * 0.5
        x["teacher_bias"] = torch.randn(vt, generator=g, dtype=torch.float64) * 0.5
    return x


def make_labels(shape, vocab, ignored: str, seed=1, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    if ignored == "some":
        flat[::3] = ignore_index
    elif ignored == "all":
        flat[:] = ignore_index
    return labels


#: The CPU variants the loss tests run: the two chunked strategies with the native elementwise kernels,
#: and the gradient-in-forward one with torch ops (``-torchops``: ``PROMPTKD_CPU_KERNELS=torch``).
CPU_IMPLS = ["chunked", "chunked-torchops", "torch"]


def require_native() -> None:
    """Skips the test without the native CPU kernels, or fails it where PROMPTKD_REQUIRE_NATIVE=1 (CI,
    which builds them)."""
    from promptkd.kd import native

    if native.library() is None:
        message = f"the native CPU kernels are unavailable: {native.unavailable_reason()}"
        if os.environ.get("PROMPTKD_REQUIRE_NATIVE") == "1":
            pytest.fail(message + " (PROMPTKD_REQUIRE_NATIVE=1)")
        pytest.skip(message)


@contextlib.contextmanager
def cpu_kernels(impl: str):
    """Runs the block with the elementwise backend an ``impl`` variant names; yields the plain impl name.

    ``chunked`` / ``torch`` use the native kernels (``require_native``). ``*-torchops`` use torch ops."""
    name, _, ops = impl.partition("-")
    backend = "torch" if ops == "torchops" else "native" if name in ("chunked", "torch") else None
    if backend == "native":
        require_native()
    old = os.environ.get("PROMPTKD_CPU_KERNELS")
    if backend is not None:
        os.environ["PROMPTKD_CPU_KERNELS"] = backend
    try:
        yield name
    finally:
        if backend is not None:
            if old is None:
                os.environ.pop("PROMPTKD_CPU_KERNELS", None)
            else:
                os.environ["PROMPTKD_CPU_KERNELS"] = old


def run(fn, tensors: dict, dtype, labels, grad_out_seed=2, frozen=(), **kwargs):
    """Loss and gradients of every tensor input but those named in ``frozen``, run in ``dtype``; upstream
    gradient != 1. An ``impl`` variant of ``CPU_IMPLS`` runs with its elementwise backend
    (``cpu_kernels``), forward and backward."""
    leaves = {k: v.detach().to(dtype).requires_grad_(k not in frozen) for k, v in tensors.items()}
    with cpu_kernels(kwargs.pop("impl", "auto")) as impl:
        loss = fn(**leaves, labels=labels, impl=impl, **kwargs)
        g = torch.Generator().manual_seed(grad_out_seed)
        grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)
        loss.backward(grad_out)
    out = {"loss": loss.detach().double()}
    out.update({k: v.grad.double() for k, v in leaves.items() if k not in frozen})
    return out


def err(x: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """max |x - ref|, divided by ``scale`` (default: max |ref|) when that is > 0."""
    if x.numel() == 0:
        return 0.0
    scale = ref.abs().max().item() if scale is None else scale
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close_to_truth(fused: dict, eager: dict, truth: dict, dtype, scales: dict | None = None):
    """The rule; errors normalised by max |truth|, or by ``scales`` (the size of the summed terms)."""
    for key, ref in truth.items():
        assert torch.isfinite(fused[key]).all(), f"{key}: non-finite values"
        scale = None if scales is None else scales[key]
        e_fused, e_eager = err(fused[key], ref, scale), err(eager[key], ref, scale)
        assert e_fused <= e_eager + TOL[dtype], f"{key}: fused error {e_fused:.3g} > eager {e_eager:.3g} + {TOL[dtype]}"


def linear_loss(**kw):
    return promptkd.fused_linear_kd_loss(kw.pop("student_hidden"), kw.pop("student_weight"),
                                         kw.pop("teacher_hidden"), kw.pop("teacher_weight"), **kw)


def logits_loss(**kw):
    return promptkd.kd_loss(kw.pop("student_logits"), kw.pop("teacher_logits"), **kw)


def exact_truth(tensors: dict, labels, grad_out_seed=2, digits=50, **kwargs) -> dict:
    """(values, scales): loss and gradients with the logit-level math in ``digits``-digit arithmetic.

    float64 cannot represent 1 - 1e-23, so near one-hot distributions make a float64 evaluation
    lose the argmax element's gradient entirely; this oracle keeps it. Logits come from float64
    GEMMs, logit gradients are rounded to float64 and projected with float64 GEMMs. The per-element
    terms are those of promptkd.kd.math (checked against autograd in the other tests). ``scales`` hold
    the size of the terms each value is formed from, the yardstick of float rounding error.
    """
    import mpmath

    from promptkd.kd.settings import KDSettings

    s = KDSettings(**kwargs)
    mpmath.mp.dps = digits
    hs, ws, ht, wt = (tensors[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"))
    zs = hs @ ws.T + (tensors["student_bias"] if "student_bias" in tensors else 0)
    zt = ht @ wt.T + (tensors["teacher_bias"] if "teacher_bias" in tensors else 0)
    n, v = zs.shape
    lw_p, lw_q = (mpmath.mpf(w) if w > -1e308 else None for w in s.mix_log_weights)
    counted = [True] * n if labels is None else [int(lab) != s.ignore_index for lab in labels]
    dzs, dzt = torch.zeros(n, v, dtype=torch.float64), torch.zeros(n, v, dtype=torch.float64)
    inv_t = 1 / mpmath.mpf(s.temperature)

    def logsumexp(values):
        top = max(values)
        return top + mpmath.log(sum(mpmath.exp(x - top) for x in values))

    def log_mix(lp, lq):
        terms = [x + w for x, w in ((lp, lw_p), (lq, lw_q)) if w is not None]
        hi = max(terms)
        return hi + mpmath.log(sum(mpmath.exp(x - hi) for x in terms))

    rows = []
    for i in range(n):
        a = [mpmath.mpf(float(z)) * inv_t for z in zs[i]]
        b = [mpmath.mpf(float(z)) * inv_t for z in zt[i]]
        lse_a, lse_b = logsumexp(a), logsumexp(b)
        f, gp, gq = [], [], []
        for av, bv in zip(a, b, strict=True):
            lq, lp = av - lse_a, bv - lse_b
            p, q = mpmath.exp(lp), mpmath.exp(lq)
            if s.divergence == "forward_kl":
                fv = p * (lp - lq)
                f.append(fv), gp.append(fv + p), gq.append(-p)
            elif s.divergence == "reverse_kl":
                fv = q * (lq - lp)
                f.append(fv), gp.append(-q), gq.append(fv + q)
            elif s.divergence == "jsd":
                lm = log_mix(lp, lq)
                gp.append(mpmath.exp(lp + lw_p) * (lp - lm)), gq.append(mpmath.exp(lq + lw_q) * (lq - lm))
                f.append(gp[-1] + gq[-1])
            elif s.divergence == "skew_forward_kl":
                lm = log_mix(lp, lq)
                pw = p * mpmath.exp(lq + lw_q - lm)
                f.append(p * (lp - lm)), gp.append(f[-1] + pw), gq.append(-pw)
            else:
                lm = log_mix(lp, lq)
                qw = q * mpmath.exp(lp + lw_p - lm)
                f.append(q * (lq - lm)), gp.append(-qw), gq.append(f[-1] + qw)
        cp, cq = sum(gp), sum(gq)
        da = [gqv - mpmath.exp(av - lse_a) * cq for gqv, av in zip(gq, a, strict=True)]
        db = [gpv - mpmath.exp(bv - lse_b) * cp for gpv, bv in zip(gp, b, strict=True)]
        # Magnitude of the terms each logit gradient is formed from (Gq and q * sum Gq cancel when
        # a distribution is one-hot beyond the float's precision).
        sa = [abs(gqv) + mpmath.exp(av - lse_a) * abs(cq) for gqv, av in zip(gq, a, strict=True)]
        sb = [abs(gpv) + mpmath.exp(bv - lse_b) * abs(cp) for gpv, bv in zip(gp, b, strict=True)]
        loss_i = s.soft_weight * sum(f)
        ds = [s.soft_weight * inv_t * x for x in da]
        ss = [s.soft_weight * inv_t * x for x in sa]
        if s.has_hard:
            raw = [mpmath.mpf(float(z)) for z in zs[i]]
            lse_c = logsumexp(raw)
            lab = int(labels[i]) if counted[i] else 0
            loss_i += s.hard_weight * (lse_c - raw[lab])
            soft = [mpmath.exp(x - lse_c) for x in raw]
            onehot = [1 if j == lab else 0 for j in range(v)]
            ds = [d + s.hard_weight * (sm - o) for d, sm, o in zip(ds, soft, onehot, strict=True)]
            ss = [t + s.hard_weight * (sm + o) for t, sm, o in zip(ss, soft, onehot, strict=True)]
        rows.append((loss_i if counted[i] else mpmath.mpf(0), ds, [s.soft_weight * inv_t * x for x in db], ss,
                     [s.soft_weight * inv_t * x for x in sb]))
    count = max(1, sum(counted))
    losses = [r[0] for r in rows]
    total = sum(losses)
    shape = (n,) if s.reduction == "none" else ()
    g = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    if s.reduction == "none":
        loss = torch.tensor([float(x) for x in losses], dtype=torch.float64)
        weights = [grad_out[i].item() for i in range(n)]
    else:
        loss = torch.tensor(float(total / count if s.reduction == "mean" else total), dtype=torch.float64)
        weights = [grad_out.item() / (count if s.reduction == "mean" else 1)] * n
    terms_s, terms_t = torch.zeros_like(dzs), torch.zeros_like(dzt)
    for i, (_, ds, db, ss, sb) in enumerate(rows):
        if counted[i]:
            dzs[i] = torch.tensor([float(x * weights[i]) for x in ds], dtype=torch.float64)
            dzt[i] = torch.tensor([float(x * weights[i]) for x in db], dtype=torch.float64)
            terms_s[i] = torch.tensor([float(x * abs(weights[i])) for x in ss], dtype=torch.float64)
            terms_t[i] = torch.tensor([float(x * abs(weights[i])) for x in sb], dtype=torch.float64)
    out = {"loss": loss, "student_hidden": dzs @ ws, "student_weight": dzs.T @ hs,
           "teacher_hidden": dzt @ wt, "teacher_weight": dzt.T @ ht}
    # Size of the terms each gradient is formed from: the scale of any float rounding error.
    scales = {"loss": loss.abs().max(), "student_hidden": (terms_s @ ws.abs()).max(),
              "student_weight": (terms_s.T @ hs.abs()).max(), "teacher_hidden": (terms_t @ wt.abs()).max(),
              "teacher_weight": (terms_t.T @ ht.abs()).max()}
    if "student_bias" in tensors:
        out["student_bias"], out["teacher_bias"] = dzs.sum(0), dzt.sum(0)
        scales["student_bias"], scales["teacher_bias"] = terms_s.sum(0).max(), terms_t.sum(0).max()
    return out, {k: float(v) for k, v in scales.items()}


# Work counters of the "gradients only where asked" tests.
MATMULS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear", "mv", "addmv", "dot"})


class CountOps(TorchDispatchMode):
    """Counts the aten ops that run while active (``with CountOps() as ops``): ``matmuls`` (MATMULS),
    ``dim0_sums`` (sums over dimension 0 of a 2-D tensor: a bias gradient), and every op by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.dim0_sums = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name == "sum" and len(args) > 1 and list(args[1]) == [0] and args[0].ndim == 2:
            self.dim0_sums += 1
        return func(*args, **(kwargs or {}))

    @property
    def matmuls(self) -> int:
        return sum(n for name, n in self.ops.items() if name in MATMULS)


class KernelLaunches:
    """Stands in for a ``@triton.jit`` kernel (monkeypatch it into the launcher's module): records each
    launch's grid, positional and keyword (constexpr) arguments, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch

"""The ways the pytest-benchmark suite (``bench/test_benchmarks.py``) measures, one table per group.

A group is one problem on one set of inputs; a way is one implementation of it, or its GEMM floor
(``gemm``: the logit-sized GEMMs any implementation needs, in bounded chunks, nothing else). Each
way is built by :func:`build` as a ``step`` callable (forward + backward, gradients dropped first),
so the suite times every way of a group on the same inputs, and :func:`peak` measures one way's peak
memory in this process (the suite runs it in a fresh one: ``python bench/suite.py GROUP WAY ...``).

Groups:
  kd_loss     forward KL from hidden states, gradients to the student's hidden states and weight:
              plain eager (and torch.compile'd), Liger-Kernel's chunked LigerFusedLinearJSDLoss (beta=0,
              compiled=False / True), TRL's chunked divergence (``trl``: ``trl.kernels.chunked_divergence``,
              beta=0, as its DistillationTrainer calls it), promptkd chunked (native / torch-ops elementwise),
              torch (recompute), triton (CUDA). Floor: 4 GEMMs.
  cross_entropy  the hard loss alone, 25% of the labels ignored, gradients to hidden and weight: eager,
              ``torch.nn.functional.linear_cross_entropy`` (its automatic options), promptkd's
              ``linear_cross_entropy`` (torch's op at promptkd's chunk). Floor: 3 GEMMs.
  prompt_pair PromptKD's prompt loss KL(p||q) + 0.5 KL(p||a), gradient to p's hidden states only: eager,
              two chunked ``fused_linear_kd_loss`` calls, ``fused_linear_kl_pair_loss``, and ``mixture``,
              the geometric-mixture identity (one elementwise pass on m = (q + l a) / (1 + l) plus the
              three log-partition sweeps the true value needs; implemented here only, to measure it).
              Floor: 4 GEMMs.
  sparse_kd   the student's loss on sparse teacher targets (top-k with the tail bucket for k = 8 and 64;
              12 sampled tokens, renormalised), gradients to the student's hidden states and weight:
              ``fused_linear_sparse_kd_loss`` (native / torch-ops row pass), the eager gather-based loss (full
              logits, log_softmax, gather: what users of top-k caches write), promptkd's ``linear_cross_entropy``
              (the floor of any loss that needs the student's full softmax) and torch's
              ``F.linear_cross_entropy``, and the online ``fused_linear_kd_loss`` (the teacher's logits
              computed too). Floor: 3 GEMMs. Ratios against linear_ce and eager top-k (k = 64).
  topk        teacher targets without gradients: ``fused_linear_topk`` (k = 8, 64; 12 samples) against the
              teacher's head GEMM alone (the floor) and eager ``torch.topk`` on full logits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd_loss import peak_extra_bytes  # noqa: E402

#: Problem sizes per group: ``default`` (the CPU figures of docs/benchmarks.md), ``quick`` (seconds; what CI runs),
#: ``cuda`` (the GPU check).
SIZES = {
    "kd_loss": {"default": dict(n=4096, d=512, v=32000), "quick": dict(n=256, d=64, v=2048),
                "cuda": dict(n=8192, d=4096, v=128256)},
    "cross_entropy": {"default": dict(n=2048, d=576, v=49152), "quick": dict(n=256, d=64, v=2048),
                      "cuda": dict(n=8192, d=4096, v=128256)},
    "prompt_pair": {"default": dict(n=2048, d=576, v=49152), "quick": dict(n=256, d=64, v=2048),
                    "cuda": dict(n=8192, d=4096, v=128256)},
    "sparse_kd": {"default": dict(n=4096, d=576, v=49152), "quick": dict(n=256, d=64, v=2048),
                  "cuda": dict(n=8192, d=4096, v=128256)},
    "topk": {"default": dict(n=4096, d=576, v=49152), "quick": dict(n=256, d=64, v=2048),
             "cuda": dict(n=8192, d=4096, v=128256)},
}
WAYS = {
    "kd_loss": ("gemm", "eager", "eager_compiled", "liger", "liger_compiled", "trl", "chunked", "chunked+torchops",
                "torch", "triton"),
    "cross_entropy": ("gemm", "eager", "torch_linear_ce", "promptkd"),
    "prompt_pair": ("gemm", "eager", "two_calls", "pair", "mixture"),
    "sparse_kd": ("gemm", "linear_ce", "torch_linear_ce", "eager_k64", "eager_s12", "online_kd", "sparse_k8",
                  "sparse_k64", "sparse_s12", "sparse_k64+torchops"),
    "topk": ("gemm", "eager_k64", "topk_k8", "topk_k64", "topk_s12", "topk_k64+torchops"),
}
#: The ratios' denominators: the floor, and the baselines a user would otherwise run.
FLOOR, EAGER, LIGER, TRL = "gemm", "eager", ("liger", "liger_compiled"), "trl"
#: Per group: ratio column -> the way (or ways: the fastest of them) it divides by; the memory ratio's way; the
#: CSV under bench/results/ its rows go to (the first three groups share suite.csv and its columns).
COLUMNS = {group: {"x_floor": FLOOR, "x_eager": EAGER, "x_best_liger": LIGER, "x_trl": TRL} for group in
           ("kd_loss", "cross_entropy", "prompt_pair")}
COLUMNS["sparse_kd"] = {"x_floor": FLOOR, "x_linear_ce": "linear_ce", "x_eager_topk": "eager_k64"}
COLUMNS["topk"] = {"x_floor": FLOOR, "x_eager_topk": "eager_k64"}
MEMORY = {group: EAGER for group in COLUMNS} | {"sparse_kd": "eager_k64", "topk": "eager_k64"}
RECORD = {group: "suite.csv" for group in COLUMNS} | {"sparse_kd": "sparse_kd.csv", "topk": "sparse_kd.csv"}
#: The way each way's loss and gradients are checked against (default: the group's EAGER way); None: a way whose
#: result is another problem's (checked in that problem's group).
REFERENCE = {("sparse_kd", "sparse_k8"): "eager_k8", ("sparse_kd", "sparse_k64"): "eager_k64",
             ("sparse_kd", "sparse_k64+torchops"): "eager_k64", ("sparse_kd", "eager_s12"): "eager_s12",
             ("sparse_kd", "sparse_s12"): "eager_s12", ("sparse_kd", "eager_k64"): "eager_k64",
             ("sparse_kd", "linear_ce"): None, ("sparse_kd", "torch_linear_ce"): None, ("sparse_kd", "online_kd"): None,
             ("topk", "topk_k64"): "eager_k64", ("topk", "topk_k64+torchops"): "eager_k64", ("topk", "topk_k8"): None,
             ("topk", "topk_s12"): None, ("topk", "eager_k64"): "eager_k64"}


def reference_way(group: str, way: str) -> str | None:
    return REFERENCE.get((group, way), EAGER)
PAIR_SCALE = 0.5  # the regulariser weight of the prompt_pair group
CHUNK_BYTES = 256 << 20  # the floor's [rows, V] blocks


class Unavailable(Exception):
    """A way that cannot run here (a missing package, no CUDA): the suite skips it with this reason."""


@dataclass
class Case:
    step: Callable[[], torch.Tensor]  # forward + backward; returns the loss (detached)
    result: Callable[[], dict]  # the loss and the gradients of the last step, for the agreement check
    drop: Callable[[], None] = lambda: None  # frees the gradients of the last step


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _randn(g, *shape, scale=1.0, dtype, device):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


def _inputs(group: str, n: int, d: int, v: int, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if group == "cross_entropy":
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.25] = -100
        return (_randn(g, n, d, dtype=dtype, device=device), _randn(g, v, d, scale=d ** -0.5, dtype=dtype,
                                                                     device=device), labels.to(device))
    sides = {"kd_loss": 2, "sparse_kd": 2, "topk": 1}.get(group, 3)  # (student, teacher) / (p, q, a) / teacher
    return tuple(t for _ in range(sides) for t in (_randn(g, n, d, dtype=dtype, device=device),
                                                   _randn(g, v, d, scale=2 * d ** -0.5, dtype=dtype, device=device)))


def _chunks(n: int, v: int, itemsize: int):
    step = max(1, min(n, CHUNK_BYTES // (v * itemsize)))
    return [slice(r, min(n, r + step)) for r in range(0, n, step)]


def _floor(group: str, tensors) -> Callable[[], None]:
    """The logit-sized GEMMs of the group, chunk by chunk: kd_loss S = Hs Ws^T, T = Ht Wt^T, dHs = dS Ws,
    dWs = dS^T Hs; cross_entropy and sparse_kd S, dH, dW; prompt_pair P, Q, A and dHp = dP Wp; topk T."""
    x, w = tensors[0], tensors[1]
    n, v = x.shape[0], w.shape[0]
    chunks = _chunks(n, v, 4)

    def run():
        for r in chunks:
            s = x[r] @ w.t()
            if group == "topk":
                continue
            if group == "kd_loss":
                _ = tensors[2][r] @ tensors[3].t()
            if group == "prompt_pair":
                _ = tensors[2][r] @ tensors[3].t()
                _ = tensors[4][r] @ tensors[5].t()
            _ = s @ w
            if group != "prompt_pair":
                _ = s.t() @ x[r]

    return run


def _eager_kd(hs, ws, ht, wt):
    """Forward KL as a user writes it in plain torch: full logits, log_softmax of both sides, autograd."""
    lq = torch.log_softmax((hs @ ws.t()).float(), dim=-1)
    lp = torch.log_softmax((ht @ wt.t()).float(), dim=-1)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean")


def _eager_pair(hp, wp, hq, wq, ha, wa):
    lp = torch.log_softmax((hp @ wp.t()).float(), dim=-1)
    lq = torch.log_softmax((hq @ wq.t()).float(), dim=-1)
    la = torch.log_softmax((ha @ wa.t()).float(), dim=-1)
    return (lp.exp() * ((lp - lq) + PAIR_SCALE * (lp - la))).sum(-1).mean()


class _Mixture(torch.autograd.Function):
    """KL(p||q) + l KL(p||a) with the gradient to p's hidden states only, through the geometric-mixture
    identity: d/dp of the pair = (1 + l) d/dp KL(p || m), m = softmax((q + l a) / (1 + l)) (logits), so one
    elementwise pass on (m, p) gives p's gradient; its loss is a surrogate, and the true value adds
    lse(q) + l lse(a) - (1 + l) lse(m) per row (three more sweeps)."""

    @staticmethod
    def forward(ctx, hp, wp, hq, wq, ha, wa, lam: float):
        from promptkd.kd.rows import kd_rows
        from promptkd.kd.settings import KDSettings

        n, v = hp.shape[0], wp.shape[0]
        settings = KDSettings(soft_weight=1.0 + lam, vocab_size=v)
        scale = torch.full((n,), 1.0 / n)
        grad, losses = torch.empty_like(hp), torch.empty(n)
        from promptkd.kd import torch_impl

        step = max(1, torch_impl.CHUNK_BYTES // (8 * v))  # four [rows, V] blocks: the pair's chunk
        for r in (slice(r0, min(n, r0 + step)) for r0 in range(0, n, step)):
            p, q, a = hp[r] @ wp.t(), hq[r] @ wq.t(), ha[r] @ wa.t()
            extra = torch.logsumexp(q, -1).add_(torch.logsumexp(a, -1), alpha=lam)
            m = q.add_(a, alpha=lam).div_(1.0 + lam)
            extra.sub_(torch.logsumexp(m, -1), alpha=1.0 + lam)
            loss, _, dp = kd_rows(m, p, None, scale[r], settings, False, True)
            losses[r] = loss + extra
            torch.mm(dp, wp, out=grad[r])
        ctx.save_for_backward(grad)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None, None, None


def _liger(compiled: bool):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel is not installed ({e}); pip install --no-deps liger-kernel") from e
    # Liger's generalized JSD: beta = 0 is forward KL(p || q); soft loss only.
    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=compiled)
    labels = {}  # it takes labels even without a hard loss: every token counts

    def loss(hs, ws, ht, wt):
        if "y" not in labels:
            labels["y"] = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
        return module(hs, ws, ht, wt, labels["y"])

    return loss


def _trl():
    """TRL's chunked divergence (``trl.kernels.chunked_divergence``, what its DistillationTrainer runs), forward KL
    (beta = 0), every token counted, the mean over tokens: the loss of the eager way."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError as e:
        raise Unavailable(f"TRL is not installed ({e}); pip install 'trl>=1.16'") from e
    mask = {}

    def loss(hs, ws, ht, wt):
        if "m" not in mask:
            mask["m"] = torch.ones(1, hs.shape[0], dtype=torch.long, device=hs.device)
        return _chunked_divergence_loss(hs[None], ht[None], ws, wt, mask["m"], 0.0)[0]

    return loss


def _promptkd_kd(impl: str):
    import promptkd

    impl, _, ops = impl.partition("+")
    if not ops:
        return lambda hs, ws, ht, wt: promptkd.fused_linear_kd_loss(hs, ws, ht, wt, impl=impl)

    def loss(hs, ws, ht, wt):  # the elementwise pass in torch ops (its gradients are computed in forward)
        old = os.environ.get("PROMPTKD_CPU_KERNELS")
        os.environ["PROMPTKD_CPU_KERNELS"] = "torch"
        try:
            return promptkd.fused_linear_kd_loss(hs, ws, ht, wt, impl=impl)
        finally:
            if old is None:
                del os.environ["PROMPTKD_CPU_KERNELS"]
            else:
                os.environ["PROMPTKD_CPU_KERNELS"] = old

    return loss


def loss_function(group: str, way: str, device: str) -> Callable:
    """The loss of ``way`` on the group's inputs (without the floor, which is not a loss)."""
    if way == "triton" and device != "cuda":
        raise Unavailable("impl='triton' is measured on CUDA (the suite's CPU run leaves it out)")
    if group == "kd_loss":
        if way.startswith("liger"):
            return _liger(way == "liger_compiled")
        if way == TRL:
            return _trl()
        if way.startswith("eager"):
            return torch.compile(_eager_kd) if way == "eager_compiled" else _eager_kd
        return _promptkd_kd(way)
    if group == "cross_entropy":
        if way == "eager":
            return lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y)
        if way == "torch_linear_ce":
            if not hasattr(F, "linear_cross_entropy"):
                raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
            return lambda h, w, y: F.linear_cross_entropy(h, w, y)
        from promptkd.hf.models import LMOutput, linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(LMOutput(h, w, None), y)
    import promptkd

    if way == "eager":
        return _eager_pair
    if way == "two_calls":
        return lambda hp, wp, hq, wq, ha, wa: (promptkd.fused_linear_kd_loss(hq, wq, hp, wp, impl="chunked")
                                               + PAIR_SCALE * promptkd.fused_linear_kd_loss(ha, wa, hp, wp,
                                                                                           impl="chunked"))
    if way == "pair":
        return lambda *t: promptkd.fused_linear_kl_pair_loss(*t, anchor_scale=PAIR_SCALE, impl="chunked")
    if device != "cpu":
        raise Unavailable("the mixture variant is measured on the CPU only")
    return lambda *t: _Mixture.apply(*t, PAIR_SCALE)


def _eager_sparse(hs, ws, ids, lp, tail: bool):
    """The loss on sparse targets as users of top-k caches write it: full logits, log_softmax, gather (the tail
    bucket's student mass as 1 - sum q_i)."""
    lq = torch.log_softmax((hs @ ws.t()).float(), dim=-1)
    valid = ids >= 0
    lq_k = lq.gather(-1, ids.clamp(min=0))
    p = torch.where(valid, lp.exp(), 0.0)
    if tail:
        terms = torch.where(valid, p * (lp - lq_k), 0.0).sum(-1)
        p_r = (1 - p.sum(-1)).clamp_min(0)
        q_r = (1 - torch.where(valid, lq_k.exp(), 0.0).sum(-1)).clamp_min(1e-30)
        return (terms + torch.where(p_r > 0, p_r * (p_r.clamp_min(1e-30).log() - q_r.log()), 0.0)).mean()
    p_hat = p / p.sum(-1, keepdim=True)
    return torch.where(valid, p_hat * (p_hat.clamp_min(1e-30).log() - lq_k), 0.0).sum(-1).mean()


_TARGETS: dict = {}


def _targets(way: str, ht, wt):
    """The teacher's targets a sparse way trains on (k8 / k64: top-k; s12: 12 samples), made once per inputs."""
    import promptkd

    spec = way.split("_")[-1].split("+")[0]
    key = (spec, ht.shape, wt.shape, ht.device.type)
    if key not in _TARGETS:
        k = int(spec[1:])
        samples = k if spec[0] == "s" else 0
        _TARGETS[key] = promptkd.fused_linear_topk(ht, wt, k, samples=samples, seed=0 if samples else None)
    return _TARGETS[key]


def _sparse_loss(way: str, tensors) -> Callable:
    """A sparse_kd way as a loss of the student's (hidden, weight)."""
    import promptkd
    from promptkd.hf.models import LMOutput, linear_cross_entropy

    ht, wt = tensors[2], tensors[3]
    n, v = ht.shape[0], wt.shape[0]
    if way in ("linear_ce", "torch_linear_ce"):
        labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1)).to(ht.device)
        if way == "linear_ce":
            return lambda h, w: linear_cross_entropy(LMOutput(h, w, None), labels)
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        return lambda h, w: F.linear_cross_entropy(h, w, labels)
    if way == "online_kd":
        return lambda h, w: promptkd.fused_linear_kd_loss(h, w, ht, wt)
    ids, lp = _targets(way, ht, wt)
    tail = "_s" not in way
    if way.startswith("eager"):
        return lambda h, w: _eager_sparse(h, w, ids, lp, tail)
    loss = lambda h, w: promptkd.fused_linear_sparse_kd_loss(h, w, ids, lp, tail=tail)  # noqa: E731
    return _with_row_backend("torch", loss) if way.endswith("+torchops") else loss


def _with_row_backend(backend: str, fn: Callable) -> Callable:
    """``fn`` run with ``PROMPTKD_CPU_KERNELS=backend``."""
    def run(*args):
        old = os.environ.get("PROMPTKD_CPU_KERNELS")
        os.environ["PROMPTKD_CPU_KERNELS"] = backend
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ["PROMPTKD_CPU_KERNELS"]
            else:
                os.environ["PROMPTKD_CPU_KERNELS"] = old

    return run


def _build_topk(way: str, tensors) -> Case:
    """A topk way: targets of the teacher's hidden states [n, d] and head [v, d], no gradient."""
    import promptkd

    h, w = tensors
    last = {}
    if way == "eager_k64":
        def fn():
            logits = (h @ w.t()).float()
            ids = logits.topk(64, dim=-1).indices
            return ids, torch.log_softmax(logits, dim=-1).gather(-1, ids)
    else:
        spec = way.split("_")[1].split("+")[0]
        k, samples = int(spec[1:]), (int(spec[1:]) if spec[0] == "s" else 0)
        fn = lambda: promptkd.fused_linear_topk(h, w, k, samples=samples, seed=0 if samples else None)  # noqa: E731
        if way.endswith("+torchops"):
            fn = _with_row_backend("torch", fn)

    def step():
        last["ids"], last["logprobs"] = fn()
        return last["logprobs"]

    return Case(step=step, result=lambda: {"logprobs": last["logprobs"].float()}, drop=last.clear)


def _trainable(group: str) -> tuple[int, ...]:
    """Which inputs get gradients: the student's hidden and weight; p's hidden states in prompt_pair."""
    return (0,) if group == "prompt_pair" else (0, 1)


def build(group: str, way: str, size: str = "default", device: str = "cpu") -> Case:
    """The ``way`` of ``group`` on fresh inputs of ``size``: raises :class:`Unavailable` where it cannot run."""
    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    dims = SIZES[group]["cuda" if device == "cuda" and size == "default" else size]
    dtype = dtype_for(device)
    tensors = _inputs(group, dims["n"], dims["d"], dims["v"], dtype, device)
    if way == FLOOR:
        run = _floor(group, tensors)
        return Case(step=lambda: run(), result=dict)
    if group == "topk":
        return _build_topk(way, tensors)
    if group == "sparse_kd":
        fn = _sparse_loss(way, tensors)
        tensors = tensors[:2]
    else:
        fn = loss_function(group, way, device)
    floats = tensors[:2] if group == "cross_entropy" else tensors
    leaves = [t.requires_grad_() if i in _trainable(group) else t for i, t in enumerate(floats)]
    args = (*leaves, tensors[2]) if group == "cross_entropy" else leaves
    last = {}

    def step():
        for t in leaves:
            t.grad = None
        loss = fn(*args)
        loss.backward()
        last["loss"] = loss.detach()
        return last["loss"]

    def result():
        return {"loss": last["loss"].float(), **{f"grad{i}": leaves[i].grad.float() for i in _trainable(group)}}

    def drop():
        for t in leaves:
            t.grad = None

    return Case(step=step, result=result, drop=drop)


#: The environment of the peak-memory process: glibc returns every block of 64 KB or more to the system
#: when it is freed (a fixed threshold, so not raised by earlier frees), so a call after a warm-up call
#: shows its whole peak in the RSS high-water mark instead of reusing what the warm-up left in the heap.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def peak(group: str, way: str, size: str, device: str) -> float:
    """Peak memory (MB) of one step of ``way`` beyond its inputs, gradients included, after a warm-up step
    (one-time loads and compilation are not the loss's) whose gradients are freed before the measured step
    starts. CPU: the RSS high-water mark, in a process with ``PEAK_ENV``; CUDA: max_memory_allocated. Run
    it in a fresh process."""
    case = build(group, way, size, device)
    if device == "cpu":
        case.step()  # (peak_extra_bytes warms up on CUDA itself, then calls drop)
        case.drop()
    return peak_extra_bytes(case.step, device, after_warmup=case.drop) / 2**20


def main():
    ap = argparse.ArgumentParser(description="Peak memory of one way, in this fresh process (used by the suite).")
    ap.add_argument("group", choices=sorted(WAYS))
    ap.add_argument("way")
    ap.add_argument("--size", default="default", choices=["default", "quick"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    try:
        print(json.dumps({"peak_extra_mb": peak(args.group, args.way, args.size, args.device)}))
    except Unavailable as e:
        print(json.dumps({"unavailable": str(e)}))


if __name__ == "__main__":
    main()

"""Benchmark: the trainer's cross-entropy from hidden states (the sft method's loss), four ways.

- ``promptkd``: :func:`promptkd.hf.models.linear_cross_entropy`: in float32 with torch >= 2.13,
  ``torch.nn.functional.linear_cross_entropy`` with promptkd's chunk size (64 MB of logits), which
  computes the gradients in forward.
- ``recompute``: :func:`promptkd.hf.models.recompute_cross_entropy`, chunks of rows whose logits are
  recomputed in backward (activation checkpointing): promptkd's path before, and its fallback.
- ``torch_auto``: ``torch.nn.functional.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, its
  automatic chunk size and precision policy.
- ``eager``: ``cross_entropy(hidden @ weight.T, labels)``, the full logits.
- ``gemm``: the three logit-sized GEMMs any of them needs (logits, dH, dW), in chunks: the floor.

Every way runs in one invocation on the same inputs (float32, a quarter of the labels ignored): the
median of repeated forward+backward passes (gradients to the hidden states and the weight, as when
training a student with a tied head), the peak memory of one pass beyond the inputs in a fresh
process (RSS high-water mark, after one call on 8 rows has loaded what a first call loads), and the
error of loss and gradients against a float64 evaluation.

    python bench/bench_cross_entropy.py            # N=2048, D=576, V=49152 (SmolLM2-135M's head)
    python bench/bench_cross_entropy.py --quick

Rows are appended to bench/results/cross_entropy.csv (device, commit, versions, timestamp).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd_loss import RESULTS, append_rows, peak_extra_bytes, timed, versions  # noqa: E402

WAYS = ("promptkd", "recompute", "torch_auto", "eager", "gemm")


def make_inputs(n, d, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    return hidden, weight, labels


def loss_fn(way: str):
    if way in ("promptkd", "recompute"):
        from promptkd.hf.models import LMOutput, linear_cross_entropy, recompute_cross_entropy

        fn = linear_cross_entropy if way == "promptkd" else recompute_cross_entropy
        return lambda h, w, y: fn(LMOutput(h, w), y)
    if way == "torch_auto":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=options)
    return lambda h, w, y: F.cross_entropy(h @ w.T, y, ignore_index=-100)


def errors(way: str, n, d, v) -> dict:
    """Max abs error of the loss and relative max error of both gradients against float64."""
    out = {}
    results = []
    for dtype in (torch.float32, torch.float64):
        h, w, y = make_inputs(n, d, v, dtype)
        fn = loss_fn(way if dtype == torch.float32 else "eager")
        loss = fn(h, w, y)
        loss.backward()
        results.append((loss.detach().double(), h.grad.double(), w.grad.double()))
    (l32, h32, w32), (l64, h64, w64) = results
    out["loss_err"] = float((l32 - l64).abs())
    out["grad_hidden_rel_err"] = float((h32 - h64).abs().max() / h64.abs().max())
    out["grad_weight_rel_err"] = float((w32 - w64).abs().max() / w64.abs().max())
    return out


def gemm_floor(n, d, v, reps) -> float:
    """Median time of the logit GEMM and the two gradient GEMMs, in chunks of 512 rows."""
    h, w, _ = make_inputs(n, d, v, torch.float32)
    h, w = h.detach(), w.detach()

    def run():
        for r in range(0, n, 512):
            s = h[r:r + 512] @ w.T
            _ = s @ w
            _ = s.T @ h[r:r + 512]

    run()
    return statistics.median(timed(run, reps, "cpu"))


def measure(way, n, d, v, reps) -> dict:
    if way == "gemm":
        return dict(way=way, median_s=gemm_floor(n, d, v, reps))
    h, w, y = make_inputs(n, d, v, torch.float32)
    fn = loss_fn(way)

    def step():
        h.grad = w.grad = None
        fn(h, w, y).backward()

    fn(h[:8].detach().requires_grad_(), w, y[:8]).backward()  # load what a first call loads, on 8 rows
    peak = peak_extra_bytes(step, "cpu")
    times = timed(step, reps, "cpu")
    return dict(way=way, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                peak_extra_mb=peak / 2**20, **errors(way, min(n, 256), d, v))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--no-record", action="store_true", help="do not append to bench/results/cross_entropy.csv")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    n = args.n or (256 if args.quick else 2048)
    d = args.d or (64 if args.quick else 576)
    v = args.v or (4096 if args.quick else 49152)
    reps = args.reps or (3 if args.quick else 7)
    if args.child:
        print(json.dumps(measure(args.child, n, d, v, reps)))
        return
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(device=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                timestamp=stamp, **versions())
    for way in WAYS:  # one fresh process each: its peak memory is its own
        out = subprocess.run([sys.executable, __file__, "--child", way, "--n", str(n), "--d", str(d), "--v", str(v),
                              "--reps", str(reps)], capture_output=True, text=True, check=True)
        rows.append(dict(n=n, d=d, v=v, **json.loads(out.stdout.strip().splitlines()[-1]), **meta))
    base = next(r["median_s"] for r in rows if r["way"] == "eager")
    print(f"N={n} D={d} V={v} float32, {meta['threads']} threads, median of {reps}")
    floor = next(r["median_s"] for r in rows if r["way"] == "gemm")
    print(f"{'way':>11} {'median ms':>10} {'vs eager':>9} {'vs floor':>9} {'peak MB':>9} {'loss err':>9} "
          f"{'dH rel':>9} {'dW rel':>9}")
    for r in rows:
        cells = [f"{'':9}" if k not in r else f"{r[k]:9.1f}" if k == "peak_extra_mb" else f"{r[k]:9.1e}"
                 for k in ("peak_extra_mb", "loss_err", "grad_hidden_rel_err", "grad_weight_rel_err")]
        print(f"{r['way']:>11} {r['median_s'] * 1e3:10.1f} {r['median_s'] / base:9.2f} {r['median_s'] / floor:9.2f} "
              + " ".join(cells))
    if not args.no_record:
        append_rows(RESULTS / "cross_entropy.csv", rows)


if __name__ == "__main__":
    main()

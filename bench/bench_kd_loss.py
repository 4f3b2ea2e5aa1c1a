"""Benchmark: fused KD loss forward+backward against eager full-logits torch (and Liger on GPU).

Every implementation runs in one invocation on the same inputs. Time is the median of repeated
forward+backward passes; memory is the peak of one pass beyond the inputs, in a fresh process per
measurement (CPU: the RSS high-water mark, reset once the inputs were made, over the RSS then; CUDA:
max_memory_allocated over the inputs, after a warm-up pass). Gradients (here: student hidden and
weight, as in training a student) are part of that peak and are also reported separately. Also
reported: the time of the GEMMs the loss needs (logits for both sides, then the student's two
gradient GEMMs), measured on the same device, as a floor.

    python bench/bench_kd_loss.py                 # CPU: N=4096, D=512, V=32000, forward_kl
    python bench/bench_kd_loss.py --impls eager,eager_compiled,chunked,torch,liger,liger_compiled
    python bench/bench_kd_loss.py --quick         # small, a few seconds
    python bench/bench_kd_loss.py --device cuda   # N=8192, D=4096, V=128256, bf16, + Liger if installed

Rows are appended to bench/results/kd_loss.csv (device, commit, versions, timestamp).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)
    return (rnd(n, d).requires_grad_(), rnd(v, d, scale=d ** -0.5).requires_grad_(),
            rnd(n, d), rnd(v, d, scale=d ** -0.5))


def eager_kd(hs, ws, ht, wt, divergence):
    """The loss as a user writes it in plain torch: full logits, log_softmax of both sides, KL, autograd."""
    lq = torch.log_softmax((hs @ ws.t()).float(), dim=-1)
    lp = torch.log_softmax((ht @ wt.t()).float(), dim=-1)
    if divergence == "reverse_kl":
        lp, lq = lq, lp
    return torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="batchmean")


def loss_fn(impl: str, divergence: str):
    """impl: reference (promptkd's oracle), eager / eager_compiled (plain torch, torch.compile'd),
    liger / liger_compiled (Liger-Kernel's chunked LigerFusedLinearJSDLoss), or a promptkd impl with an
    optional ``+torchops`` (PROMPTKD_CPU_KERNELS=torch: the elementwise pass in torch ops)."""
    if impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        # Liger's generalized JSD: beta = 0 is forward KL(p||q), beta = 1 reverse KL; soft loss only.
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0}[divergence]
        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                         compiled=impl == "liger_compiled")
        return lambda hs, ws, ht, wt, labels: module(hs, ws, ht, wt, labels)
    if impl.startswith("eager"):
        fn = torch.compile(eager_kd) if impl == "eager_compiled" else eager_kd
        return lambda hs, ws, ht, wt, labels: fn(hs, ws, ht, wt, divergence)
    import promptkd
    impl, _, ops = impl.partition("+")
    if ops:
        os.environ["PROMPTKD_CPU_KERNELS"] = "torch"
    return lambda hs, ws, ht, wt, labels: promptkd.fused_linear_kd_loss(
        hs, ws, ht, wt, labels, divergence=divergence, impl=impl)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_cannot_reset = False  # warned once


def reset_peak_rss() -> bool:
    """Resets this process's RSS high-water mark (Linux >= 4.0); warns on stderr, once, where it cannot."""
    global _cannot_reset
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        if not _cannot_reset:
            print("cannot reset the peak RSS (/proc/self/clear_refs): building the inputs may dominate it",
                  file=sys.stderr)
            _cannot_reset = True
        return False


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark, VmHWM: the mark reset_peak_rss resets. (getrusage's ru_maxrss
    is not that: Linux raises it at exec to the parent's peak, which the reset leaves in place.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_extra_bytes(step, device, after_warmup=None) -> int:
    """Peak memory of one call of ``step`` beyond the memory held before it, the peak mark reset first.

    CUDA: a warm-up call first (compilation, autotuning, the allocator's caches: then the allocator reports
    the peak exactly), then ``after_warmup`` if given (e.g. dropping gradients, so that they count in the
    peak); max_memory_allocated over memory_allocated. CPU: no warm-up, the measured call is the first;
    the RSS high-water mark over the RSS."""
    if device == "cuda":
        step()
        if after_warmup is not None:
            after_warmup()
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    base = rss_bytes()
    reset_peak_rss()
    step()
    return peak_rss_bytes() - base


def measure(impl, divergence, n, d, v, dtype, device, reps) -> dict:
    """One implementation: peak extra memory of one pass, then the median time of `reps` passes."""
    hs, ws, ht, wt = make_inputs(n, d, v, dtype, device)
    labels = torch.randint(0, v, (n,), device=device)
    fn = loss_fn(impl, divergence)
    grad_bytes = (hs.numel() + ws.numel()) * hs.element_size()

    def drop_grads():
        hs.grad = ws.grad = None

    def step():
        drop_grads()
        fn(hs, ws, ht, wt, labels).backward()

    peak = peak_extra_bytes(step, device, after_warmup=drop_grads)  # the gradients count in the peak
    times = timed(step, reps, device)
    return dict(impl=impl, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                peak_extra_mb=peak / 2**20, grads_mb=grad_bytes / 2**20)


def timed(fn, reps, device) -> list[float]:
    """Wall times of ``reps`` calls, the device synchronised around each."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def gemm_floor(n, d, v, dtype, device, reps) -> float:
    """Median time of the GEMMs the loss needs: two logit GEMMs, then dH = dS W and dW = dS^T H."""
    hs, ws, ht, wt = (t.detach() for t in make_inputs(n, d, v, dtype, device))
    chunk = max(1, min(n, (256 << 20) // (v * hs.element_size())))  # bounded [chunk, V] blocks
    def run():
        for r0 in range(0, n, chunk):
            s = hs[r0:r0 + chunk] @ ws.t()
            t = ht[r0:r0 + chunk] @ wt.t()
            _ = s @ ws
            _ = t.t() @ hs[r0:r0 + chunk]
    run()
    return statistics.median(timed(run, reps, device))


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append result rows to a CSV under bench/results (header written when the file is new). Rows with a
    column the file lacks rewrite it with the union of the columns (earlier rows empty there), atomically."""
    path.parent.mkdir(exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    old_fields, old_rows = [], []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields, old_rows = list(reader.fieldnames or []), list(reader)
    if not path.exists() or not set(fields) <= set(old_fields):
        union = old_fields + [key for key in fields if key not in old_fields]
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=union, restval="")
            writer.writeheader()
            writer.writerows(old_rows + rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=old_fields, restval="").writerows(rows)
    print(f"\nappended {len(rows)} rows to {path}")


def child(args):
    """Runs one measurement in this (fresh) process and prints it as JSON."""
    dtype = getattr(torch, args.dtype)
    if args.impl == "gemm":
        out = dict(impl="gemm", median_s=gemm_floor(args.n, args.d, args.v, dtype, args.device, args.reps))
    else:
        out = measure(args.impl, args.divergence, args.n, args.d, args.v, dtype, args.device, args.reps)
    print(json.dumps(out))


def versions() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=RESULTS.parent.parent,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    dirty = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")  # the results are not code
    return dict(commit=git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
                torch=torch.__version__, triton=triton_version)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--dtype")
    p.add_argument("--divergences", default=None, help="comma-separated (default: forward_kl; cuda: +reverse_kl)")
    p.add_argument("--impls", default=None,
                   help="comma-separated: eager, eager_compiled, reference, chunked, torch, triton, liger, "
                        "liger_compiled; a promptkd impl with '+torchops' runs its elementwise pass in torch ops "
                        "(default: cpu eager,chunked,torch; cuda eager,torch,triton,liger)")
    p.add_argument("--reps", type=int)
    p.add_argument("--no-record", action="store_true", help="do not append to bench/results/kd_loss.csv")
    p.add_argument("--out", type=Path, default=RESULTS / "kd_loss.csv", help="the CSV rows are appended to")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--divergence", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    gpu = args.device == "cuda"
    n = args.n or (256 if args.quick else 8192 if gpu else 4096)
    d = args.d or (128 if args.quick else 4096 if gpu else 512)
    v = args.v or (4000 if args.quick else 128256 if gpu else 32000)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    reps = args.reps or (3 if args.quick else 10 if gpu else 5)
    divergences = (args.divergences or ("forward_kl,reverse_kl" if gpu else "forward_kl")).split(",")
    impls = (args.impls or ("eager,torch,triton,liger" if gpu else "eager,chunked,torch")).split(",")
    if any(i.startswith("liger") for i in impls):
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            print("liger-kernel is not installed: skipping that baseline", file=sys.stderr)
            impls = [i for i in impls if not i.startswith("liger")]
    info = versions()
    device_name = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} " \
                                                            f"x{torch.get_num_threads()} threads"
    print(f"device: {device_name} | commit {info['commit']} | torch {info['torch']} | triton {info['triton']}")
    print(f"N={n} D={d} V={v} {dtype}, forward+backward with student hidden and weight gradients, "
          f"median of {reps}")

    def run_child(impl, divergence):
        cmd = [sys.executable, __file__, "--child", "--impl", impl, "--divergence", divergence, "--device",
               args.device, "--n", str(n), "--d", str(d), "--v", str(v), "--dtype", dtype, "--reps", str(reps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{impl} failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    floor = run_child("gemm", "forward_kl")["median_s"]
    rows = []
    for divergence in divergences:
        results = {impl: run_child(impl, divergence) for impl in impls}
        eager = results.get("eager") or results.get("reference")  # the plain loss a user writes, else the oracle
        print(f"\n{divergence}: GEMM floor {floor * 1e3:.1f} ms")
        print(f"{'impl':10s} {'median ms':>10s} {'x eager':>8s} {'x GEMMs':>8s} {'peak MB':>9s} {'x eager':>8s} "
              f"{'beyond grads MB':>16s}")
        for impl, r in results.items():
            t_ratio = r["median_s"] / eager["median_s"] if eager else float("nan")
            m_ratio = r["peak_extra_mb"] / eager["peak_extra_mb"] if eager else float("nan")
            print(f"{impl:10s} {r['median_s'] * 1e3:10.1f} {t_ratio:8.2f} {r['median_s'] / floor:8.2f} "
                  f"{r['peak_extra_mb']:9.1f} {m_ratio:8.3f} {r['peak_extra_mb'] - r['grads_mb']:16.1f}")
            rows.append(dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             device=device_name, **info, divergence=divergence, n=n, d=d, v=v, dtype=dtype,
                             reps=reps, gemm_floor_s=floor, time_vs_eager=t_ratio, memory_vs_eager=m_ratio,
                             **r))
    if not args.no_record:
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()

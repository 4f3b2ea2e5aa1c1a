"""Benchmark: prefix-shared attention and the prompted teacher against the concatenated path.

Three measurements, every implementation on the same inputs in one invocation:

* ``teacher``: PromptedTeacher forward+backward (loss on the logits at the input positions, gradient to
  the soft prompt) against PEFT prompt tuning (the prompt concatenated to every sample), on a small
  Llama-style model with right-padded batches. CPU default: P=7, B=16, N=256 (the paper's setting).
* ``shared``: a shared instruction prefix, G groups of 8 samples, P=256, N=256, through the same model:
  the prefix computed once per group and shared (prefix_attention) against every sample carrying it.
* ``kernel`` (CUDA): prefix_attention forward+backward against SDPA's flash backend on the same total
  keys (the prefix expanded per sample; bottom-right causal), timed without and with that expansion,
  and against FlexAttention with a prefix mask. bf16, H=32, D=128.

Time is the median of repeated passes. Memory is the peak of one pass in a fresh process: on the CPU
the RSS high-water mark, reset once model and inputs exist, over the RSS then; on CUDA max_memory_allocated
over the memory allocated after a warm-up pass.

    python bench/bench_prefix_attention.py                # CPU: teacher + shared
    python bench/bench_prefix_attention.py --quick        # small, seconds
    python bench/bench_prefix_attention.py --device cuda  # + kernel, bf16

Rows are appended to bench/results/prefix_attention.csv (device, commit, versions, timestamp).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd_loss import append_rows, peak_extra_bytes, timed, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048)
QUICK_MODEL = dict(MODEL, num_hidden_layers=2, hidden_size=128, intermediate_size=344, vocab_size=1024)


def build_model(spec: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**spec)).to(device=device, dtype=dtype).eval().requires_grad_(False)


def padded_batch(b, n, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    lengths = torch.randint(n // 2, n + 1, (b,), generator=g)
    lengths[0] = n
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    return ids.to(device), mask.to(device)


def teacher_step(impl, spec, p, b, n, dtype, device):
    """A closure running one forward+backward of the prompted teacher, and the soft prompt."""
    model = build_model(spec, dtype, device)
    ids, mask = padded_batch(b, n, spec["vocab_size"], device)
    real = mask.bool()
    init = torch.randn(p, spec["hidden_size"], generator=torch.Generator().manual_seed(1)) * 0.02
    if impl == "peft":
        import peft

        config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=p)
        twin = peft.get_peft_model(model, config).eval()
        prompt = twin.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            prompt.copy_(init)

        def logits():
            return twin(input_ids=ids, attention_mask=mask).logits[:, p:]
    else:
        from promptkd import PromptedTeacher

        teacher = PromptedTeacher(model, p, init_embeddings=init)
        prompt = teacher.soft_prompt

        def logits():
            return teacher(ids, mask, return_logits=True).logits

    def step():
        prompt.grad = None
        logits()[real].float().logsumexp(-1).mean().backward()
    return step


def shared_step(impl, spec, groups, per_group, p, n, dtype, device):
    """One forward+backward through the model of G groups x per_group samples sharing a P-token prefix.

    ``concat``: every sample is prefix + own tokens; ``shared``: the prefix runs once per group at batch G
    and every sample attends to it through prefix_attention. Loss on the hidden states of the own tokens;
    gradients reach the prefix embeddings (as for a soft prompt or a tuned instruction)."""
    from promptkd.hf.attention import PrefixKV, PrefixRecorder, register

    model = build_model(spec, dtype, device)
    base = model.base_model
    g = torch.Generator().manual_seed(2)
    prefix = (torch.randn(groups, p, spec["hidden_size"], generator=g) * 0.02).to(device, dtype).requires_grad_()
    own = model.get_input_embeddings()(torch.randint(3, spec["vocab_size"], (groups * per_group, n), generator=g)
                                       .to(device))
    group = torch.arange(groups * per_group, device=device) // per_group
    positions = torch.arange(p + n, device=device)[None]
    if impl == "shared":
        model.set_attn_implementation(register())

    def step():
        prefix.grad = None
        if impl == "concat":
            embeds = torch.cat([prefix[group], own], dim=1)
            hidden = base(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state[:, p:]
        else:
            recorder = PrefixRecorder()
            base(inputs_embeds=prefix, position_ids=positions[:, :p], use_cache=False, promptkd_prefix=recorder)
            kv = recorder.freeze(spec["num_hidden_layers"])
            kv = PrefixKV(kv.keys, kv.values, group_index=group)
            hidden = base(inputs_embeds=own, position_ids=positions[:, p:], use_cache=False,
                          promptkd_prefix=kv).last_hidden_state
        hidden.float().square().mean().backward()
    return step


def kernel_step(impl, b, h, p, n, d, dtype, device):
    """prefix_attention against SDPA (flash) on expanded keys and FlexAttention with a prefix mask."""
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(3)
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    q, k, v, pk, pv = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d), rnd(1, h, p, d), rnd(1, h, p, d)
    leaves = [q, k, v, pk, pv]
    if impl == "triton":
        from promptkd import prefix_attention

        def out():
            return prefix_attention(q, k, v, pk, pv, impl="triton")
    elif impl in ("sdpa_flash", "sdpa_flash+expand"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(n, p + n)
        if impl == "sdpa_flash":  # the expanded keys exist already: only attention is timed
            kk = torch.cat([pk.expand(b, -1, -1, -1), k], 2).detach().requires_grad_()
            vv = torch.cat([pv.expand(b, -1, -1, -1), v], 2).detach().requires_grad_()
            leaves = [q, kk, vv]

        def out():
            keys = kk if impl == "sdpa_flash" else torch.cat([pk.expand(b, -1, -1, -1), k], 2)
            values = vv if impl == "sdpa_flash" else torch.cat([pv.expand(b, -1, -1, -1), v], 2)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
    elif impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def prefix_causal(b_, h_, q_idx, kv_idx):
            return (kv_idx < p) | (kv_idx - p <= q_idx)
        block_mask = create_block_mask(prefix_causal, None, None, n, p + n, device=device)
        flex = torch.compile(flex_attention)

        def out():
            keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
            values = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
            return flex(q, keys, values, block_mask=block_mask)
    else:
        raise KeyError(impl)
    grad = torch.randn(b, h, n, d, generator=g).to(device, dtype)

    def step():
        for x in leaves:
            x.grad = None
        out().backward(grad)
    return step


def child(args):
    dtype = getattr(torch, args.dtype)
    spec = QUICK_MODEL if args.quick else MODEL
    if args.case == "teacher":
        step = teacher_step(args.impl, spec, args.p, args.b, args.n, dtype, args.device)
    elif args.case == "shared":
        step = shared_step(args.impl, spec, args.groups, args.per_group, args.p, args.n, dtype, args.device)
    else:
        step = kernel_step(args.impl, args.b, args.heads, args.p, args.n, args.head_dim, dtype, args.device)
    peak = peak_extra_bytes(step, args.device)
    if args.device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(step, warmup=100, rep=1000, return_mode="all")
        times = [t / 1e3 for t in ms]
    else:
        times = timed(step, args.reps, args.device)
    print(json.dumps(dict(impl=args.impl, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                          peak_extra_mb=peak / 2**20)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small shapes and model, seconds")
    ap.add_argument("--cases", default=None, help="comma-separated: teacher, shared, kernel (cuda)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results/prefix_attention.csv")
    ap.add_argument("--out", type=Path, default=RESULTS / "prefix_attention.csv", help="the CSV rows are appended to")
    ap.add_argument("--kernel-shapes", default="7:2048,256:256,1024:1024,2048:2048",
                    help="the kernel case's prefix:sequence lengths, comma-separated")
    for name in ("child", "impl", "case", "dtype", "p", "b", "n", "groups", "per_group", "heads", "head_dim"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS, **({"action": "store_true"} if name == "child" else {}))
    args = ap.parse_args()
    if args.child:
        for name in ("p", "b", "n", "groups", "per_group", "heads", "head_dim", "reps"):
            if getattr(args, name) is not None:
                setattr(args, name, int(getattr(args, name)))
        return child(args)

    gpu = args.device == "cuda"
    cases = (args.cases or ("teacher,shared,kernel" if gpu else "teacher,shared")).split(",")
    reps = args.reps or (2 if args.quick else 3)
    dtype = "bfloat16" if gpu else "float32"
    info = versions()
    device_name = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} " \
                                                            f"x{torch.get_num_threads()} threads"
    print(f"device: {device_name} | commit {info['commit']} | torch {info['torch']} | triton {info['triton']}")
    q = args.quick
    plan = []  # (case, shape dict, impls, baseline)
    if "teacher" in cases:
        shape = dict(p=7, b=4 if q else 16, n=64 if q else 256)
        plan.append(("teacher", shape, ["peft", "promptkd"], "peft"))
    if "shared" in cases:
        shape = dict(groups=2 if q else (8 if gpu else 2), per_group=8, p=64 if q else 256, n=64 if q else 256)
        plan.append(("shared", shape, ["concat", "shared"], "concat"))
    if "kernel" in cases:
        if not gpu:
            raise SystemExit("the kernel case needs --device cuda")
        for p, n in (map(int, pn.split(":")) for pn in args.kernel_shapes.split(",")):
            shape = dict(b=max(1, 16384 // n), heads=32, head_dim=128, p=p, n=n)
            plan.append(("kernel", shape, ["sdpa_flash", "sdpa_flash+expand", "flex", "triton"], "sdpa_flash"))

    rows = []
    for case, shape, impls, baseline in plan:
        results = {}
        for impl in impls:
            cmd = [sys.executable, __file__, "--child", "--case", case, "--impl", impl, "--device", args.device,
                   "--dtype", dtype, "--reps", str(reps), *(["--quick"] if q else [])]
            for key, value in shape.items():
                cmd += [f"--{key}", str(value)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{case}/{impl} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results.get(baseline)
        print(f"\n{case}: {' '.join(f'{k}={v}' for k, v in shape.items())} {dtype}, median of {reps}")
        print(f"{'impl':18s} {'median ms':>10s} {'x ' + baseline:>12s} {'peak MB':>9s} {'x ' + baseline:>12s}")
        for impl, r in results.items():
            t_ratio = r["median_s"] / base["median_s"] if base else float("nan")
            m_ratio = r["peak_extra_mb"] / base["peak_extra_mb"] if base and base["peak_extra_mb"] > 0 else float("nan")
            print(f"{impl:18s} {r['median_s'] * 1e3:10.1f} {t_ratio:12.2f} {r['peak_extra_mb']:9.1f} {m_ratio:12.3f}")
            rows.append(dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             device=device_name, **info, case=case, shape=json.dumps(shape), dtype=dtype, reps=reps,
                             baseline=baseline, time_vs_baseline=t_ratio, memory_vs_baseline=m_ratio, **r))
    if rows and not args.no_record:
        append_rows(args.out, rows)


if __name__ == "__main__":
    main()

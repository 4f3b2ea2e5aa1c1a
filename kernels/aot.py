"""Ahead-of-time compilation of every kernel configuration for NVIDIA targets, without a GPU.

The interpreter runs kernels on the CPU but cannot see compile errors, shared-memory overflow or
register spills. This compiles each kernel the launchers can pick (kernels/configs.py: KD and prefix attention;
kernels/kd_rows.py and kernels/sparse_rows.py: the chunked losses' row kernels) with ``triton.compile`` for a
``GPUTarget`` and reads the resource use off the cubin.

    python -m promptkd.kernels.aot            # table of shared memory, registers, spills
    python -m promptkd.kernels.aot --case 3   # one case, as JSON
    python -m promptkd.kernels.aot --cases 3,4,5   # JSON lines (what tests/test_compile.py runs, in batches)

It must run without TRITON_INTERPRET=1 (under the interpreter, kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget

from . import configs
from .kd_backward import kd_backward_kernel
from .kd_forward import kd_online_kernel, kd_terms_kernel
from .kd_rows import CONFIGS as ROWS_CONFIGS
from .kd_rows import kd_rows_kernel
from .prefix_attention_backward import (
    prefix_attention_dkdv_kernel,
    prefix_attention_dq_kernel,
    prefix_attention_prefix_dkdv_kernel,
)
from .prefix_attention_forward import prefix_attention_forward_kernel
from .sparse_rows import sparse_rows_kernel

#: Opt-in shared memory per block, bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}
# Kernel arguments: the pointers (by name) hold the operand dtype unless _POINTER_TYPES says otherwise,
# _FLOAT_ARGS are float32 scalars, every other argument (sizes, strides) is an i32.
_POINTERS = {
    "kd_online_kernel": ("XS", "WS", "BS", "XT", "WT", "BT", "LABELS", "STATS"),
    "kd_terms_kernel": ("XS", "WS", "BS", "XT", "WT", "BT", "ROWS", "PARTIAL"),
    "kd_backward_kernel": ("XS", "WS", "BS", "XT", "WT", "BT", "LABELS", "ROWS", "DZS", "DZT"),
    "kd_rows_kernel": ("S", "T", "LABELS", "SCALE", "LOSS"),
    "sparse_rows_kernel": ("S", "IDS", "LP", "LABELS", "SCALE", "LOSS"),
    "prefix_attention_forward_kernel": ("Q", "K", "V", "PK", "PV", "LENGTHS", "GROUP", "KEEP", "OUT", "LSE"),
    "prefix_attention_dq_kernel": ("Q", "K", "V", "PK", "PV", "LENGTHS", "GROUP", "KEEP", "OUT", "DO", "LSE",
                                    "DELTA", "DQ"),
    "prefix_attention_dkdv_kernel": ("Q", "K", "V", "KEEP", "DO", "LSE", "DELTA", "DK", "DV"),
    "prefix_attention_prefix_dkdv_kernel": ("Q", "PK", "PV", "LENGTHS", "ORDER", "OFFSETS", "DO", "LSE", "DELTA",
                                             "DPK", "DPV"),
}
_POINTER_TYPES = {
    **dict.fromkeys(("LABELS", "LENGTHS", "GROUP", "ORDER", "OFFSETS", "IDS"), "*i64"),
    **dict.fromkeys(("STATS", "LSE", "PARTIAL", "ROWS", "DELTA", "DPK", "DPV"), "*fp32"),  # float32 statistics
    "KEEP": "*u8",  # the key-padding mask, bool viewed as uint8
}
_FLOAT_ARGS = ("inv_t", "lw_p", "lw_q", "soft_weight", "hard_weight", "qk_scale", "scale", "s_scale", "s_cap",
               "t_scale", "t_cap", "cap_scale", "cap_l2")
# The KD launchers turn fused multiply-adds off (promptkd/kd/triton_impl._compile_switches); the attention
# launchers turn them on (promptkd/attention/triton_impl._switches).
_NO_FP_FUSION = ("kd_online_kernel", "kd_terms_kernel", "kd_backward_kernel", "kd_rows_kernel", "sparse_rows_kernel")


@dataclass
class Compiled:
    kernel: str
    variant: str
    arch: int
    shared: int
    registers: int | None
    spill_bytes: int | None
    spill_stores: int | None = None  # ptxas -v: bytes of register spill stores (to the stack frame)


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS[fn.__name__]:
            sig[name] = _POINTER_TYPES.get(name, "*" + dtype)
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(local.group(1)) if local else None)


def _spill_stores(log: str) -> int | None:
    stores = re.findall(r"(\d+) bytes spill stores", log)
    return sum(map(int, stores)) if stores else None


def _ptxas_spill_stores(ptx: str, arch: int) -> int | None:
    """Spill stores as ptxas reports them (the cubin's LOCAL count, spill_bytes, misses spills to the stack),
    from a ptxas run of its own: for a kernel Triton's cache held, whose compile ran no ptxas."""
    try:  # the ptxas Triton itself runs for this arch (Triton 3.9: a newer one for sm_90)
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch).path
    except (ImportError, AttributeError):
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not tool or not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([tool, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    return _spill_stores(out)


def _compile(src, target, options):
    """``triton.compile``, and ptxas's ``-v`` log of that compile when it ran ptxas (None on a cache hit, or with
    a Triton that cannot print it): ptxas dominates a compile, so running it a second time for the log would
    double the cost of compiling every configuration."""
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=target, options=options), None
    log, before = io.StringIO(), nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True  # Triton then prints ptxas's log to stdout
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options)
    finally:
        nvidia.dump_ptxas_log = before
    return kernel, (log.getvalue() if "spill stores" in log.getvalue() else None)


def compile_one(fn, dtype: str, arch: int, constexprs: dict, num_warps: int, num_stages: int) -> Compiled:
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=fn.__name__ not in _NO_FP_FUSION)
    kernel, log = _compile(src, GPUTarget("cuda", arch, 32), options)
    regs, local = _resources(kernel.asm["cubin"])
    stores = _spill_stores(log) if log is not None else _ptxas_spill_stores(kernel.asm["ptx"], arch)
    variant = ",".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("BLOCK"))
    cfg = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK"))
    return Compiled(fn.__name__, f"{dtype} {cfg} w{num_warps}s{num_stages} {variant}", arch,
                    kernel.metadata.shared, regs, local, stores)


def _base(cfg: configs.TileConfig, from_logits: bool) -> dict:
    return dict(HAS_BIAS_S=not from_logits, HAS_BIAS_T=not from_logits, FROM_LOGITS=from_logits, UPCAST=False,
                PRECISION="ieee", S_CAP=False, T_CAP=False, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                BLOCK_D=cfg.block_d)


_HEAVIEST = {  # the variant with the most live state, per kernel (both sides' softcaps on)
    "forward": (kd_online_kernel, dict(DIVERGENCE=1, HAS_HARD=True, S_CAP=True, T_CAP=True)),
    "terms": (kd_terms_kernel, dict(DIVERGENCE=4, S_CAP=True, T_CAP=True)),
    "backward": (kd_backward_kernel, dict(DIVERGENCE=4, HAS_HARD=True, NEED_S=True, NEED_T=True, S_CAP=True,
                                          T_CAP=True)),
}
_OTHER_VARIANTS = [
    (kd_online_kernel, dict(DIVERGENCE=0, HAS_HARD=False)),
    (kd_online_kernel, dict(DIVERGENCE=2, HAS_HARD=True)),
    (kd_terms_kernel, dict(DIVERGENCE=3)),
    (kd_terms_kernel, dict(DIVERGENCE=5)),
    *[(kd_backward_kernel, dict(DIVERGENCE=d, HAS_HARD=False, NEED_S=True, NEED_T=False)) for d in (1, 2, 3, 5)],
    (kd_backward_kernel, dict(DIVERGENCE=1, HAS_HARD=False, NEED_S=False, NEED_T=True)),
]


def variants():
    """(fn, dtype, constexprs, num_warps, num_stages, archs) for every launchable configuration.

    Every tile configuration x operand size (float32, bfloat16) x input kind (hidden states or
    logits) compiles for every arch in the heaviest variant of each kernel (resources are set by
    the tiles); every other divergence/gradient variant, float16 and tf32 compile once (sm_90).
    """
    every = (80, 90)
    for (kind, size), cfgs in configs.CONFIGS.items():
        dtype = "bf16" if size == 2 else "fp32"
        for cfg, from_logits in itertools.product(cfgs, (False, True)):
            for name in ("forward", "terms") if kind == "forward" else ("backward",):
                fn, extra = _HEAVIEST[name]
                yield fn, dtype, {**_base(cfg, from_logits), **extra}, cfg.num_warps, cfg.num_stages, every
    big16, big32 = configs.CONFIGS[("forward", 2)][-1], configs.CONFIGS[("forward", 4)][-1]
    for fn, extra in _OTHER_VARIANTS:
        yield fn, "bf16", {**_base(big16, False), **extra}, big16.num_warps, big16.num_stages, (90,)
    for fn, extra in _HEAVIEST.values():
        yield fn, "fp16", {**_base(big16, False), **extra}, big16.num_warps, big16.num_stages, (90,)
    fn, extra = _HEAVIEST["forward"]
    yield fn, "fp32", {**_base(big32, False), **extra, "PRECISION": "tf32"}, big32.num_warps, big32.num_stages, (90,)


# The chunked loss's row kernel (kernels/kd_rows.py), float32 only: 5 divergences x HAS_HARD x (NEED_S, NEED_T)
# x the CONFIGS entries make 80 variants. Compiled: the heaviest (skew_forward_kl, every switch on) in every
# configuration, and in the large-vocabulary one a set that takes every divergence, every switch value and
# each sweep structure (loss only; a gradient merged into sweep 2; sweep 3) at least once, on every arch.
_ROWS_VARIANTS = [
    dict(DIVERGENCE=1, HAS_HARD=True, NEED_S=True, NEED_T=False),  # forward_kl, ds in sweep 2
    dict(DIVERGENCE=2, HAS_HARD=False, NEED_S=False, NEED_T=True),  # reverse_kl, dt in sweep 2
    dict(DIVERGENCE=2, HAS_HARD=True, NEED_S=True, NEED_T=True),
    dict(DIVERGENCE=3, HAS_HARD=False, NEED_S=False, NEED_T=False),  # loss only
    dict(DIVERGENCE=5, HAS_HARD=True, NEED_S=True, NEED_T=False),
]
_ROWS_HEAVIEST = dict(DIVERGENCE=4, HAS_HARD=True, NEED_S=True, NEED_T=True)


def _rows_case(cfg, switches: dict):
    cx = {**switches, "BLOCK_V": cfg.block_v}
    return kd_rows_kernel, "fp32", cx, cfg.num_warps, cfg.num_stages, (80, 90)


def rows_variants():
    """The row kernel of the chunked loss (kernels/kd_rows.py): see _ROWS_VARIANTS."""
    for cfg in ROWS_CONFIGS:
        yield _rows_case(cfg, _ROWS_HEAVIEST)
    for switches in _ROWS_VARIANTS:
        yield _rows_case(ROWS_CONFIGS[-1], switches)


# The sparse loss's row kernel (kernels/sparse_rows.py), float32 only: TAIL x HAS_HARD x NEED_GRAD x the CONFIGS
# entries x BLOCK_K (the next power of two >= k, at least 16). Compiled: the heaviest (every switch on) with
# k = 64 in every configuration, and in the large-vocabulary one every switch value and k of 16 (S = 12) and 128.
_SPARSE_VARIANTS = [
    dict(TAIL=False, HAS_HARD=False, NEED_GRAD=True, BLOCK_K=16),  # sampled targets
    dict(TAIL=True, HAS_HARD=False, NEED_GRAD=False, BLOCK_K=128),  # loss only
    dict(TAIL=False, HAS_HARD=True, NEED_GRAD=True, BLOCK_K=64),
]
_SPARSE_HEAVIEST = dict(TAIL=True, HAS_HARD=True, NEED_GRAD=True, BLOCK_K=64)


def sparse_rows_variants():
    """The row kernel of the sparse loss (kernels/sparse_rows.py): see _SPARSE_VARIANTS."""
    for cfg in ROWS_CONFIGS:
        yield sparse_rows_kernel, "fp32", {**_SPARSE_HEAVIEST, "BLOCK_V": cfg.block_v}, cfg.num_warps, \
            cfg.num_stages, (80, 90)
    cfg = ROWS_CONFIGS[-1]
    for switches in _SPARSE_VARIANTS:
        yield sparse_rows_kernel, "fp32", {**switches, "BLOCK_V": cfg.block_v}, cfg.num_warps, cfg.num_stages, \
            (80, 90)


_ATTENTION = {  # kernel -> (configuration table key, heaviest switches)
    prefix_attention_forward_kernel: ("forward", dict(HAS_LENGTHS=True, HAS_PADDING=True, HAS_CAP=False)),
    prefix_attention_dq_kernel: ("dq", dict(NEED_DQ=True, HAS_LENGTHS=True, HAS_PADDING=True, HAS_CAP=False)),
    prefix_attention_dkdv_kernel: ("dkdv", dict(NEED_DK=True, NEED_DV=True, HAS_PADDING=True, HAS_CAP=False)),
    prefix_attention_prefix_dkdv_kernel: ("dkdv", dict(NEED_DK=True, NEED_DV=True, HAS_LENGTHS=True, HAS_CAP=False)),
}
_ATTENTION_OTHER_VARIANTS = [
    (prefix_attention_forward_kernel, dict(HAS_LENGTHS=False, HAS_PADDING=False)),
    (prefix_attention_dq_kernel, dict(NEED_DQ=False)),
    (prefix_attention_dq_kernel, dict(HAS_LENGTHS=False, HAS_PADDING=False)),
    (prefix_attention_dkdv_kernel, dict(NEED_DK=False)),
    (prefix_attention_dkdv_kernel, dict(NEED_DV=False)),
    (prefix_attention_dkdv_kernel, dict(HAS_PADDING=False)),
    (prefix_attention_prefix_dkdv_kernel, dict(NEED_DK=False)),
    (prefix_attention_prefix_dkdv_kernel, dict(NEED_DV=False)),
    (prefix_attention_prefix_dkdv_kernel, dict(HAS_LENGTHS=False)),
    *((fn, dict(HAS_CAP=True)) for fn in _ATTENTION),  # Gemma 2's softcapped scores
]


def _attention_case(fn, dtype: str, head_dim: int, archs, precision="ieee", **switches):
    kind, heaviest = _ATTENTION[fn]
    size = 2 if dtype in ("bf16", "fp16") else 4
    cfg = configs.pick_attention(kind, size, head_dim)
    block_d = configs.attention_block_d(head_dim)
    cx = {**heaviest, **switches, "EVEN_D": head_dim == block_d, "UPCAST": False, "PRECISION": precision,
          "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": block_d}
    return fn, dtype, cx, cfg.num_warps, cfg.num_stages, archs


def attention_variants():
    """Prefix attention: every kernel x tile table entry (head dims 64 and 80/96: BLOCK_D 64 and 128, the
    latter with masked columns; 80 and 96 compile identically, D being a runtime size) x bfloat16 and
    float32 in the heaviest switches, for every arch, and bfloat16 at head dim 128 (EVEN_D) for every arch;
    float16, tf32 and the other switch variants once (sm_90)."""
    every = (80, 90)
    for fn in _ATTENTION:
        for dtype, head_dim in itertools.product(("bf16", "fp32"), (64, 80)):
            yield _attention_case(fn, dtype, head_dim, every)
    for fn in _ATTENTION:
        yield _attention_case(fn, "bf16", 128, every)  # the most common head dim: unmasked columns
        yield _attention_case(fn, "fp16", 96, (90,))
    for fn, switches in _ATTENTION_OTHER_VARIANTS:
        yield _attention_case(fn, "bf16", 96, (90,), **switches)
    yield _attention_case(prefix_attention_forward_kernel, "fp32", 128, (90,), precision="tf32")


def cases():
    """Flat list of (fn, dtype, constexprs, num_warps, num_stages, arch)."""
    every = itertools.chain(variants(), attention_variants(), rows_variants(), sparse_rows_variants())
    return [(fn, dtype, cx, w, s, arch) for fn, dtype, cx, w, s, archs in every for arch in archs]


def compile_case(case) -> Compiled:
    fn, dtype, constexprs, warps, stages, arch = case
    return compile_one(fn, dtype, arch, constexprs, warps, stages)


def main():
    parser = argparse.ArgumentParser(description="Compile the KD and attention kernels for sm_80, sm_90 without a GPU.")
    parser.add_argument("--case", type=int, help="compile one case (index into cases()) and print it as JSON")
    parser.add_argument("--cases", help="compile cases i,j,... and print one JSON line per case (with its index)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if args.case is not None:
        print(json.dumps(dataclasses.asdict(compile_case(cases()[args.case]))))
        return
    if args.cases is not None:
        every = cases()
        for i in (int(x) for x in args.cases.split(",")):
            print(json.dumps({"index": i, **dataclasses.asdict(compile_case(every[i]))}), flush=True)
        return
    for case in cases():
        c = compile_case(case)
        print(f"sm_{c.arch} {c.kernel:36s} shared={c.shared:6d} regs={c.registers} spill={c.spill_bytes} "
              f"spill_stores={c.spill_stores}  {c.variant}")


if __name__ == "__main__":
    main()

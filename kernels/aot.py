"""Ahead-of-time compilation of every kernel configuration for NVIDIA targets, without a GPU.

The interpreter runs kernels on the CPU but cannot see compile errors, shared-memory overflow or
register spills. This compiles each kernel the launchers can pick (kernels/configs.py) with
``triton.compile`` for a ``GPUTarget`` and reads the resource use off the cubin.

    python -m promptkd.kernels.aot            # table of shared memory, registers, spills
    python -m promptkd.kernels.aot --case 3   # one case, as JSON (what tests/test_compile.py runs)

It must run without TRITON_INTERPRET=1 (under the interpreter, kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from .kd_backward import _kd_backward_kernel
from .kd_forward import _kd_online_kernel, _kd_terms_kernel

#: Opt-in shared memory per block, bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}
_POINTERS = {
    "_kd_online_kernel": ("XS", "WS", "BS", "XT", "WT", "BT", "LABELS", "STATS"),
    "_kd_terms_kernel": ("XS", "WS", "BS", "XT", "WT", "BT", "LSE", "PARTIAL"),
    "_kd_backward_kernel": ("XS", "WS", "BS", "XT", "WT", "BT", "LABELS", "ROWS", "DZS", "DZT"),
}
_FLOAT_ARGS = ("inv_t", "lw_p", "lw_q", "soft_weight", "hard_weight")


@dataclass
class Compiled:
    kernel: str
    variant: str
    arch: int
    shared: int
    registers: int | None
    spill_bytes: int | None


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS[fn.__name__]:
            if name == "LABELS":
                sig[name] = "*i64"
            elif name in ("STATS", "LSE", "PARTIAL", "ROWS"):  # float32 statistics
                sig[name] = "*fp32"
            else:
                sig[name] = "*" + dtype
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


def compile_one(fn, dtype: str, arch: int, constexprs: dict, num_warps: int, num_stages: int) -> Compiled:
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False))
    regs, local = _resources(kernel.asm["cubin"])
    variant = ",".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("BLOCK"))
    cfg = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK"))
    return Compiled(fn.__name__, f"{dtype} {cfg} w{num_warps}s{num_stages} {variant}", arch,
                    kernel.metadata.shared, regs, local)


def _base(cfg: configs.TileConfig, from_logits: bool) -> dict:
    return dict(HAS_BIAS_S=not from_logits, HAS_BIAS_T=not from_logits, FROM_LOGITS=from_logits, UPCAST=False,
                PRECISION="ieee", BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)


_HEAVIEST = {  # the variant with the most live state, per kernel
    "forward": (_kd_online_kernel, dict(DIVERGENCE=1, HAS_HARD=True)),
    "terms": (_kd_terms_kernel, dict(DIVERGENCE=4)),
    "backward": (_kd_backward_kernel, dict(DIVERGENCE=4, HAS_HARD=True, NEED_S=True, NEED_T=True)),
}
_OTHER_VARIANTS = [
    (_kd_online_kernel, dict(DIVERGENCE=0, HAS_HARD=False)),
    (_kd_online_kernel, dict(DIVERGENCE=2, HAS_HARD=True)),
    (_kd_terms_kernel, dict(DIVERGENCE=3)),
    (_kd_terms_kernel, dict(DIVERGENCE=5)),
    *[(_kd_backward_kernel, dict(DIVERGENCE=d, HAS_HARD=False, NEED_S=True, NEED_T=False)) for d in (1, 2, 3, 5)],
    (_kd_backward_kernel, dict(DIVERGENCE=1, HAS_HARD=False, NEED_S=False, NEED_T=True)),
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


def cases():
    """Flat list of (fn, dtype, constexprs, num_warps, num_stages, arch)."""
    return [(fn, dtype, cx, w, s, arch) for fn, dtype, cx, w, s, archs in variants() for arch in archs]


def compile_case(case) -> Compiled:
    fn, dtype, constexprs, warps, stages, arch = case
    return compile_one(fn, dtype, arch, constexprs, warps, stages)


def main():
    parser = argparse.ArgumentParser(description="Compile the KD kernels for sm_80 / sm_90 without a GPU.")
    parser.add_argument("--case", type=int, help="compile one case (index into cases()) and print it as JSON")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if args.case is not None:
        print(json.dumps(dataclasses.asdict(compile_case(cases()[args.case]))))
        return
    for case in cases():
        c = compile_case(case)
        print(f"sm_{c.arch} {c.kernel:22s} shared={c.shared:6d} regs={c.registers} spill={c.spill_bytes}  {c.variant}")


if __name__ == "__main__":
    main()

"""Every kernel configuration the launchers can pick compiles for sm_80 and sm_90, no GPU needed.

The interpreter cannot catch compile errors, shared-memory overflow or register spills; this can.
"""

import pytest

pytest.importorskip("triton")

from promptkd.kernels import aot  # noqa: E402

CASES = [(fn, dtype, cx, w, s, arch) for fn, dtype, cx, w, s, archs in aot.variants() for arch in archs]


def _id(case):
    fn, dtype, cx, w, s, arch = case
    flags = "-".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in cx.items()
                     if k in ("DIVERGENCE", "FROM_LOGITS", "HAS_HARD", "NEED_S", "NEED_T", "PRECISION"))
    tiles = f"N{cx['BLOCK_N']}V{cx['BLOCK_V']}D{cx['BLOCK_D']}-w{w}s{s}"
    return f"sm{arch}-{fn.__name__.strip('_')}-{dtype}-{tiles}-{flags}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_compiles_within_limits(case):
    fn, dtype, constexprs, warps, stages, arch = case
    c = aot.compile_one(fn, dtype, arch, constexprs, warps, stages)
    assert 0 < c.shared <= aot.SHARED_LIMIT[arch], f"shared memory {c.shared} B over the sm_{arch} limit"
    if c.spill_bytes is not None:
        assert c.spill_bytes == 0, f"{c.spill_bytes} bytes of local memory (register spills)"

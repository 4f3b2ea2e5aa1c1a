"""The native CPU kernel library (``kernels/cpu/kd_rows.cpp``, built by ``CMakeLists.txt``), loaded with ctypes.

``pip install -e .`` builds ``libpromptkd_cpu.so`` into ``kernels/cpu/`` (installed as
``promptkd/kernels/cpu/``). ``PROMPTKD_NATIVE_LIB`` names another file. Where the library is missing or
does not load, :func:`library` returns None and :func:`unavailable_reason` says why; the chunked KD
loss then runs its elementwise pass with torch ops (``promptkd.kd.rows``).

The library is a plain C ABI: no torch headers at build time, so building it never pulls a torch build.
ctypes releases the GIL around each call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from .. import launch
from .settings import DIVERGENCE_CODES, KDSettings

LIBRARY_NAME = "libpromptkd_cpu.so"
#: The ABI version of the library (kernels/cpu/kd_rows.cpp, sparse_rows.cpp) this module speaks; 2 added the
#: offline-distillation rows (promptkd_topk_rows, promptkd_sample_rows, promptkd_sparse_rows).
ABI_VERSION = 2
#: How to build the library by hand (what ``pip install -e .`` runs).
BUILD_COMMAND = "cmake -S . -B build/native && cmake --build build/native  (from the repository root)"


def library_path() -> Path:
    """Where the library is looked for: ``PROMPTKD_NATIVE_LIB`` or next to the installed kernels."""
    override = os.environ.get("PROMPTKD_NATIVE_LIB")
    if override:
        return Path(override)
    from .. import kernels  # a namespace package (DESIGN.md): a __path__, no __file__

    return Path(next(iter(kernels.__path__))).resolve() / "cpu" / LIBRARY_NAME


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = library_path()
    if not path.is_file():
        return None, f"{path} does not exist: the native build did not run or failed"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"{path} does not load: {e}"
    try:
        version = lib.promptkd_cpu_abi_version()
    except AttributeError:
        return None, f"{path} is not promptkd's native library (no promptkd_cpu_abi_version)"
    if version != ABI_VERSION:
        return None, (f"{path} has ABI version {version}, this promptkd needs {ABI_VERSION}: "
                      f"rebuild it ({BUILD_COMMAND})")
    i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p
    lib.promptkd_kd_rows.restype = i32
    lib.promptkd_kd_rows.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i32, f32, f32, f32, f32, f32,
                                     i32, i32]
    for name, args in (("promptkd_topk_rows", [i64, i64, ptr, i64, i32, f32, ptr, ptr]),
                       ("promptkd_sample_rows", [i64, i64, ptr, i64, i32, i32, f32, ptr, ptr, ptr, ptr]),
                       ("promptkd_sparse_rows", [i64, i64, ptr, i64, i32, ptr, ptr, ptr, ptr, ptr, i32, f32, f32,
                                                 f32])):
        getattr(lib, name).restype = i32
        getattr(lib, name).argtypes = args
    lib.promptkd_philox.restype = None
    lib.promptkd_philox.argtypes = [ctypes.c_uint64, ptr]
    return lib, None


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (see :func:`unavailable_reason`)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the library cannot be used, or None when it can."""
    return _load()[1]


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def kd_rows(s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None, scale: torch.Tensor | None,
            settings: KDSettings, need_s: bool, need_t: bool) -> torch.Tensor:
    """The native elementwise pass on one chunk (see ``promptkd.kd.rows.kd_rows``): float32 CPU [rows, V]
    logits with unit column stride, overwritten with the scaled gradients where asked. Returns [rows] losses."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are unavailable: {unavailable_reason()}")
    rows, vocab = s.shape
    loss = torch.empty(rows, dtype=torch.float32)
    if targets is not None:
        targets = targets.contiguous()
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    lw_p, lw_q = settings.mix_log_weights
    status = lib.promptkd_kd_rows(
        rows, vocab, _ptr(s), s.stride(0), _ptr(t), t.stride(0), _ptr(targets), _ptr(scale), _ptr(loss),
        DIVERGENCE_CODES[settings.divergence], 1.0 / settings.temperature, settings.soft_weight,
        settings.hard_weight, lw_p, lw_q, int(need_s), int(need_t))
    if status != 0:
        raise RuntimeError(f"promptkd_kd_rows rejected its arguments (status {status})")
    return loss


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are unavailable: {unavailable_reason()}")
    return lib


def topk_rows(x: torch.Tensor, k: int, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The native top-k pass (``promptkd.sparse.rows``) on float32 CPU logits [rows, V] with unit column
    stride: (ids [rows, k] int64, log-probabilities [rows, k] float32)."""
    rows, vocab = x.shape
    ids = torch.empty(rows, k, dtype=torch.int64)
    lp = launch.buffer((rows, k), torch.float32, x.device)
    status = _lib().promptkd_topk_rows(rows, vocab, _ptr(x), x.stride(0), k, inv_t, _ptr(ids), _ptr(lp))
    if status != 0:
        raise RuntimeError(f"promptkd_topk_rows rejected its arguments (status {status})")
    return ids, lp


def sample_rows(x: torch.Tensor, samples: int, width: int, inv_t: float, keys: torch.Tensor,
                counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The native sampling pass (``promptkd.sparse.rows``): ``samples`` draws per row of float32 CPU logits
    [rows, V], row i with Philox key ``keys[i]`` and counter ``counters[i]`` (int64 [rows]); (ids [rows, width]
    int64, log(count / samples) [rows, width] float32), padded with -1 / -inf."""
    rows, vocab = x.shape
    ids = torch.empty(rows, width, dtype=torch.int64)
    lp = launch.buffer((rows, width), torch.float32, x.device)
    keys, counters = keys.contiguous(), counters.contiguous()
    status = _lib().promptkd_sample_rows(rows, vocab, _ptr(x), x.stride(0), samples, width, inv_t, _ptr(keys),
                                         _ptr(counters), _ptr(ids), _ptr(lp))
    if status != 0:
        raise RuntimeError(f"promptkd_sample_rows rejected its arguments (status {status})")
    return ids, lp


def sparse_rows(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor | None,
                scale: torch.Tensor | None, tail: bool, inv_t: float, soft_weight: float,
                hard_weight: float) -> torch.Tensor:
    """The native pass of the sparse KD loss (``promptkd.sparse.rows``) on float32 CPU student logits [rows, V]
    (unit column stride, overwritten with the scaled gradient when ``scale`` is given); ids int64 and lp float32
    [rows, k]. Returns [rows] losses."""
    rows, vocab = s.shape
    loss = launch.buffer((rows,), torch.float32, s.device)
    ids, lp = ids.contiguous(), lp.to(torch.float32).contiguous()
    if targets is not None:
        targets = targets.contiguous()
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    status = _lib().promptkd_sparse_rows(rows, vocab, _ptr(s), s.stride(0), ids.shape[1], _ptr(ids), _ptr(lp),
                                         _ptr(targets), _ptr(scale), _ptr(loss), int(tail), inv_t, soft_weight,
                                         hard_weight)
    if status != 0:
        raise RuntimeError(f"promptkd_sparse_rows rejected its arguments (status {status})")
    return loss


def philox(key: int, counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The four Philox4x32-10 words the native kernels draw from ``key`` (uint64) and ``counter`` (four uint32)."""
    words = (ctypes.c_uint32 * 4)(*counter)
    _lib().promptkd_philox(key & (2**64 - 1), ctypes.addressof(words))
    return tuple(words)

"""``prefix_attention``: argument checks, the implementation (``promptkd.impls``), then dispatch to
reference / torch / triton."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..autograd import autocast_dtype, autocast_inputs, autocast_off, autocast_target, static_float, tracing
from ..impls import FLOATS, pick_impl
from .ops import check_index_range, checked_index, prefix_attention_triton
from .reference import prefix_attention_reference
from .torch_impl import prefix_attention_torch


def _tensor(name: str, x, ndim: int):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _index_tensor(name: str, x, length: int, low: int, high: int, device: torch.device) -> torch.Tensor:
    """An integer vector [length] with values in [low, high], as int64 on ``device``. Values are checked
    when ``x`` is a list or a CPU tensor; a CUDA tensor is taken as it is (checking would sync)."""
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        values = list(x)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
            raise TypeError(f"{name} must hold integers")
        if len(values) != length:
            raise ValueError(f"{name} must have shape [{length}], got {(len(values),)}")
        if values and (min(values) < low or max(values) > high):  # checked on the Python ints: no tensor read
            bad = min(values) if min(values) < low else max(values)
            raise ValueError(f"{name} values must lie in [{low}, {high}], got {bad}")
        return torch.tensor(values, dtype=torch.int64).to(device=device, non_blocking=True)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a sequence of ints, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if tuple(x.shape) != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {tuple(x.shape)}")
    if x.device.type == "cpu" and x.numel():
        if tracing(x):  # a host read would break the graph: the op checks the real tensor
            x = checked_index(x, name, low, high)
        else:
            check_index_range(name, x, low, high)
    elif x.device != device:
        raise ValueError(f"{name} is on {x.device}, the inputs on {device} (pass it on the CPU or on {device})")
    return x.to(device=device, dtype=torch.int64, non_blocking=True)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prefix_lengths: torch.Tensor | Sequence[int] | None = None,
    group_index: torch.Tensor | Sequence[int] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal attention over a shared prefix and each sample's own keys.

    Shapes: q [B, Hq, N, D]; k, v [B, Hkv, N, D]; prefix_k, prefix_v [G, Hkv, P, D]. Hq must be a
    multiple of Hkv (grouped-query attention: query head h reads key head h // (Hq / Hkv)). All
    five share one floating dtype and device. Returns [B, Hq, N, D] in that dtype.

    Sample b uses prefix ``group_index[b]`` (default ``b // (B / G)``, which needs G to divide B;
    G = 1 shares one prefix with the whole batch). ``prefix_lengths`` [G] gives each prefix's real
    length when they are right-padded to P (default: all P). ``key_padding_mask`` [B, N] bool marks
    the sample's own keys that may be attended (True); left padding works through it.

    Query i of sample b attends to keys K = {prefix_k[g, :, j] : j < L_g} + {k[b, :, j] : j <= i,
    key_padding_mask[b, j]} with g = group_index[b]:
        out[b, h, i] = sum_{j in K} softmax_j(scale * q[b, h, i] . key_j) value_j,  scale = 1/sqrt(D).
    A row with no key to attend returns zeros. P = 0 is plain causal attention.

    ``softcap`` (None or > 0; Gemma 2's ``attn_logit_softcapping``): the scores scale * q . key become
    softcap * tanh(scores / softcap) before the softmax, and the gradients flow through the cap. ``triton``
    caps each score tile in float32 (the backward recomputes the tile's tanh); ``torch`` computes the scores
    explicitly (the reference's path: scaled_dot_product_attention has no softcap, so this path holds
    [B, Hq, N, P + N] scores).

    Gradients flow to q, k, v, prefix_k and prefix_v (whichever require grad); the prefix gradient
    is the sum over the samples using each prefix, in a fixed order (same bits on every run).

    Masked positions influence nothing: own keys/values where key_padding_mask is False, prefix
    keys/values at or beyond prefix_lengths[g], and the queries of rows that see no key may hold
    anything (NaN, inf); the output and every gradient are those of zeros there, and the gradients at
    those positions are exactly 0.

    ``group_index`` and ``prefix_lengths`` may be lists or CPU tensors (checked for range) or tensors
    on the inputs' device (taken as they are: a range check there would synchronise).

    Autocast: when autocast is enabled for the inputs' device type, q, k, v, prefix_k and prefix_v
    (unless float64) are first cast to ``torch.get_autocast_dtype(device_type)``, as autocast casts
    scaled_dot_product_attention's inputs (the dtype checks apply to the cast dtypes); the op then
    runs with autocast disabled, forward and backward (also when ``.backward()`` is called inside the
    autocast block). The output has the autocast dtype; gradients reach the leaves in their dtype.

    Double backward: ``impl="reference"`` (plain autograd) supports it. ``torch`` and ``triton`` give
    first-order gradients, also under ``create_graph=True``, but differentiating those gradients again
    raises a RuntimeError.

    ``impl``: ``reference`` (concatenated keys, explicit mask, plain torch: the oracle), ``torch``
    (scaled_dot_product_attention with a boolean mask; CPU and fallback), ``triton`` (fused kernels,
    CUDA, head dims up to 128), ``auto`` (triton on CUDA where it applies, torch otherwise).

    torch.compile: a step calling this function compiles with ``fullgraph=True`` (no graph break) and gives
    the eager output and gradients. ``torch`` and ``reference`` are traced as plain torch; ``triton`` runs
    as custom ops (``promptkd::prefix_attention_triton`` and its backward, ``promptkd.attention.ops``). Index
    lists are checked as Python ints; a CPU index tensor is checked inside the graph
    (``promptkd::checked_index``, the same ValueError). A ``scale`` that changes between calls compiles once
    per value. Second derivatives through a compiled graph are torch's to refuse (AOTAutograd has no
    double backward); the first-order guard above is the eager rule.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _tensor(name, x, 4)
    device = q.device
    if q.dtype not in FLOATS:
        raise ValueError(f"q must be a floating tensor (float32, float16, bfloat16, float64), got {q.dtype}")
    cast = autocast_dtype(device)  # checks see the dtypes after the autocast rule; casting waits for them
    dtype = autocast_target(q.dtype, cast)
    for name, x in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if autocast_target(x.dtype, cast) != dtype:
            under = "" if cast is None else f" (under autocast to {cast})"
            raise ValueError(f"{name} has dtype {x.dtype}, expected {dtype} like q{under}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, expected {device} like q")
    b, hq, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k must be [B={b}, Hkv, N={n}, D={d}] like q, got {tuple(k.shape)}")
    hkv = k.shape[1]
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the query heads (q: {hq}) must be a multiple of the key heads (k: {hkv})")
    if prefix_k.shape[1] != hkv or prefix_k.shape[3] != d:
        raise ValueError(f"prefix_k must be [G, Hkv={hkv}, P, D={d}], got {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")
    g, p = prefix_k.shape[0], prefix_k.shape[2]
    if g < 1:
        raise ValueError("prefix_k must hold at least one prefix (G >= 1; use P = 0 for no prefix)")
    if group_index is None:
        if b % g:
            raise ValueError(f"with {g} prefixes and batch {b}, pass group_index (the default b // (B / G) "
                             "needs G to divide B)")
        group = torch.arange(b, device=device) // (b // g) if b else torch.zeros(0, dtype=torch.int64, device=device)
    else:
        group = _index_tensor("group_index", group_index, b, 0, g - 1, device)
    lengths = None
    if prefix_lengths is not None:
        lengths = _index_tensor("prefix_lengths", prefix_lengths, g, 0, p, device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(f"key_padding_mask must have shape [B={b}, N={n}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, expected {device} like q")
    scale = static_float(scale)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    elif not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    softcap = static_float(softcap)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be finite and > 0 (or None), got {softcap}")
        softcap = float(softcap)
    impl = pick_impl(impl, device, dtype, head_dim=d)

    q, k, v, prefix_k, prefix_v = autocast_inputs(cast, q, k, v, prefix_k, prefix_v)
    args = (q, k, v, prefix_k, prefix_v, lengths, group, key_padding_mask, float(scale))
    with autocast_off(device.type):
        if impl == "reference" or (impl == "torch" and softcap is not None):
            # SDPA has no score softcap: the capped torch path is the reference's explicit scores (plain autograd)
            return prefix_attention_reference(*args, softcap=softcap)
        if impl == "torch":
            return prefix_attention_torch(*args)
        return prefix_attention_triton(*args, softcap)  # promptkd.attention.ops; imports triton only now

"""``fused_linear_topk``: a teacher's sparse targets (top-k or sampled ids and their log-probabilities) straight
from its hidden states and output weight, without a [tokens, vocab] logits tensor."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..autograd import autocast_dtype, autocast_inputs, autocast_off, autocast_target
from ..kd.api import check_float, check_tensor
from ..kd.reference import transform_logits
from ..kd.settings import number
from .ops import linear_topk
from .reference import topk_reference
from .rows import sample_rows

#: The values of ``fused_linear_topk``'s ``impl=``: ``auto`` is ``chunked`` on every device.
TOPK_IMPLS = ("auto", "reference", "chunked")
UINT64 = 2**64


class SparseTargets(NamedTuple):
    """Sparse teacher targets: ``ids`` [..., k] int64 (-1: no target) and ``logprobs`` [..., k] (float32;
    float64 for float64 inputs), what :func:`promptkd.fused_linear_sparse_kd_loss` takes."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _seeds(seed, samples: int, lead: torch.Size, n: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(Philox keys [N], counters [N]) of the rows, or (None, None) without sampling."""
    if samples == 0:
        if seed is not None:
            raise ValueError("seed applies to sampled targets (samples > 0); for top-k targets leave it None")
        return None, None
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))  # from torch's default generator: torch.manual_seed repeats it
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an int or an integer tensor, got a {seed.dtype} tensor")
        if seed.shape != lead:
            raise ValueError(f"a seed tensor must have the leading shape {tuple(lead)} (one key per row), "
                             f"got {tuple(seed.shape)}")
        return seed.reshape(-1).to(device=device, dtype=torch.int64), torch.zeros(n, dtype=torch.int64, device=device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, an integer tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < UINT64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    key = seed - UINT64 if seed >= 2**63 else seed  # the same 64 bits as an int64
    return (torch.full((n,), key, dtype=torch.int64, device=device),
            torch.arange(n, dtype=torch.int64, device=device))


def fused_linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                      temperature: float = 1.0, vocab_size: int | None = None, samples: int = 0, seed=None,
                      logit_scale: float = 1.0, softcap: float | None = None, impl: str = "auto") -> SparseTargets:
    """Sparse targets of a teacher from its hidden states [..., D] and output weight [V, D] (bias [V]).

    - ``samples=0``: the ids of the k largest logits of each row (ties to the lower id), largest first, and their
      log-probabilities under the **full-vocabulary** softmax of logits / T.
    - ``samples=S > 0`` (Random Sampling KD, Anshumann et al., ACL 2025): S tokens drawn from softmax(logits / T)
      per row, returned as the distinct drawn ids, most drawn first (ties to the lower id), with
      ``logprobs = log(count / S)``, padded to width k (k >= S; usually k = S) with id -1 and logprob -inf.
      Draw s of row r takes its uniform from Philox4x32-10 (``promptkd.sparse.philox``): with an int ``seed``,
      key ``seed`` and counter r (the flattened row); with an integer tensor ``seed`` of the leading shape, key
      ``seed[r]`` and counter 0 (rows with equal keys draw alike). Rows draw independently, and the same seed
      gives the same targets on any chunking. ``seed=None`` draws one from torch's default generator.

    ``logit_scale`` (> 0) and ``softcap`` (> 0 or None): the teacher model's own logit transform (Cohere's
    ``logit_scale``, Gemma 2's ``final_logit_softcapping``; :func:`promptkd.hf.models.logit_transform` reads
    them from a config): the logits above are ``softcap * tanh(logit_scale * z / softcap)`` of
    z = hidden @ weight.T + bias (``logit_scale * z`` without a cap), so the targets are the model's own.

    ``vocab_size``: how many leading rows of ``weight`` are real tokens (the rest, padding, are never
    chosen). Returns :class:`SparseTargets` (ids [..., k] int64; logprobs [..., k] float32, float64 for
    float64 inputs). A row whose logits hold NaN gets NaN log-probabilities.

    The [N, V] logits never exist: ``chunked`` computes them one chunk of tokens at a time (at most
    ``PROMPTKD_CHUNK_MB``) with torch's GEMM and runs one pass per chunk that keeps each row's k best and
    log-sum (native C++ on the CPU, torch ops elsewhere). No gradient: the outputs are targets, computed under
    ``no_grad`` (they never require grad). Inside ``torch.compile`` the op is ``promptkd::linear_topk``.
    ``impl``: ``chunked``, ``reference`` (full logits, plain torch; sampled targets through the torch-ops
    sampler), ``auto`` (``chunked``). Autocast casts the floating inputs as for a matmul.
    """
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("bias", bias, optional=True)
    device = hidden.device
    cast = autocast_dtype(device)
    check_float("hidden", hidden, None, None)
    dtype = autocast_target(hidden.dtype, cast)
    if hidden.ndim < 1:
        raise ValueError("hidden must have at least one dimension [..., D]")
    check_float("weight", weight, dtype, device, ndim=2, cast=cast)
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(f"weight must be [V, {d}] to match hidden, got {tuple(weight.shape)}")
    v = weight.shape[0]
    if bias is not None:
        check_float("bias", bias, dtype, device, ndim=1, cast=cast)
        if bias.shape[0] != v:
            raise ValueError(f"bias must have shape [{v}], got {tuple(bias.shape)}")
    vocab = v if vocab_size is None else _int("vocab_size", vocab_size, 1)
    if vocab > v:
        raise ValueError(f"vocab_size={vocab} exceeds the weight's {v} rows")
    samples = _int("samples", samples, 0)
    k = _int("k", k, 1)
    if samples == 0 and k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary ({vocab})")
    if samples and k < samples:
        raise ValueError(f"k={k} is the width of sampled targets and must be >= samples={samples}")
    temperature = number("temperature", temperature)
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logit_scale = number("logit_scale", logit_scale)
    if logit_scale <= 0.0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    if softcap is not None:
        softcap = number("softcap", softcap)
        if softcap <= 0.0:
            raise ValueError(f"softcap must be > 0 (or None: no cap), got {softcap}")
    if not isinstance(impl, str) or impl not in TOPK_IMPLS:
        raise ValueError(f"impl must be one of {TOPK_IMPLS}, got {impl!r}")
    n = lead.numel()
    keys, counters = _seeds(seed, samples, lead, n, device)

    hidden, weight, bias = autocast_inputs(cast, hidden, weight, bias)
    x = hidden.detach().reshape(n, d)
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    with torch.no_grad(), autocast_off(device.type):
        if impl == "reference":
            logits = F.linear(x, weight[:vocab], None if bias is None else bias[:vocab])
            logits = logits.double() if logits.dtype == torch.float64 else logits.float()
            logits = transform_logits(logits, logit_scale, softcap)
            if samples:
                ids, lp = sample_rows(logits, samples, k, temperature, keys, counters, backend="torch")
            else:
                ids, lp = topk_reference(logits, k, temperature)
        else:
            ids, lp = linear_topk(x, weight, bias, k, temperature, vocab, samples, keys, counters, logit_scale,
                                  softcap)
    return SparseTargets(ids.reshape(*lead, k), lp.reshape(*lead, k))

"""``prefix_attention`` as a Hugging Face attention implementation (``"promptkd_prefix"``).

Registered with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``, it is selected
per model with ``model.set_attn_implementation(ATTN_IMPLEMENTATION)``. The mask function hands the
attention the 2-D key-padding mask ([B, N] bool, or None without padding) instead of a 4-D mask.

The prefix reaches the attention layers through a forward keyword, ``promptkd_prefix``, which
transformers passes down to every attention call (also under gradient checkpointing, which keeps
a layer's keywords for its recomputation):

* a :class:`PrefixKV` (read-only per-layer keys/values): the layer attends to that prefix;
* a :class:`PrefixRecorder`: the layer records the keys/values it computes (the prompt pass);
* absent: plain causal attention with padding, so the model keeps working for other callers.

Not supported: packed sequences (position ids that restart inside a row, with no mask). Refused with
an error: custom 4-D masks, attention dropout, and a sliding window shorter than the keys a query could
see, prefix included (the window never cuts a prefix off: a layer whose window would is refused).
Attention-score softcapping (Gemma 2's ``attn_logit_softcapping``, the ``softcap`` keyword) is applied
(``prefix_attention``'s ``softcap``, in every implementation). Only decoder families whose
attention modules take (module, q [B, Hq, N, D], k/v [B, Hkv, N, D], mask, scaling) and carry
``layer_idx`` are accepted: :data:`SUPPORTED_MODEL_TYPES`. Qwen3's and Gemma 3's q/k norms, Gemma's
``query_pre_attn_scalar`` and Phi-3's fused qkv projection happen before that call, inside each family's
own attention module, so the prefix's keys and values are the family's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import prefix_attention
from . import fsdp
from .families import MODEL_TYPES, unsupported

ATTN_IMPLEMENTATION = "promptkd_prefix"
#: The model types prefix attention and the prompted teacher take: the registry's (:mod:`promptkd.hf.families`).
SUPPORTED_MODEL_TYPES = MODEL_TYPES


@dataclass(frozen=True)
class PrefixKV:
    """Per-layer prefix keys and values, each [G, Hkv, P, D]; immutable, so a recomputation under
    gradient checkpointing reads exactly what the first forward read."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    lengths: torch.Tensor | None = None  # [G] real lengths, None = all P
    group_index: torch.Tensor | None = None  # [B] prefix of each sample, None = the default grouping

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


class PrefixRecorder:
    """Collects the keys/values each layer computes, by layer index (a prefix pass). With ``attend``
    (a :class:`PrefixKV`) the pass itself attends to that earlier prefix while recording its own keys:
    the instruction pass after a soft prompt."""

    def __init__(self, attend: PrefixKV | None = None):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attend = attend

    def freeze(self, num_layers: int, after: torch.Tensor | None = None) -> PrefixKV:
        """The recorded keys/values as a :class:`PrefixKV`. ``after`` (the pass's output) makes their
        gradients wait for that output's backward; see :class:`_AfterOutput`."""
        missing = [i for i in range(num_layers) if i not in self.layers]
        if missing:
            raise RuntimeError(f"the prompt pass recorded no keys for layers {missing}: the model does not route "
                               f"attention through the '{ATTN_IMPLEMENTATION}' implementation")
        keys = tuple(self.layers[i][0] for i in range(num_layers))
        values = tuple(self.layers[i][1] for i in range(num_layers))
        if after is not None and torch.is_grad_enabled() and after.requires_grad:
            tied = _AfterOutput.apply(after, *keys, *values)
            keys, values = tied[:num_layers], tied[num_layers:]
        return PrefixKV(keys, values)


class _AfterOutput(torch.autograd.Function):
    """Identity on recorded keys/values whose backward also hands the pass's output a zero gradient.

    A prefix pass reaches the loss only through the keys/values its layers recorded; its last layer's
    output gets no gradient. FSDP gathers a sharded layer's weights for backward when that layer's
    output gets its gradient, so without this the last layer's key/value projections would run
    backward on freed weights. With it, every layer's backward waits for its output's (zero) gradient,
    which fires FSDP's gathering first; the cost is one layer's backward on a zero gradient."""

    @staticmethod
    def forward(ctx, after, *tensors):
        ctx.after = (after.shape, after.dtype, after.device)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device = ctx.after
        return (torch.zeros((), dtype=dtype, device=device).expand(shape), *grads)


def record_prefix(base, num_layers: int, recorder: PrefixRecorder, **inputs) -> PrefixKV:
    """Runs the decoder ``base`` as a prefix pass (``inputs``: its forward arguments) and returns the
    keys/values its layers recorded; for a sharded decoder they are tied to the pass's output
    (:class:`_AfterOutput`), so FSDP gathers every layer before its backward."""
    out = base(**inputs, use_cache=False, promptkd_prefix=recorder).last_hidden_state
    return recorder.freeze(num_layers, after=out if fsdp.managed_by_fsdp(base) else None)


def positions_from_mask(mask: torch.Tensor, offset) -> torch.Tensor:
    """Position ids [B, N] that count each row's real tokens from ``offset`` (a number or a [B, 1]
    tensor): left or right padding gives every real token its unpadded position."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) + offset


def shared_prefix_forward(base, num_layers: int, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                          input_ids: torch.Tensor, attention_mask: torch.Tensor, group_index: torch.Tensor, *,
                          outer: PrefixKV | None = None, impl: str = "auto") -> torch.Tensor:
    """Runs G prefixes once and B rows that continue them; returns the rows' final hidden states [B, N, H].

    ``base`` is a decoder (``model.base_model``) whose attention is :data:`ATTN_IMPLEMENTATION`.
    ``prefix_ids`` / ``prefix_mask`` [G, P] are right-padded (real tokens first, mask 1);
    ``input_ids`` / ``attention_mask`` [B, N] are right-padded rows, row b continuing prefix
    ``group_index[b]``. The result equals running each row's prefix + own tokens as one sequence,
    at positions 0, 1, ... (after ``outer``'s length when given), and taking the own tokens' states.

    ``outer`` (G = 1, e.g. a soft prompt's keys/values) comes before every prefix: the prefix pass
    attends to it and the rows attend to [outer; prefix_g]. Gradients reach the prefix's and the
    outer prefix's keys/values (summed over the rows that read them).
    """
    offset = outer.length if outer is not None else 0
    prefix_lengths = prefix_mask.long().sum(-1)
    positions = positions_from_mask(prefix_mask, offset)
    recorded = record_prefix(base, num_layers, PrefixRecorder(attend=outer), input_ids=prefix_ids,
                             attention_mask=prefix_mask, position_ids=positions, promptkd_impl=impl)
    keys, values = recorded.keys, recorded.values
    if outer is not None and offset:
        def join(first, second):  # [1, H, P0, D] before every [G, H, P, D]
            return torch.cat([first.to(second.dtype).expand(second.shape[0], -1, -1, -1), second], 2)

        keys = tuple(join(o, k) for o, k in zip(outer.keys, keys, strict=True))
        values = tuple(join(o, v) for o, v in zip(outer.values, values, strict=True))
    lengths = prefix_lengths + offset
    prefix = PrefixKV(keys, values, lengths=lengths, group_index=group_index)
    positions = positions_from_mask(attention_mask, lengths[group_index][:, None])
    out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
               promptkd_prefix=prefix, promptkd_impl=impl)
    return out.last_hidden_state


def _cached_decode(query, key, value, padding, scaling, softcap=None):
    """Queries are the last N of K keys (decoding with a KV cache): causal, aligned bottom-right.

    Padded keys/values and the queries of rows that see no key read as 0 and such rows return 0, so
    whatever those positions hold (NaN, inf) influences nothing (a zero weight times NaN is NaN).
    ``softcap``: scores capped as softcap * tanh(scores / softcap), computed explicitly (SDPA has no cap)."""
    n, kv = query.shape[2], key.shape[2]
    mask = torch.ones(n, kv, dtype=torch.bool, device=query.device).tril(kv - n)[None, None]
    if padding is not None:
        keep = padding[:, None, -kv:, None]  # [B, 1, K, 1]
        key, value = key.masked_fill(~keep, 0), value.masked_fill(~keep, 0)
        mask = mask & padding[:, None, None, -kv:]
    alive = mask.any(-1, keepdim=True)  # [B, 1, N, 1]
    query = torch.where(alive, query, torch.zeros((), dtype=query.dtype, device=query.device))
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask | ~alive, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
    else:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query @ key.transpose(-1, -2)).float() * scale
        scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~(mask | ~alive), float("-inf"))
        out = torch.softmax(scores, -1).to(value.dtype) @ value
    return torch.where(alive, out, torch.zeros((), dtype=out.dtype, device=out.device))


def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             promptkd_prefix=None, promptkd_impl="auto", sliding_window=None, softcap=None, **kwargs):
    """The attention-interface function: returns ([B, N, Hq, D], None). ``promptkd_impl`` picks the
    prefix_attention implementation (default ``auto``: the Triton kernels on CUDA)."""
    if dropout:
        raise ValueError(f"'{ATTN_IMPLEMENTATION}' attention has no attention dropout (got p={dropout}): "
                         "run the model in eval mode")
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"'{ATTN_IMPLEMENTATION}' attention expects a [B, N] padding mask, got a "
                         f"{attention_mask.ndim}-D mask (a custom 4-D mask is not supported)")
    layer = getattr(module, "layer_idx", None)
    if isinstance(promptkd_prefix, PrefixRecorder):
        promptkd_prefix.layers[layer] = (key, value)
        promptkd_prefix = promptkd_prefix.attend
    if key.shape[2] != query.shape[2]:
        if promptkd_prefix is not None:
            raise ValueError("a prefix cannot be combined with a KV cache")
        out = _cached_decode(query, key, value, attention_mask, scaling, softcap)
        return out.transpose(1, 2).contiguous(), None
    padding = None if attention_mask is None else attention_mask[:, -key.shape[2]:]
    span = key.shape[2] + (0 if promptkd_prefix is None else promptkd_prefix.length)
    if sliding_window is not None and span > sliding_window:
        raise ValueError(f"sequence of {span} keys exceeds the model's sliding window ({sliding_window}), "
                         f"which '{ATTN_IMPLEMENTATION}' attention does not implement")
    if promptkd_prefix is None or promptkd_prefix.length == 0:
        pk = key.new_empty(1, key.shape[1], 0, key.shape[3])
        pv = pk
        lengths = group = None
    else:
        pk, pv = promptkd_prefix.keys[layer], promptkd_prefix.values[layer]
        pk, pv = pk.to(key.dtype), pv.to(value.dtype)
        lengths, group = promptkd_prefix.lengths, promptkd_prefix.group_index
    out = prefix_attention(query, key, value, pk, pv, prefix_lengths=lengths, group_index=group,
                           key_padding_mask=padding, scale=scaling, softcap=softcap, impl=promptkd_impl)
    return out.transpose(1, 2).contiguous(), None


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """The mask-interface function: the [B, kv_length] bool padding mask as given (None stays None).

    A mask of all ones is passed on rather than dropped: finding that out would synchronise with the device."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns their name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # versions without a mask interface call the attention with the 2-D mask themselves
        return ATTN_IMPLEMENTATION
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)
    return ATTN_IMPLEMENTATION


def check_supported(model) -> str:
    """The model's type if it is a supported causal LM; else a ValueError naming what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: {type(model).__name__}: " + unsupported("prefix attention", model_type))
    if model.get_output_embeddings() is None:
        raise ValueError(f"model: {type(model).__name__} has no output embedding; pass a *ForCausalLM model")
    return model_type

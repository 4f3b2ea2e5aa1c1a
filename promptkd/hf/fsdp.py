"""FSDP (FSDP2, ``torch.distributed.fsdp.fully_shard``) for Hugging Face causal LMs: sharding a model,
asking whether a module or a tensor is sharded, reading a sharded model's output head, and gathering
its whole state dict for saving.

A head tied to the input embedding is a special case: sharding swaps the decoder's parameters (the
input embedding among them) for sharded ones, but not the head's, so the tie is no longer visible on
the model. :func:`shard` records which models it sharded with a tied head (:func:`head_tied_to_input`),
and the readers below use that record.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import InputError

#: Models :func:`shard` sharded whose output head was the input embedding (weak: dropping a model forgets it).
_TIED_HEADS: weakref.WeakSet = weakref.WeakSet()


def managed_by_fsdp(module) -> bool:
    """Whether FSDP manages the parameters of ``module`` or of any module inside it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP-sharded parameter, gradient or optimizer state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def shard(model, param_dtype: torch.dtype | None = None) -> None:
    """Shards ``model`` over the processes: each decoder layer is one unit, the decoder (input
    embedding, final norm) the root unit; an output head that is not tied to the input embedding stays
    whole on every process (its gradient is averaged like the soft prompt's). ``param_dtype`` computes
    in that dtype while the sharded weights keep theirs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.base_model
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise InputError(f"fsdp: found no decoder layers in {type(model).__name__} to shard")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(base, **kwargs)
    if tied:
        _TIED_HEADS.add(model)


def head_tied_to_input(model) -> bool:
    """Whether ``model`` was sharded by :func:`shard` with its output head tied to the input embedding."""
    return model in _TIED_HEADS


def full_state_dict(model, keep: bool) -> dict | None:
    """The whole weights of a sharded model, gathered on every process (a collective: all must call
    it), copied to the CPU where ``keep`` (else None). A tied head is left out: it is saved once, as the
    input embedding, as ``save_pretrained`` expects."""
    head = model.get_output_embeddings()
    tied = {f"{n}.weight" for n, m in model.named_modules() if m is head} if head_tied_to_input(model) else set()
    state = {}
    for name, value in model.state_dict().items():
        value = value.full_tensor() if is_dtensor(value) else value
        if keep and name not in tied:
            state[name] = value.detach().to("cpu", copy=True)
    return state if keep else None

"""Loading the model pair (directories, hub names, ``.gguf`` files: :mod:`.gguf`) and reading what the
fused losses need from a causal LM.

The trainer never asks a model for logits: :func:`lm_hidden` returns the final hidden states and
the output embedding, and the losses (:func:`promptkd.fused_linear_kd_loss`,
:func:`linear_cross_entropy`) work from those.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import InputError
from ..kd.settings import IGNORE_INDEX
from . import gguf
from .fsdp import head_tied_to_input


@dataclass
class LMOutput:
    """Final hidden states [B, N, H], output weight [V, H], bias [V] or None, and the model's logit transform
    (scale, softcap): logits = softcap * tanh(scale * (h @ W.T + b) / softcap), h @ W.T + b for (1.0, None)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: tuple[float, float | None] = (1.0, None)

    def detach(self) -> LMOutput:
        bias = None if self.bias is None else self.bias.detach()
        return LMOutput(self.hidden.detach(), self.weight.detach(), bias, self.transform)

    def loss_transforms(self, side: str) -> dict:
        """This output's transform as the fused losses' keywords for ``side`` ("student" or "teacher")."""
        return {f"{side}_logit_scale": self.transform[0], f"{side}_softcap": self.transform[1]}


def _hub_like(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def check_model_path(name: str, path: str) -> None:
    """A local directory must exist and hold a config, a ``.gguf`` path must be a local file (and the
    GGUF packages installed); anything else must look like a hub name."""
    if not path:
        raise InputError(f"{name} is not set")
    if gguf.is_gguf(path):
        gguf.check_gguf_path(name, path)
        return
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{name}: {path!r} is a directory without config.json (not a saved model)")
        return
    if not _hub_like(path) or os.path.exists(path):
        raise InputError(f"{name}: model path {path!r} does not exist")


def load_model(name: str, path: str, dtype: torch.dtype | str, device: torch.device):
    """A causal LM from a directory, a hub name or a ``.gguf`` file (see :mod:`promptkd.hf.gguf`), in
    ``dtype`` (``"auto"``: as stored) on ``device``."""
    from transformers import AutoModelForCausalLM

    check_model_path(name, path)
    if gguf.is_gguf(path):
        return gguf.load_model(name, path, dtype).to(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"{name}: could not load {path!r} as a local directory or hub model: {e}") from None
    return model.to(device)


def load_tokenizer(name: str, path: str):
    from transformers import AutoTokenizer

    check_model_path(name, path)
    if gguf.is_gguf(path):
        tokenizer = gguf.load_tokenizer(name, path)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise InputError(f"{name}: could not load a tokenizer from {path!r}: {e}") from None
    if tokenizer.eos_token_id is None:
        raise InputError(f"{name}: the tokenizer at {path!r} has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name: str, path: str):
    """The model config of a directory, a hub name or a ``.gguf`` file, without its weights."""
    from transformers import AutoConfig

    check_model_path(name, path)
    if gguf.is_gguf(path):
        return gguf.load_config(name, path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{name}: could not load a model config from {path!r}: {e}") from None


def has_tokenizer(path: str) -> bool:
    if not os.path.isdir(path):
        return True  # a hub name, or a GGUF file (which carries its tokenizer): assume it ships one
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def check_same_tokens(student_tok, teacher_tok, student_path: str, teacher_path: str) -> None:
    """Distillation compares distributions id by id: both tokenizers must give every token one id."""
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        differing = sorted(t for t in set(vs) | set(vt) if vs.get(t) != vt.get(t))
        sample = ", ".join(f"{t!r}: {vs.get(t)} vs {vt.get(t)}" for t in differing[:3])
        raise InputError(f"the student tokenizer ({student_path}) and the teacher tokenizer ({teacher_path}) "
                         f"disagree on {len(differing)} token id(s), e.g. {sample}")
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(student_tok, attr) != getattr(teacher_tok, attr):
            raise InputError(f"the student and teacher tokenizers disagree on {attr}: "
                             f"{getattr(student_tok, attr)} vs {getattr(teacher_tok, attr)}")


def lm_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared_prefix=None,
              attention_impl: str = "auto") -> LMOutput:
    """Final hidden states of a Hugging Face causal LM and its output embedding, without logits.

    ``shared_prefix=(prefix_ids [G, P], prefix_mask [G, P], group_index [B])``: the rows continue
    shared right-padded prefixes, run once each through prefix attention (the model must use the
    ``"promptkd_prefix"`` attention; see :func:`promptkd.hf.attention.shared_prefix_forward`).
    """
    if shared_prefix is None:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
    else:
        from .attention import shared_prefix_forward

        prefix_ids, prefix_mask, group_index = shared_prefix
        layers = model.config.get_text_config().num_hidden_layers
        hidden = shared_prefix_forward(model.base_model, layers, prefix_ids, prefix_mask, input_ids, attention_mask,
                                       group_index, impl=attention_impl)
    return LMOutput(hidden, *output_head(model), logit_transform("model", model.config))


#: Config fields by which a causal LM's logits differ from hidden @ W.T + b, each with how it acts: a factor
#: ("*": Cohere's and MPT's logit_scale, Falcon-H1's lm_head_multiplier, output_multiplier), a divisor ("/":
#: Granite's logits_scaling; HyperCLOVA X multiplies by its), or the tanh cap applied after them (Gemma 2's, and
#: Gemma 3's where set).
LOGIT_TRANSFORMS = {"logit_scale": "*", "logits_scaling": "/", "lm_head_multiplier": "*", "output_multiplier": "*",
                    "final_logit_softcapping": "cap"}
#: The transform of a model whose logits are hidden @ W.T + b.
LINEAR = (1.0, None)


def _positive(name: str, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name}: its config sets {field}={value!r}, which promptkd cannot apply as a logit "
                         f"transform (a finite number > 0 is needed)")
    return float(value)


def logit_transform(name: str, config) -> tuple[float, float | None]:
    """(scale, softcap) by which the model of ``config`` turns z = hidden @ W.T + b into its own logits,
    softcap * tanh(scale * z / softcap) (scale * z without a cap), read from the fields of
    :data:`LOGIT_TRANSFORMS`; what the fused losses take as ``*_logit_scale`` / ``*_softcap``. A value that is
    no positive number (MPT's ``logit_scale="inv_sqrt_d_model"``) is an InputError naming ``name``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale, softcap = 1.0, None
    for field, kind in LOGIT_TRANSFORMS.items():
        value = getattr(text, field, None)
        if value is None:
            continue
        value = _positive(name, field, value)
        if field == "logits_scaling" and getattr(text, "model_type", "").startswith("hyperclovax"):
            kind = "*"  # HyperCLOVA X multiplies by its logits_scaling where Granite divides
        if kind == "cap":
            softcap = value
        else:
            scale = scale * value if kind == "*" else scale / value
    return scale, softcap


def check_linear_logits(name: str, config, why: str = "") -> None:
    """Refuses a model whose config transforms its logits after the output head (:func:`logit_transform`),
    for a path that does not apply the transform (``why`` says which): it would silently compute another
    loss than the model's own logits give (an InputError naming ``name`` and the fields)."""
    if logit_transform(name, config) == LINEAR:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = ", ".join(f"{f}={getattr(text, f)!r}" for f in LOGIT_TRANSFORMS if getattr(text, f, None) is not None)
    raise InputError(f"{name}: its config sets {fields}, so its logits are not hidden @ W.T + b, and "
                     f"{why or 'this path'} applies no logit transform yet: it would compute a different result "
                     f"than the model's own logits give ({getattr(text, 'model_type', '?')} model)")


@torch.no_grad()
def probe_logits(name: str, model, tokens: int = 8) -> tuple[float, float | None]:
    """The model's logit transform (:func:`logit_transform`), checked on a few tokens: its own logits must be
    its final hidden states times its output head, transformed so. A transform no known config field names
    is thereby refused (an InputError naming the difference) before training rather than computed without."""
    from ..kd.reference import transform_logits

    transform = logit_transform(name, model.config)
    weight, bias = output_head(model)
    ids = (torch.arange(tokens, device=weight.device) % weight.shape[0])[None]
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        model.train(was_training)
    ours = transform_logits(torch.nn.functional.linear(hidden, weight, bias).float(), *transform)
    error = float("nan")
    if logits.shape == ours.shape:
        error = ((logits - ours).abs().max() / ours.abs().max().clamp(min=1e-6)).item()
    if not error <= 1e-2:
        raise InputError(f"{name}: the model's own logits are not its final hidden states times its output head "
                         f"(scaled by {transform[0]:g}, capped at {transform[1]}: its config's logit transform; "
                         f"relative difference {error:.3g} on {tokens} tokens, {type(model).__name__}): promptkd's "
                         f"losses would compute a different loss than its logits give")
    return transform


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's weight [V, H] and bias (or None). For a model sharded by
    :func:`promptkd.hf.fsdp.shard` whose head is tied to the input embedding, the weight is read where
    FSDP keeps it (the input embedding, gathered while the decoder's forward and backward need it).
    The model's logits are these times the hidden states, then :func:`logit_transform`."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    if head_tied_to_input(model):
        return model.get_input_embeddings().weight, bias
    return head.weight, bias


def _ce_chunk(hidden, weight, bias, labels, scale=1.0, softcap=None):
    from ..kd.reference import transform_logits

    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    logits = transform_logits(logits, scale, softcap)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _torch_chunked_applies(hidden, weight, bias) -> bool:
    """Whether torch's own chunked ``linear_cross_entropy`` (torch >= 2.13) takes these inputs here: float32
    throughout and a gradient wanted (without one, the recomputing path is a plain chunked forward)."""
    tensors = [hidden, weight] + ([] if bias is None else [bias])
    return (hasattr(torch.nn, "LinearCrossEntropyOptions") and all(t.dtype == torch.float32 for t in tensors)
            and torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def linear_cross_entropy(out: LMOutput, labels: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not -100, from hidden states and the output weight
    (0, with zero gradients, when no token counts). Logits exist one chunk of ``chunk_elements`` (64 MB
    in float32) at a time.

    Float32 inputs that want a gradient go to torch's ``torch.nn.functional.linear_cross_entropy`` with
    that chunk size (torch >= 2.13): it computes the gradients while a chunk's logits are at hand, three
    logit-sized GEMMs instead of four. On the CPU (N=2048, D=576, V=49152) it ran at 0.57x the time of
    :func:`recompute_cross_entropy`, 0.88-1.02x eager cross-entropy's at 0.12x its memory, 1.16x the
    GEMM floor, with errors no larger than either's (bench/bench_cross_entropy.py). Its automatic chunk
    size and precision policy are not used: on the CPU in float32 they ran 2.4x slower than eager.
    Everything else goes to :func:`recompute_cross_entropy`, as do outputs with a logit transform (``out.transform``:
    the cross-entropy is the one of the model's own, transformed logits).
    """
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
    labels = labels.reshape(-1)
    if out.transform != LINEAR or not _torch_chunked_applies(hidden, out.weight, out.bias):
        return recompute_cross_entropy(out, labels, chunk_elements)
    rows = max(1, chunk_elements // out.weight.shape[0])
    options = torch.nn.LinearCrossEntropyOptions(acc_policy="compact", chunking_method=None, batch_chunk_size=rows)
    total = torch.nn.functional.linear_cross_entropy(hidden, out.weight, labels, linear_bias=out.bias,
                                                     ignore_index=IGNORE_INDEX, reduction="sum", options=options)
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def recompute_cross_entropy(out: LMOutput, labels: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """:func:`linear_cross_entropy` for any dtype and torch version and any logit transform: logits (in float32,
    transformed as ``out.transform`` says) exist one chunk of tokens at a time and are recomputed in backward
    (activation checkpointing)."""
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
    labels = labels.reshape(-1)
    rows = max(1, chunk_elements // out.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        part = (hidden[start:start + rows], out.weight, out.bias, labels[start:start + rows], *out.transform)
        if torch.is_grad_enabled() and (hidden.requires_grad or out.weight.requires_grad):
            total = total + checkpoint(_ce_chunk, *part, use_reentrant=False)
        else:
            total = total + _ce_chunk(*part)
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

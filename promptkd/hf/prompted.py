"""A frozen Hugging Face causal LM with a trainable soft prompt whose keys/values are shared by the batch.

Under causal attention the prompt tokens see only each other, so their keys and values at every
layer are the same for all samples. :class:`PromptedTeacher` computes them once per call at batch
size 1 (inside the autograd graph: the prompt gets gradients) and runs the batch with that prefix
through :func:`promptkd.prefix_attention`. The result equals PEFT's prompt tuning, which
concatenates the prompt to every sample, at (P + N) / N less work and without a 4-D mask.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..files import write_atomic
from .attention import (
    ATTN_IMPLEMENTATION,
    PrefixRecorder,
    check_supported,
    positions_from_mask,
    record_prefix,
    register,
    shared_prefix_forward,
)
from .models import check_linear_logits, logit_transform, output_head

DEFAULT_INIT_TEXT = "Suppose you are a student."
INITS = ("text", "pad", "random")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class TeacherOutput:
    """What the distillation losses need (see :func:`promptkd.fused_linear_kd_loss`).

    hidden_states [B, N, H]: final hidden states at the input positions (not the prompt's);
    output_weight [V, H] and output_bias [V] or None: the output embedding, logits = h @ W.T + b, then
    ``logit_transform`` (scale, softcap) where the model has one (a fused loss takes it as
    ``teacher_logit_scale`` / ``teacher_softcap``; only with ``allow_logit_transform=True``);
    logits [B, N, V] (transformed) only when asked for.
    """

    hidden_states: torch.Tensor
    output_weight: torch.Tensor
    output_bias: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logit_transform: tuple[float, float | None] = (1.0, None)


def _layer_count(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def _check_shared(shared_prefix, input_ids: torch.Tensor):
    if not isinstance(shared_prefix, (tuple, list)) or len(shared_prefix) != 3:
        raise TypeError("shared_prefix must be a tuple (prefix_ids [G, P], prefix_mask [G, P], group_index [B])")
    prefix_ids, prefix_mask, group_index = shared_prefix
    for name, x in (("prefix_ids", prefix_ids), ("prefix_mask", prefix_mask), ("group_index", group_index)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"shared_prefix: {name} must be a torch.Tensor, got {type(x).__name__}")
    if prefix_ids.ndim != 2 or tuple(prefix_mask.shape) != tuple(prefix_ids.shape) or prefix_ids.shape[1] < 1:
        raise ValueError(f"shared_prefix: prefix_ids and prefix_mask must both be [G, P] with P >= 1, got "
                         f"{tuple(prefix_ids.shape)} and {tuple(prefix_mask.shape)}")
    if tuple(group_index.shape) != (input_ids.shape[0],):
        raise ValueError(f"shared_prefix: group_index must be [B={input_ids.shape[0]}], got {tuple(group_index.shape)}")
    return prefix_ids, prefix_mask, group_index


class PromptedTeacher(nn.Module):
    """A frozen causal LM (GPT-2, Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, OPT: :data:`SUPPORTED_MODEL_TYPES
    <promptkd.hf.attention.SUPPORTED_MODEL_TYPES>`) with a soft prompt of ``num_prompt_tokens``.

    The only trainable parameter is ``soft_prompt`` [P, E] (float32; E is the input-embedding size).
    Initialisation (``init``): ``"text"`` embeds ``init_text`` with ``tokenizer`` (token ids repeated
    or cut to P, as PEFT's text init does), ``"pad"`` repeats the pad token's embedding, ``"random"``
    draws like PEFT's random init; ``init_embeddings`` [P, E] overrides all of them.

    The wrapped model is frozen (requires_grad False), kept in eval mode (no dropout: the teacher is a
    fixed function of the prompt), and switched to the ``"promptkd_prefix"`` attention implementation,
    which still computes plain causal attention for callers that pass no prefix.
    ``gradient_checkpointing=True`` recomputes each decoder layer in backward (non-reentrant
    checkpoints; the prefix is read-only, so the recomputation reads what the forward read).
    ``attention_impl`` is the :func:`promptkd.prefix_attention` implementation its layers use
    (``auto``: the Triton kernels on CUDA, ``torch`` elsewhere; ``torch`` for a layer with an attention
    softcap, Gemma 2's). A model whose logits are transformed after its head (Gemma 2's final softcap:
    :func:`promptkd.hf.models.logit_transform`) is refused unless ``allow_logit_transform=True``, since its
    outputs are hidden states and a head; then the output's ``logit_transform`` must reach the loss.

    ``forward(input_ids, attention_mask)`` returns a :class:`TeacherOutput`. Positions continue after
    the prompt (P, P + 1, ...), as with concatenation; with an ``attention_mask`` each sample's
    positions count its real tokens, so left-padded batches give each sample its unpadded result.
    ``use_prompt=False`` (or ``with teacher.without_prompt():``) runs the same teacher without the
    prompt, from position 0.
    """

    def __init__(self, model: nn.Module, num_prompt_tokens: int = 7, *, init: str = "text",
                 init_text: str = DEFAULT_INIT_TEXT, tokenizer=None, init_embeddings: torch.Tensor | None = None,
                 gradient_checkpointing: bool = False, attention_impl: str = "auto",
                 allow_logit_transform: bool = False):
        super().__init__()
        from ..impls import ATTENTION_IMPLS

        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.attention_impl = attention_impl
        self.model_type = check_supported(model)
        self.logit_transform = logit_transform("model", model.config)
        if not allow_logit_transform:
            check_linear_logits("model", model.config, "PromptedTeacher without allow_logit_transform=True (its "
                                "outputs are hidden states and a head: the loss must then apply "
                                "TeacherOutput.logit_transform)")
        if isinstance(num_prompt_tokens, bool) or not isinstance(num_prompt_tokens, int) or num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be an int >= 1, got {num_prompt_tokens!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        embed = model.get_input_embeddings()
        if init_embeddings is not None:
            if not isinstance(init_embeddings, torch.Tensor):
                raise TypeError(f"init_embeddings must be a torch.Tensor, got {type(init_embeddings).__name__}")
            if tuple(init_embeddings.shape) != (num_prompt_tokens, embed.embedding_dim):
                raise ValueError(f"init_embeddings must be [num_prompt_tokens={num_prompt_tokens}, "
                                 f"{embed.embedding_dim}], got {tuple(init_embeddings.shape)}")
            prompt = init_embeddings.detach()
        elif init == "random":
            prompt = torch.empty(num_prompt_tokens, embed.embedding_dim).normal_()  # nn.Embedding's default init
        else:
            ids = self._init_ids(model, num_prompt_tokens, init, init_text, tokenizer)
            with torch.no_grad():
                prompt = embed(torch.tensor(ids, device=embed.weight.device))
        self.soft_prompt = nn.Parameter(prompt.to(device=embed.weight.device, dtype=torch.float32).clone())
        # The prompt it started from (not saved, not changed by load_prompt): how far training moved it.
        self.register_buffer("initial_prompt", self.soft_prompt.detach().clone(), persistent=False)

        model.requires_grad_(False)
        model.set_attn_implementation(register())
        self.model = model
        self.use_prompt = True
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if self.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # the newer name of the same switch
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.train(self.training)

    @staticmethod
    def _init_ids(model, length: int, init: str, text: str, tokenizer) -> list[int]:
        if init == "pad":
            pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
            pad = model.config.pad_token_id if pad is None else pad
            if pad is None:
                raise ValueError("init='pad' needs a pad token id: pass a tokenizer with pad_token_id or set "
                                 "model.config.pad_token_id")
            return [pad] * length
        if tokenizer is None:
            raise ValueError("init='text' needs tokenizer= (or pass init_embeddings=, or init='pad' / 'random')")
        ids = list(tokenizer(text)["input_ids"])
        if not ids:
            raise ValueError(f"init_text {text!r} tokenizes to no tokens")
        return (ids * math.ceil(length / len(ids)))[:length]

    @property
    def num_prompt_tokens(self) -> int:
        return self.soft_prompt.shape[0]

    def train(self, mode: bool = True):
        """Sets this module's mode; the wrapped model stays in eval mode (its decoder layers are marked
        training only so that gradient checkpointing engages, with their dropout off)."""
        super().train(mode)
        self.model.eval()
        if self.gradient_checkpointing and mode:
            from transformers.modeling_layers import GradientCheckpointingLayer

            for layer in self.model.modules():
                if isinstance(layer, GradientCheckpointingLayer):
                    layer.training = True
                    if isinstance(getattr(layer, "dropout", None), float):  # OPT's functional dropout
                        layer.dropout = 0.0
        return self

    @contextmanager
    def without_prompt(self):
        """Runs the teacher without the soft prompt inside the block (PromptKD's regulariser)."""
        previous, self.use_prompt = self.use_prompt, False
        try:
            yield self
        finally:
            self.use_prompt = previous

    def prompt_kv(self):
        """Per-layer keys/values of the prompt, computed at batch size 1 (a :class:`PrefixKV`)."""
        base = self.model.base_model
        embeds = self.soft_prompt.to(self.model.get_input_embeddings().weight.dtype)[None]
        positions = torch.arange(self.num_prompt_tokens, device=embeds.device)[None]
        return record_prefix(base, _layer_count(self.model), PrefixRecorder(), inputs_embeds=embeds,
                             position_ids=positions, promptkd_impl=self.attention_impl)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                use_prompt: bool | None = None, return_logits: bool = False,
                shared_prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> TeacherOutput:
        """The teacher's final hidden states at ``input_ids`` (after the soft prompt unless disabled).

        ``shared_prefix=(prefix_ids [G, P], prefix_mask [G, P], group_index [B])``: the rows of
        ``input_ids`` continue right-padded shared prefixes (several responses to one instruction);
        each prefix runs once, after the soft prompt, and the rows attend to [soft prompt; prefix]
        (:func:`promptkd.hf.attention.shared_prefix_forward`). ``attention_mask`` is then required.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a [B, N] tensor, got {getattr(input_ids, 'shape', input_ids)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if self.model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"the wrapped model's attention implementation was changed to "
                               f"{self.model.config._attn_implementation!r}; PromptedTeacher needs "
                               f"'{ATTN_IMPLEMENTATION}'")
        prompted = self.use_prompt if use_prompt is None else use_prompt
        if attention_mask is None:
            if shared_prefix is not None:
                raise ValueError("shared_prefix needs the rows' attention_mask")
            # An explicit mask of ones: without one, transformers inspects input_ids and position ids on
            # the host (padding warnings, packed-sequence detection), which waits for the device.
            attention_mask = torch.ones_like(input_ids)
        prefix = self.prompt_kv() if prompted else None
        if shared_prefix is not None:
            prefix_ids, prefix_mask, group_index = _check_shared(shared_prefix, input_ids)
            hidden = shared_prefix_forward(self.model.base_model, _layer_count(self.model), prefix_ids, prefix_mask,
                                           input_ids, attention_mask, group_index, outer=prefix,
                                           impl=self.attention_impl)
        else:
            positions = positions_from_mask(attention_mask, self.num_prompt_tokens if prompted else 0)
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=positions, use_cache=False, promptkd_prefix=prefix,
                                           promptkd_impl=self.attention_impl).last_hidden_state
        weight, bias = output_head(self.model)
        logits = None
        if return_logits:
            from ..kd.reference import transform_logits

            logits = transform_logits(torch.nn.functional.linear(hidden, weight, bias), *self.logit_transform)
        return TeacherOutput(hidden, weight, bias, logits, self.logit_transform)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The wrapped model's ``generate`` after the soft prompt: the prompt's embeddings are put before each row's
        (left-padded) tokens, as with concatenation (a row's real tokens continue at positions P, P + 1, ...,
        :meth:`forward`'s positions). Returns ``input_ids`` followed by the new tokens, as ``generate`` with
        ``input_ids`` does, so callers such as :func:`promptkd.train.evaluate.sample` take it unchanged. The keyword
        arguments are ``generate``'s (``return_dict_in_generate`` is refused: only the ids come back)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a [B, N] tensor, got {getattr(input_ids, 'shape', input_ids)}")
        if kwargs.get("return_dict_in_generate"):
            raise ValueError("PromptedTeacher.generate returns token ids; return_dict_in_generate is not supported")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        embed = self.model.get_input_embeddings()
        b, p = input_ids.shape[0], self.num_prompt_tokens
        prompt = self.soft_prompt.to(embed.weight.dtype)[None].expand(b, -1, -1)
        embeds = torch.cat([prompt, embed(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        new = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    # ---- saving and loading as a PEFT prompt-tuning adapter ----

    def save_prompt(self, directory: str, base_model_name_or_path: str | None = None) -> None:
        """Writes a PEFT prompt-tuning adapter (adapter_config.json, adapter_model.safetensors) that
        ``peft.PeftModel.from_pretrained(model, directory)`` loads. Files are written atomically."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        text = self.model.config.get_text_config()
        config = {
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": self.num_prompt_tokens,
            "token_dim": self.soft_prompt.shape[1], "num_transformer_submodules": 1,
            "num_attention_heads": text.num_attention_heads, "num_layers": text.num_hidden_layers,
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "revision": None, "modules_to_save": None, "auto_mapping": None,
        }
        weights = {"prompt_embeddings": self.soft_prompt.detach().to("cpu").contiguous()}
        write_atomic(os.path.join(directory, ADAPTER_WEIGHTS),
                      lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))

        def write_config(tmp):
            with open(tmp, "w") as f:
                json.dump(config, f, indent=2)

        write_atomic(os.path.join(directory, ADAPTER_CONFIG), write_config)

    def load_prompt(self, directory: str) -> None:
        """Loads the soft prompt of a PEFT prompt-tuning adapter directory (ours or PEFT's)."""
        from safetensors.torch import load_file

        config_path = os.path.join(directory, ADAPTER_CONFIG)
        if not os.path.isfile(config_path):
            raise ValueError(f"directory: no {ADAPTER_CONFIG} in {directory!r}")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("peft_type") != "PROMPT_TUNING":
            raise ValueError(f"directory: {directory!r} holds a {config.get('peft_type')!r} adapter, "
                             "not PROMPT_TUNING")
        weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
        if os.path.isfile(weights_path):
            weights = load_file(weights_path)
        elif os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            weights = torch.load(os.path.join(directory, "adapter_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"directory: no {ADAPTER_WEIGHTS} in {directory!r}")
        prompt = weights.get("prompt_embeddings")
        if prompt is None or tuple(prompt.shape) != tuple(self.soft_prompt.shape):
            got = None if prompt is None else tuple(prompt.shape)
            raise ValueError(f"directory: prompt_embeddings of shape {got}, expected {tuple(self.soft_prompt.shape)}")
        with torch.no_grad():
            self.soft_prompt.copy_(prompt)

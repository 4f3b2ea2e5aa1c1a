"""A causal LM's output head alone: what a trainer needs to apply a served teacher's hidden states.

``load_head("teacher", path)`` returns the head's weight [V, D], its bias or None and the model's logit
transform (:func:`~promptkd.hf.models.logit_transform`: scale and softcap from the config), without the rest of
the weights where the model is a directory of safetensors: the head's parameter names are read off the model
built on the ``meta`` device (no memory; a head tied to the input embedding has both names), and only those
tensors are read from the files. Other sources (a ``.gguf`` file, ``.bin`` weights, a hub name) are loaded whole
once, on the CPU, and all but the head dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..errors import InputError
from . import gguf
from .models import check_model_path, load_config, load_model, logit_transform


@dataclass
class Head:
    """An output head: logits = transform(hidden @ weight.T + bias)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: tuple[float, float | None]
    source: str  # "safetensors" (the head's tensors only) or "model" (loaded whole, the rest dropped)


def _head_names(config) -> tuple[list[str], list[str]]:
    """The parameter names a checkpoint may store the head's weight (and bias) under, most specific first."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    named = list(model.named_parameters(remove_duplicate=False))
    weights = [n for n, p in named if p is head.weight]
    bias = getattr(head, "bias", None)
    biases = [n for n, p in named if bias is not None and p is bias]
    embedding = model.get_input_embeddings()
    if embedding is not None and embedding.weight is not head.weight and getattr(config, "tie_word_embeddings", False):
        weights += [n for n, p in named if p is embedding.weight]  # tied at load time, stored once as the embedding
    return weights, biases


def _safetensors_files(path: str) -> dict[str, str] | None:
    """Tensor name -> file of a directory's safetensors weights (None when it has none)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            mapping = json.load(f).get("weight_map", {})
        return {name: os.path.join(path, file) for name, file in mapping.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return None


def _read(files: dict[str, str], names: list[str]) -> torch.Tensor | None:
    from safetensors import safe_open

    for name in names:
        if name in files:
            with safe_open(files[name], framework="pt") as f:
                return f.get_tensor(name)
    return None


def load_head(name: str, path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Head:
    """The output head of the causal LM at ``path`` in ``dtype`` on ``device`` (see the module docstring);
    an InputError naming ``name`` when it cannot be found."""
    check_model_path(name, path)
    config = load_config(name, path)
    transform = logit_transform(name, config)
    files = None if gguf.is_gguf(path) or not os.path.isdir(path) else _safetensors_files(path)
    if files is not None:
        try:
            weights, biases = _head_names(config)
        except (ValueError, TypeError, RuntimeError, NotImplementedError):
            weights, biases = [], []  # a model that cannot be built on meta: loaded whole below
        weight = _read(files, weights) if weights else None
        if weight is not None:
            bias = _read(files, biases) if biases else None
            if biases and bias is None:
                raise InputError(f"{name}: {path!r} has the output head's weight but not its bias ({biases[0]})")
            return Head(weight.to(device, dtype), None if bias is None else bias.to(device, dtype), transform,
                        "safetensors")
    model = load_model(name, path, dtype, "cpu")
    head = model.get_output_embeddings()
    weight = head.weight.detach().to(device, dtype, copy=True)
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.detach().to(device, dtype, copy=True)
    del model
    return Head(weight, bias, transform, "model")

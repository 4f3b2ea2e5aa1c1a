"""The model families promptkd supports, in one registry: every list of them (prefix attention and the prompted
teacher, layer dropping, help texts, errors, the documentation) comes from :data:`FAMILIES`, and
``tests/test_families.py`` checks the documents against it.

A family is a Hugging Face ``model_type`` whose attention calls transformers' attention interface with q, k, v
as [B, H, N, D] and carries ``layer_idx`` (so ``promptkd_prefix`` attention can take its place), with its
decoder layers at a known path of the causal LM (layer dropping). Adding one: DESIGN.md, "Where to add".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str  # the config's model_type
    name: str        # as the documentation writes it
    layers: str      # where the causal LM keeps its decoder layers (attribute path)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "GPT-2", "transformer.h"),
    Family("llama", "Llama", "model.layers"),
    Family("mistral", "Mistral", "model.layers"),
    Family("qwen2", "Qwen2", "model.layers"),
    Family("qwen3", "Qwen3", "model.layers"),
    Family("phi3", "Phi-3", "model.layers"),
    Family("gemma2", "Gemma 2", "model.layers"),
    Family("gemma3_text", "Gemma 3", "model.layers"),
    Family("opt", "OPT", "model.decoder.layers"),
)}

#: The supported ``model_type`` values, in the registry's order.
MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_names(sep: str = ", ") -> str:
    """The families as the documentation lists them: ``GPT-2, Llama, ..., OPT``."""
    return sep.join(f.name for f in FAMILIES.values())


def unsupported(what: str, model_type) -> str:
    """The message for a model of another family: what cannot take it, and the families that can."""
    return (f"{what} does not support {model_type!r} models; supported families: {family_names()} "
            f"(model types {', '.join(MODEL_TYPES)})")

"""A student initialised from its teacher by dropping decoder layers (as DistilBERT and Minitron do).

The student is the teacher with some of its decoder layers removed: the embeddings, the kept layers,
the final norm, the output head and the config (layer count and per-layer settings) are the
teacher's, the kept layers renumbered 0, 1, ... in the teacher's order. Keeping every layer gives
the teacher back, logits included (tests/test_layer_drop.py).

    promptkd init-student --teacher PATH (--layers 0,3,6 | --keep N) --out DIR [--overwrite]

``PATH`` is a model directory, a hub name or a ``.gguf`` file (:mod:`promptkd.hf.gguf`); ``DIR``
receives an ordinary Hugging Face model directory (config, safetensors weights, generation config and
the teacher's tokenizer) that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from ..errors import InputError
from ..files import publish_dir
from .families import FAMILIES, unsupported

#: Where each family keeps its decoder layers, from the causal LM (the registry's, :mod:`promptkd.hf.families`).
LAYER_LISTS = {model_type: family.layers for model_type, family in FAMILIES.items()}


def num_layers(config) -> int:
    return config.get_text_config().num_hidden_layers


def check_family(config) -> None:
    if config.model_type not in LAYER_LISTS:
        raise InputError(unsupported("layer dropping", config.model_type))


def spread(n: int, total: int) -> list[int]:
    """``n`` of ``total`` layer indices spread evenly, the first and the last included (``n=1``: the
    first): index ``i`` is ``round(i * (total - 1) / (n - 1))``, halves rounded up, so distinct."""
    if not 1 <= n <= total:
        raise InputError(f"--keep must lie in [1, {total}] (the teacher's layers), got {n}")
    if n == 1:
        return [0]
    return [(2 * i * (total - 1) + n - 1) // (2 * (n - 1)) for i in range(n)]


def parse_layers(text: str) -> list[int]:
    """``"0,3,6"`` -> ``[0, 3, 6]``; refuses anything but comma-separated integers."""
    parts = [p.strip() for p in text.split(",")]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--layers must be comma-separated layer indices like 0,3,6, got {text!r}") from None


def check_layers(keep: list[int], total: int) -> None:
    """The kept layers: at least one, each in [0, total), strictly ascending (no repeats)."""
    if not keep:
        raise InputError("--layers: keep at least one layer")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise InputError(f"--layers: the teacher has layers 0..{total - 1}, got {bad}")
    repeated = sorted({i for i in keep if keep.count(i) > 1})
    if repeated:
        raise InputError(f"--layers: layer(s) {repeated} listed more than once")
    if keep != sorted(keep):
        raise InputError(f"--layers must be in ascending order (layers keep the teacher's order), got {keep}")


def layer_list(model) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the module holding the decoder layers, its attribute name, the layers)."""
    check_family(model.config)
    *path, attr = LAYER_LISTS[model.config.model_type].split(".")
    parent = model
    for name in path:
        parent = getattr(parent, name)
    return parent, attr, getattr(parent, attr)


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keeps the decoder layers ``keep`` (ascending teacher indices) of a causal LM, in place; returns it.

    The kept layer modules are the teacher's own (no copy), renumbered: every ``layer_idx`` under them
    (the index a KV cache and prefix attention use) becomes its new position. The config follows:
    ``num_hidden_layers`` (``n_layer`` for GPT-2) and ``layer_types`` where the config has one. A GPT-2
    that scales attention by its inverse layer index would compute differently in renumbered layers
    and is refused unless only the leading layers are kept.
    """
    parent, attr, layers = layer_list(model)
    check_layers(keep, len(layers))
    config = model.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and keep != list(range(len(keep))):
        raise InputError("this GPT-2 scales attention by 1 / (layer index + 1) "
                         "(scale_attn_by_inverse_layer_idx): only the leading layers 0..N-1 can be kept")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    setattr(parent, attr, kept)
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return model


def _load_tokenizer(path: str):
    """The teacher's tokenizer as it is (no pad token added), or None where the teacher has none."""
    from transformers import AutoTokenizer

    from . import gguf
    from .models import has_tokenizer

    if gguf.is_gguf(path):
        return gguf.load_tokenizer("teacher", path)
    if not has_tokenizer(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"teacher: could not load a tokenizer from {path!r}: {e}") from None


def check_out(out: str, overwrite: bool, teacher: str) -> None:
    if not out:
        raise InputError("--out is not set")
    real_out, real_teacher = os.path.realpath(out), os.path.realpath(teacher)
    if os.path.exists(teacher) and os.path.commonpath([real_out, real_teacher]) == real_out:
        raise InputError(f"--out {out!r} holds the teacher {teacher!r}: writing the student there would replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InputError(f"--out {out!r} is not empty: choose another directory, or pass --overwrite to replace it")


def init_student(teacher: str, out: str, layers: list[int] | None = None, keep: int | None = None,
                 overwrite: bool = False, dtype: torch.dtype | str = "auto") -> list[int]:
    """Writes to ``out`` the teacher with only the decoder layers ``layers`` (ascending indices), or ``keep``
    layers spread evenly (:func:`spread`); returns the kept teacher indices.

    ``dtype``: the student's (``"auto"``: as the teacher is stored). Everything is checked before the
    teacher's weights are read; the directory is written under a temporary name beside ``out`` and
    renamed into place when complete (``--overwrite`` replaces an existing one the same way).
    """
    from .models import load_config, load_model

    if (layers is None) == (keep is None):
        raise InputError("give either --layers or --keep")
    check_out(out, overwrite, teacher)
    config = load_config("teacher", teacher)
    check_family(config)
    total = num_layers(config)
    if keep is not None:
        layers = spread(keep, total)
    check_layers(layers, total)
    tokenizer = _load_tokenizer(teacher)
    model = drop_layers(load_model("teacher", teacher, dtype, torch.device("cpu")), layers)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out), f".tmp-{os.path.basename(out)}")  # a crashed run's is cleared
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return layers

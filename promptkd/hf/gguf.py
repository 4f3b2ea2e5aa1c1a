"""Models, tokenizers and configs from GGUF files (llama.cpp's format), read by transformers.

A path ending in ``.gguf`` names a local GGUF file wherever promptkd takes a model path (``student``,
``teacher``, ``tokenizer``, ``promptkd eval --model``, ``promptkd init-student --teacher``). transformers
reads it with ``from_pretrained(folder, gguf_file=name)``: the config and the tokenizer from the file's
metadata, the weights dequantised to the dtype asked for. Its GGUF loader needs the ``gguf`` package
(>= 0.10) and ``accelerate``: ``pip install 'promptkd[gguf]'``.

transformers marks a model read from a GGUF file as quantised (an ``hf_quantizer`` and
``config.quantization_config``) and then refuses ``save_pretrained``, which the trainer's checkpoints
and ``init-student`` need. :func:`load_model` returns a plain model: it asks for dense weights
(``GgufConfig(dequantize=True)``, with which transformers drops the marks itself), and where a
transformers without ``GgufConfig`` leaves them on dequantised weights, :func:`make_plain` drops them
with the quantiser's own ``remove_quantization_config``. The model then saves as an ordinary
checkpoint that loads back with the same logits (tests/test_gguf.py).
"""

from __future__ import annotations

import importlib.metadata
import os

import torch

from ..errors import InputError

INSTALL = "pip install 'promptkd[gguf]'"
GGUF_MIN_VERSION = "0.10.0"  # transformers' own minimum for its GGUF loader


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(".gguf")


def missing_packages() -> list[str]:
    """What transformers' GGUF loader needs and this environment lacks (empty when it can load one)."""
    from packaging.version import Version

    missing = []
    try:
        if Version(importlib.metadata.version("gguf")) < Version(GGUF_MIN_VERSION):
            missing.append(f"gguf>={GGUF_MIN_VERSION} (found {importlib.metadata.version('gguf')})")
    except importlib.metadata.PackageNotFoundError:
        missing.append(f"gguf>={GGUF_MIN_VERSION}")
    try:
        importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError:
        missing.append("accelerate")
    return missing


def check_gguf_path(name: str, path: str) -> None:
    """A GGUF model is a local file that transformers can read here."""
    if not os.path.isfile(path):
        raise InputError(f"{name}: GGUF file {path!r} does not exist (a .gguf model must be a local file)")
    missing = missing_packages()
    if missing:
        raise InputError(f"{name}: loading the GGUF file {path!r} needs {' and '.join(missing)}: {INSTALL}")


def _split(path: str) -> tuple[str, str]:
    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


def _unreadable(name: str, path: str, what: str, error: Exception) -> InputError:
    return InputError(f"{name}: could not read {what} from the GGUF file {path!r}: {type(error).__name__}: {error}")


def _from_gguf(auto_class: str, name: str, path: str, what: str, **kwargs):
    """``transformers.<auto_class>.from_pretrained`` on a GGUF file, its read errors an InputError naming ``what``."""
    import transformers

    check_gguf_path(name, path)
    folder, file = _split(path)
    try:
        return getattr(transformers, auto_class).from_pretrained(folder, gguf_file=file, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise _unreadable(name, path, what, e) from None


def load_config(name: str, path: str):
    """The model config stated by a GGUF file's metadata (no weights are read)."""
    return _from_gguf("AutoConfig", name, path, "a model config")


def load_model(name: str, path: str, dtype: torch.dtype | str):
    """A causal LM from a GGUF file, its weights dequantised to ``dtype`` (``"auto"``: the file's float
    type), returned as a plain model that ``save_pretrained`` accepts."""
    kwargs = {}
    try:  # newer transformers can keep some architectures' blocks packed (untrainable): ask for dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older ones always dequantise
        pass
    return make_plain(_from_gguf("AutoModelForCausalLM", name, path, "a causal LM", dtype=dtype, **kwargs))


def make_plain(model):
    """Drops the quantisation marks of a model whose weights transformers has dequantised, in place;
    returns it. Refuses (RuntimeError) a model that still holds packed, non-float weights."""
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"the model still holds packed GGUF weights ({', '.join(packed[:3])}, ...): "
                           "it cannot be trained or saved")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_tokenizer(name: str, path: str):
    """The tokenizer a GGUF file describes (its vocabulary, merges, special tokens, chat template)."""
    return _from_gguf("AutoTokenizer", name, path, "a tokenizer")
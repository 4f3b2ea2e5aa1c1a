"""The arguments of a cache run, checked before anything loads (InputError naming the argument)."""

from __future__ import annotations

import math
import os

from ...errors import InputError, InputTypeError
from .format import HIDDEN_DTYPES, LOGPROB_DTYPES


def _int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InputError(f"{name} must be {bound}, got {value}")
    return value


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def cache_mode(top_k, samples, hidden) -> str:
    """``top_k``, ``samples`` or ``hidden``: which of the three a run asked for (exactly one, checked before)."""
    return "hidden" if hidden else "top_k" if top_k is not None else "samples"


def resolve_dtype(dtype, hidden) -> str:
    """The stored dtype: as given, or the mode's default (float16 log-probabilities, bfloat16 hidden states)."""
    return dtype if dtype is not None else "bfloat16" if hidden else "float16"


def check_run_args(data, out, *, top_k=None, samples=None, hidden=False, temperature=1.0, max_length=512,
                   max_prompt_length=256, batch_size=8, dtype=None, seed=0, shard_mb=256.0, tokenizer=None,
                   vocab_size=None, device="auto", resume=False, overwrite=False, name=str) -> None:
    """What every cache run checks, whatever its teacher: ``name(argument)`` names an argument as the caller
    spells it (``--top-k`` on the command line)."""
    from ...hf.models import check_model_path
    from ..config import check_device

    if not isinstance(hidden, bool):
        raise InputTypeError(f"{name('hidden')} must be true or false, got {hidden!r}")
    asked = [n for n, given in (("top_k", top_k is not None), ("samples", samples is not None), ("hidden", hidden))
             if given]
    if len(asked) != 1:
        raise InputError(f"give exactly one of {name('top_k')} (the k most likely ids), {name('samples')} (ids drawn "
                         f"from the teacher) and {name('hidden')} (the teacher's final hidden states), got "
                         f"{' and '.join(name(n) for n in asked) if asked else 'none'}")
    if top_k is not None:
        _int(name("top_k"), top_k, 1)
    elif samples is not None:
        _int(name("samples"), samples, 1)
    _positive(name("temperature"), temperature)
    if hidden and temperature != 1.0:
        raise InputError(f"{name('temperature')}={temperature:g} with {name('hidden')}: hidden states hold no "
                         "temperature (the loss applies the trainer's); leave it at 1")
    _int(name("max_length"), max_length, 2)
    _int(name("max_prompt_length"), max_prompt_length, 1)
    if max_prompt_length >= max_length:
        raise InputError(f"{name('max_prompt_length')} ({max_prompt_length}) must be < {name('max_length')} "
                         f"({max_length})")
    _int(name("batch_size"), batch_size, 1)
    dtypes = HIDDEN_DTYPES if hidden else LOGPROB_DTYPES
    dtype = resolve_dtype(dtype, hidden)
    if dtype not in dtypes:
        what = "hidden states" if hidden else "log-probabilities"
        raise InputError(f"{name('dtype')} must be one of {tuple(dtypes)} for stored {what}, got {dtype!r}")
    _int(name("seed"), seed, 0, 2**63 - 1)
    _positive(name("shard_mb"), shard_mb)
    if vocab_size is not None:
        _int(name("vocab_size"), vocab_size, 1)
    for key, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise InputTypeError(f"{name(key)} must be true or false, got {value!r}")
    if resume and overwrite:
        raise InputError(f"{name('resume')} and {name('overwrite')} exclude each other: continue the cache in "
                         f"{out!r}, or replace it")
    if not isinstance(device, str):
        raise InputTypeError(f"{name('device')} must be a string, got {device!r}")
    check_device(device)
    for key, value in (("data", data), ("out", out)):
        if not isinstance(value, str) or not value:
            raise InputError(f"{name(key)} must be a non-empty path, got {value!r}")
    if tokenizer:
        check_model_path(name("tokenizer"), tokenizer)
    if not os.path.isfile(data):
        raise InputError(f"{name('data')}: no file {data!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{name('out')} {out!r} is a file, not a directory")


def flag_names(flags: bool):
    """How arguments are named in messages: as keywords (``top_k``) or, with ``flags``, as options (``--top-k``)."""
    return (lambda n: "--" + n.replace("_", "-")) if flags else str


def check_cache_args(teacher, data, out, *, top_k=None, samples=None, hidden=False, temperature=1.0, max_length=512,
                     max_prompt_length=256, batch_size=8, dtype=None, seed=0, shard_mb=256.0, tokenizer=None,
                     vocab_size=None, device="auto", resume=False, overwrite=False, flags: bool = False) -> None:
    """Everything :func:`~promptkd.train.teacher_cache.cache_teacher` checks before it loads anything
    (InputError naming the argument; ``flags``: named as the command line's options, ``--top-k``)."""
    from .source import InProcessTeacher

    name = flag_names(flags)
    if not isinstance(teacher, str) or not teacher:
        raise InputError(f"{name('teacher')} must be a non-empty path, got {teacher!r}")
    check_run_args(data, out, top_k=top_k, samples=samples, hidden=hidden, temperature=temperature,
                   max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size, dtype=dtype,
                   seed=seed, shard_mb=shard_mb, tokenizer=tokenizer, vocab_size=vocab_size, device=device,
                   resume=resume, overwrite=overwrite, name=name)
    InProcessTeacher(teacher).check(name, cache_mode(top_k, samples, hidden), temperature)

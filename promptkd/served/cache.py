"""``promptkd cache-teacher --server URL``: the teacher cache written from a served teacher."""

from __future__ import annotations

from collections.abc import Callable

from ..train.teacher_cache.checks import cache_mode, check_run_args, flag_names
from ..train.teacher_cache.writer import write_cache
from .source import ServedTeacher


def check_server_args(server, data, out, *, tokenizer=None, api="vllm", model=None, concurrency=8, timeout=120.0,
                      retries=4, backoff=0.5, top_k=None, samples=None, hidden=False, temperature=1.0, max_length=512,
                      max_prompt_length=256, batch_size=64, dtype=None, seed=0, shard_mb=256.0, vocab_size=None,
                      resume=False, overwrite=False, flags: bool = False) -> ServedTeacher:
    """Everything :func:`cache_from_server` checks before it sends a request (InputError naming the argument);
    returns the source."""
    name = flag_names(flags)
    check_run_args(data, out, top_k=top_k, samples=samples, hidden=hidden, temperature=temperature,
                   max_length=max_length,
                   max_prompt_length=max_prompt_length, batch_size=batch_size, dtype=dtype, seed=seed,
                   shard_mb=shard_mb, tokenizer=tokenizer, vocab_size=vocab_size, device="cpu", resume=resume,
                   overwrite=overwrite, name=name)
    source = ServedTeacher(server, api, model, tokenizer, concurrency=concurrency, timeout=timeout, retries=retries,
                           backoff=backoff)
    source.check(name, cache_mode(top_k, samples, hidden), temperature)
    return source


def cache_from_server(server: str, data: str, out: str, *, tokenizer: str, top_k: int | None = None,
                      hidden: bool = False, api: str = "vllm",
                      model: str | None = None, concurrency: int = 8, timeout: float = 120.0, retries: int = 4,
                      backoff: float = 0.5, temperature: float = 1.0, max_length: int = 512,
                      max_prompt_length: int = 256, batch_size: int = 64, dtype: str | None = None,
                      shard_mb: float = 256.0, vocab_size: int | None = None, resume: bool = False,
                      overwrite: bool = False, log=print, on_batch: Callable[[int], None] | None = None) -> dict:
    """The teacher served at ``server`` (``api``: ``vllm`` or ``sglang``) over the training file ``data``, its top-k
    targets (plus the label where it is not among them) or, with ``hidden`` (a vLLM pooling server), its final
    hidden states, written to ``out`` as
    :func:`~promptkd.train.teacher_cache.cache_teacher` writes them; returns the manifest.

    ``tokenizer``: the student's (the examples are encoded with it; the server's must agree); ``model``: the
    served name (default: the only one); ``concurrency`` requests in flight, each given ``timeout`` seconds and
    ``retries`` more tries on timeouts, connection errors and 5xx, ``backoff * 2**i`` seconds apart;
    ``batch_size`` examples per round of requests (a few times ``concurrency`` keeps the server busy). The other
    arguments are ``cache_teacher``'s. A run that stops (the server gone after its retries) keeps every finished
    shard: ``resume=True`` finishes it."""
    options = dict(top_k=top_k, hidden=hidden, temperature=temperature, max_length=max_length,
                   max_prompt_length=max_prompt_length, batch_size=batch_size, dtype=dtype, shard_mb=shard_mb,
                   vocab_size=vocab_size, resume=resume,
                   overwrite=overwrite)
    source = check_server_args(server, data, out, tokenizer=tokenizer, api=api, model=model, concurrency=concurrency,
                               timeout=timeout, retries=retries, backoff=backoff, **options)
    return write_cache(source, data, out, **options, tokenizer=tokenizer, device="cpu", log=log, on_batch=on_batch)

"""The cache's format: file names, the manifest and settings records, how ids are stored, the sampled rows' Philox
keys, and the fingerprints a cache is checked against (the package docstring describes the directory)."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ...errors import InputError
from ..data import TEMPLATE, TEMPLATE_WITH_INPUT

FORMAT = "promptkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS_FILE = "cache.json"
MODES = ("top_k", "samples", "hidden")
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: What ``hidden`` caches store the teacher's final hidden states as (bfloat16: float32's range at half the bytes).
HIDDEN_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: uint16 ids serve vocabularies up to this size; the value itself then means "no target".
NO_ID_UINT16 = 65535
#: The fourth counter word of the Philox call that derives each row's key (:func:`row_keys`): "kdrk".
ROW_KEY_WORD = 0x6B64726B
MASK32 = 0xFFFFFFFF
MIB = 2**20
#: The settings a resumed run must share with the run it continues (``cache.json``).
RESUME_SETTINGS = ("teacher_sha256", "tokenizer_sha256", "data_sha256", "template_sha256", "max_length",
                   "max_prompt_length", "mode", "k", "samples", "temperature", "dtype", "vocab_size", "seed",
                   "batch_size", "shard_mb", "processes")
#: What the manifest repeats of the settings (the rest of it: the shards, their totals, the run's measurements).
MANIFEST_SETTINGS = ("format", "format_version", "promptkd_version", "teacher", "tokenizer", "data", "template_sha256",
                     "max_length", "max_prompt_length", "mode", "k", "samples", "temperature",
                     "teacher_logit_transform", "dtype", "id_dtype", "vocab_size", "seed", "batch_size", "shard_mb",
                     "processes")


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:03d}-{index:05d}.safetensors"


def progress_name(rank: int) -> str:
    return f"progress-rank{rank}.json"


def lock_path(out: str, rank: int = 0) -> str:
    """The lock file the process writing ``rank``'s shards of the cache in ``out`` holds (``flock``)."""
    return os.path.join(out, f"lock-rank{rank}")


def own_file(name: str) -> bool:
    """Whether ``name`` is one of a cache's own files (lock files aside), or a temporary one of those."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:].rsplit(".", 2)[0]  # write_atomic's ".<name>.<random>.tmp"
    return (name in (MANIFEST, SETTINGS_FILE) or (name.startswith("progress-rank") and name.endswith(".json"))
            or (name.startswith("shard-") and name.endswith(".safetensors")))


def cache_files(out: str) -> list[str]:
    """The cache's own files in ``out`` (complete or partial, temporary ones included), sorted."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if own_file(n))


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None


def differences(saved: dict, current: dict) -> list[str]:
    """The resume settings (:data:`RESUME_SETTINGS`) that differ, as ``key: saved -> current``."""
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in RESUME_SETTINGS
            if saved.get(key) != current.get(key)]


def manifest(settings: dict, shards: list[dict], measured: dict) -> dict:
    """The manifest of a complete cache: the settings it repeats, every shard in order and their totals."""
    tokens = sum(s["tokens"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    return {**{key: settings[key] for key in MANIFEST_SETTINGS},
            "num_examples": shards[-1]["examples"][1] if shards else 0, "num_tokens": tokens, "bytes": size,
            "shards": shards, "measured": dict(measured, bytes_per_token=round(size / max(tokens, 1), 3))}


def stored_dtype(mode: str, dtype: str) -> torch.dtype:
    """The torch dtype a cache of ``mode`` stores its values (log-probabilities, or hidden states) in."""
    return (HIDDEN_DTYPES if mode == "hidden" else LOGPROB_DTYPES)[dtype]


def check_width(mode: str, k: int, vocab_size: int) -> None:
    """Top-k targets cannot name more ids than the vocabulary has."""
    if mode == "top_k" and k > vocab_size:
        raise InputError(f"top_k={k} exceeds the vocabulary ({vocab_size})")


# ---------------------------------------------------------------- encodings and keys


def id_dtype_for(vocab_size: int) -> str:
    """``"uint16"`` when every id and the "no target" mark (65535) fit 16 bits, else ``"int32"``."""
    return "uint16" if vocab_size <= NO_ID_UINT16 else "int32"


def row_bytes(k: int, id_dtype: str | None, dtype: str) -> int:
    """Bytes a stored row of ``k`` targets takes: its ids and its log-probabilities (a hidden state's ``k`` values:
    no ids)."""
    ids = 0 if id_dtype is None else 2 if id_dtype == "uint16" else 4
    return k * (ids + (4 if dtype == "float32" else 2))


def encode_ids(ids: torch.Tensor, id_dtype: str) -> torch.Tensor:
    """int64 ids (-1: no target) as stored: uint16 with 65535 for -1, or int32 with -1."""
    if id_dtype == "uint16":
        return torch.where(ids < 0, NO_ID_UINT16, ids).to(torch.int32).to(torch.uint16)
    return ids.to(torch.int32)


def decode_ids(stored: torch.Tensor) -> torch.Tensor:
    """Stored ids back to int64 with -1 for "no target" (the inverse of :func:`encode_ids`)."""
    ids = stored.to(torch.int32).to(torch.int64)
    if stored.dtype == torch.uint16:
        ids = torch.where(ids == NO_ID_UINT16, -1, ids)
    return ids


def row_keys(seed: int, examples: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The Philox keys (int64 bits of uint64) of sampled rows: example indices [N] and positions [N] (the row's
    place among its example's counted rows) under ``seed``. See the package docstring for the formula."""
    from ...sparse.philox import philox

    examples, positions = examples.long(), positions.long()
    key = torch.full_like(examples, seed)
    w0, w1, _, _ = philox(key, examples & MASK32, (examples >> 32) & MASK32, positions & MASK32,
                          torch.full_like(examples, ROW_KEY_WORD))
    high = torch.where(w1 >= 2**31, w1 - 2**32, w1)  # w1 as a signed 32-bit word: the shift cannot overflow
    return high * 2**32 + w0


# ---------------------------------------------------------------- fingerprints


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(value) -> bytes:
    """``value`` as canonical JSON bytes (sorted keys, no spaces): what fingerprints hash."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a canonical JSON of the tokenizer's vocabulary and its bos / eos / pad ids."""
    return sha256_bytes(canonical({"vocab": tokenizer.get_vocab(), "bos_token_id": tokenizer.bos_token_id,
                                   "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))


def template_digest() -> str:
    """sha256 of the prompt templates (:data:`~promptkd.train.data.TEMPLATE` + ``TEMPLATE_WITH_INPUT``)."""
    return sha256_bytes((TEMPLATE + TEMPLATE_WITH_INPUT).encode("utf-8"))


def promptkd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("promptkd")
    except PackageNotFoundError:
        return "unknown"

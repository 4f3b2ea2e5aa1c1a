"""The teacher cache: a teacher's sparse targets over a training file, computed once (:func:`cache_teacher`,
``promptkd cache-teacher``) and read back by the trainer (:class:`TeacherCache`, ``teacher_cache=DIR``), so that
``kd`` trains without loading the teacher.

What is cached. The teacher runs over the training file exactly as the trainer feeds it: the tokenizer of
:func:`~promptkd.hf.models.load_tokenizer`, :func:`~promptkd.train.data.load_examples` with the same
``max_prompt_length`` / ``max_length`` (cache example i is the trainer's example i), batches of consecutive
examples through :func:`~promptkd.train.data.collate`, :func:`~promptkd.hf.models.lm_hidden` under ``no_grad``
in eval mode (float32 weights on the CPU, bfloat16 on CUDA, as the trainer's ``dtype: auto``). Only the counted
positions (``labels != -100``) are kept, in row-major order: example i has ``len(response_ids) + 1`` rows (its
response and the closing eos). Each row's targets are :func:`promptkd.fused_linear_topk` of its hidden state, its
logits transformed as the teacher's own are (:func:`~promptkd.hf.models.logit_transform` of its config, checked on
the model by :func:`~promptkd.hf.models.probe_logits`; recorded as ``teacher_logit_transform``):

- ``top_k=K``: the K most likely ids and their log-probabilities under the full softmax of logits / T;
- ``samples=S``: the distinct ids of S draws from softmax(logits / T), most drawn first, with log(count / S)
  (width k = S, padded with "no target").

Sampled targets draw the same whatever the batching, the number of processes or a resume: the Philox key of the
row at position p (0-based, among the example's counted rows) of example e is :func:`row_keys`: the words
(w0, w1, _, _) = Philox4x32-10(key=seed, counter=(e mod 2**32, e div 2**32, p, ROW_KEY_WORD)), and the row's key
is the 64 bits (w1 << 32) | w0 (as int64); ``fused_linear_topk`` then takes draw s of that row from Philox with
that key and counter (0, 0, s, 0). Distinct rows get independent 64-bit keys.

The directory. ``shard-<rank>-<index>.safetensors`` (about ``shard_mb`` MiB each, whole batches of whole
examples) hold ``ids`` [tokens, k] (uint16 when the vocabulary used has at most 65535 ids, 65535 meaning "no
target"; else int32 with -1), ``logprobs`` [tokens, k] (float16 or float32, -inf where there is no target) and
``offsets`` [examples + 1] int64 (each example's first row in the shard). ``cache.json`` records the settings
when a run starts; ``progress-rank<r>.json`` the shards each process completed (with their sha256), rewritten
after each shard; ``manifest.json`` is written last, once every process has finished: its presence means the
cache is complete. ``lock-rank<r>`` is locked (``flock``) by the process writing that rank's shards. Every file
is written under a temporary name, synced and renamed (:mod:`promptkd.files`).

Guarantees. A directory holding a cache (complete or not) is never overwritten unless asked (``overwrite``
removes the cache's own files, nothing else); ``resume`` continues an interrupted run with the same settings
(anything else is refused, naming the differences): it keeps every recorded shard whose sha256 matches,
recomputes a truncated or corrupt one, removes temporary files a kill left, and continues from the next
example; the result is byte-identical to an uninterrupted run's (same batches, a deterministic computation).
A second process writing the same directory is refused while the first holds its lock. Under torchrun each
process caches a contiguous share of the examples into its own shards; rank 0 writes the manifest.

Reading. :class:`TeacherCache` checks every shard's size and sha256 at open (``verify``), memory-maps the
shards and reads only the rows asked for: a cache larger than memory trains fine.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable

import torch

from ..errors import InputError, InputTypeError
from ..files import sync_dir, write_atomic, write_text
from ..kd.settings import IGNORE_INDEX
from .checkpoints import file_digest
from .data import TEMPLATE, TEMPLATE_WITH_INPUT, collate, load_examples

FORMAT = "promptkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS_FILE = "cache.json"
MODES = ("top_k", "samples")
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
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


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:03d}-{index:05d}.safetensors"


def progress_name(rank: int) -> str:
    return f"progress-rank{rank}.json"


def lock_path(out: str, rank: int = 0) -> str:
    """The lock file the process writing ``rank``'s shards of the cache in ``out`` holds (``flock``)."""
    return os.path.join(out, f"lock-rank{rank}")


def _own_file(name: str) -> bool:
    """Whether ``name`` is one of a cache's own files (lock files aside), or a temporary one of those."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:].rsplit(".", 2)[0]  # write_atomic's ".<name>.<random>.tmp"
    return (name in (MANIFEST, SETTINGS_FILE) or (name.startswith("progress-rank") and name.endswith(".json"))
            or (name.startswith("shard-") and name.endswith(".safetensors")))


def cache_files(out: str) -> list[str]:
    """The cache's own files in ``out`` (complete or partial, temporary ones included), sorted."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if _own_file(n))


# ---------------------------------------------------------------- encodings and keys


def id_dtype_for(vocab_size: int) -> str:
    """``"uint16"`` when every id and the "no target" mark (65535) fit 16 bits, else ``"int32"``."""
    return "uint16" if vocab_size <= NO_ID_UINT16 else "int32"


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
    place among its example's counted rows) under ``seed``. See the module docstring for the formula."""
    from ..sparse.philox import philox

    examples, positions = examples.long(), positions.long()
    key = torch.full_like(examples, seed)
    w0, w1, _, _ = philox(key, examples & MASK32, (examples >> 32) & MASK32, positions & MASK32,
                          torch.full_like(examples, ROW_KEY_WORD))
    high = torch.where(w1 >= 2**31, w1 - 2**32, w1)  # w1 as a signed 32-bit word: the shift cannot overflow
    return high * 2**32 + w0


# ---------------------------------------------------------------- fingerprints


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a canonical JSON of the tokenizer's vocabulary and its bos / eos / pad ids."""
    return _sha256_bytes(_canonical({"vocab": tokenizer.get_vocab(), "bos_token_id": tokenizer.bos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))


def template_digest() -> str:
    """sha256 of the prompt templates (:data:`~promptkd.train.data.TEMPLATE` + ``TEMPLATE_WITH_INPUT``)."""
    return _sha256_bytes((TEMPLATE + TEMPLATE_WITH_INPUT).encode("utf-8"))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def _local_teacher(path: str) -> str:
    """A teacher's local directory or .gguf file; a hub name is resolved to its downloaded snapshot."""
    from ..hf import gguf

    if gguf.is_gguf(path) or os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(f"teacher: {path!r} is a hub name; caching needs the teacher's files to fingerprint them: "
                         "install huggingface_hub, or download the model to a directory and pass that") from None
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 (the hub's errors have no common base)
        raise InputError(f"teacher: could not fetch the hub model {path!r}: {e}") from None


def teacher_digest(path: str) -> dict:
    """The teacher's fingerprint: {"path", "config_sha256" (None for a .gguf file), "files" {name: sha256} (its
    weight files, or the .gguf file), "sha256" (of those together)}."""
    from ..hf import gguf

    if gguf.is_gguf(path):
        config, files = None, {os.path.basename(path): file_digest(path)}
    else:
        config = file_digest(os.path.join(path, "config.json"))
        names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
        if not any(n.endswith((".safetensors", ".bin", ".pt", ".pth")) for n in names):
            raise InputError(f"teacher: {path!r} holds no weight files (*.safetensors, *.bin)")
        files = {n: file_digest(os.path.join(path, n)) for n in names}
    return {"path": path, "config_sha256": config, "files": files,
            "sha256": _sha256_bytes(_canonical({"config": config, "files": files}))}


# ---------------------------------------------------------------- arguments


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


def check_cache_args(teacher, data, out, *, top_k=None, samples=None, temperature=1.0, max_length=512,
                     max_prompt_length=256, batch_size=8, dtype="float16", seed=0, shard_mb=256.0, tokenizer=None,
                     vocab_size=None, device="auto", resume=False, overwrite=False, flags: bool = False) -> None:
    """Everything :func:`cache_teacher` checks before it loads anything (InputError naming the argument;
    ``flags``: named as the command line's options, ``--top-k``)."""
    from ..hf.models import check_model_path
    from .config import check_device

    def name(n: str) -> str:
        return "--" + n.replace("_", "-") if flags else n

    if (top_k is None) == (samples is None):
        raise InputError(f"give exactly one of {name('top_k')} (the k most likely ids) and {name('samples')} "
                         f"(ids drawn from the teacher), got {'both' if top_k is not None else 'neither'}")
    if top_k is not None:
        _int(name("top_k"), top_k, 1)
    else:
        _int(name("samples"), samples, 1)
    _positive(name("temperature"), temperature)
    _int(name("max_length"), max_length, 2)
    _int(name("max_prompt_length"), max_prompt_length, 1)
    if max_prompt_length >= max_length:
        raise InputError(f"{name('max_prompt_length')} ({max_prompt_length}) must be < {name('max_length')} "
                         f"({max_length})")
    _int(name("batch_size"), batch_size, 1)
    if dtype not in LOGPROB_DTYPES:
        raise InputError(f"{name('dtype')} must be one of {tuple(LOGPROB_DTYPES)}, got {dtype!r}")
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
    for key, value in (("teacher", teacher), ("data", data), ("out", out)):
        if not isinstance(value, str) or not value:
            raise InputError(f"{name(key)} must be a non-empty path, got {value!r}")
    check_model_path(name("teacher"), teacher)
    if tokenizer:
        check_model_path(name("tokenizer"), tokenizer)
    if not os.path.isfile(data):
        raise InputError(f"{name('data')}: no file {data!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{name('out')} {out!r} is a file, not a directory")


# ---------------------------------------------------------------- the writer


class _Lock:
    """An exclusive ``flock`` on ``lock-rank<r>``, held until :meth:`release` (or the process ends)."""

    def __init__(self, out: str, rank: int):
        self.path = lock_path(out, rank)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InputError(f"another process is writing the cache in {out!r} (it holds {self.path}); wait for it "
                             "to finish, or end it and continue with --resume") from None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _gather(procs, value) -> list:
    """Every process's ``value``, in rank order."""
    if not procs.distributed:
        return [value]
    values = [None] * procs.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def _each(procs, work: Callable):
    """Runs ``work()`` on every process; an InputError on any of them is raised on all (none waits forever)."""
    result, error = None, None
    try:
        result = work()
    except InputError as e:
        error = str(e)
    errors = [e for e in _gather(procs, error) if e]
    if errors:
        raise InputError(errors[0])
    return result


def _on_main(procs, work: Callable):
    """Runs ``work()`` on rank 0 and gives every process its result; an InputError there is raised on all."""
    box = [None, None]
    if procs.main:
        try:
            box[0] = work()
        except InputError as e:
            box[1] = str(e)
    if procs.distributed:
        torch.distributed.broadcast_object_list(box, src=0)
    if box[1]:
        raise InputError(box[1])
    return box[0]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in RESUME_SETTINGS
            if saved.get(key) != current.get(key)]


class _Run:
    """One process's part of a cache run: its share of the examples, its shards and progress file."""

    def __init__(self, out, procs, examples, tokenizer, settings, log, on_batch):
        self.out, self.procs, self.examples, self.tokenizer = out, procs, examples, tokenizer
        self.settings, self.log, self.on_batch = settings, log, on_batch
        n, r, w = len(examples), procs.rank, procs.world_size
        self.lo, self.hi = n * r // w, n * (r + 1) // w
        self.progress_path = os.path.join(out, progress_name(r))
        self.shards: list[dict] = []
        self.good: list[bool] = []
        self.k = settings["k"]
        self.id_dtype = settings["id_dtype"]
        self.row_bytes = self.k * ((2 if self.id_dtype == "uint16" else 4) + (2 if settings["dtype"] == "float16"
                                                                               else 4))
        self.limit = settings["shard_mb"] * MIB
        self.computed_examples = self.computed_tokens = 0

    # ---- resume ----

    def inspect(self) -> bool:
        """Reads this rank's progress (resume), checks each recorded shard's size and sha256, removes temporary
        and unrecorded files of this rank; returns whether anything is left to compute."""
        r = self.procs.rank
        mine = (f"shard-{r:03d}-", progress_name(r)) + ((MANIFEST, SETTINGS_FILE) if self.procs.main else ())
        for name in os.listdir(self.out):
            if name.startswith(".") and name.endswith(".tmp") and _own_file(name) and name[1:].startswith(mine):
                os.remove(os.path.join(self.out, name))  # a kill while writing it
        if os.path.isfile(self.progress_path):
            progress = _read_json(self.progress_path)
            cursor = self.lo
            for index, shard in enumerate(progress.get("shards", [])):
                start, end = shard["examples"]
                if shard["file"] != shard_name(r, index) or start != cursor or not start < end <= self.hi:
                    raise InputError(f"{self.progress_path} does not describe this run's shards (shard {index}: "
                                     f"{shard['file']}, examples {start}..{end}); start again with --overwrite")
                self.shards.append(shard)
                self.good.append(self._intact(shard))
                cursor = end
        recorded = {s["file"] for s in self.shards}
        for name in os.listdir(self.out):
            if name.startswith(f"shard-{r:03d}-") and name not in recorded:
                os.remove(os.path.join(self.out, name))  # written, but killed before its progress was
        sync_dir(self.out)
        bad = [s["file"] for s, ok in zip(self.shards, self.good, strict=True) if not ok]
        if bad:
            self.log(f"rank {r}: recomputing {len(bad)} shard(s) whose file is missing, truncated or corrupt: "
                     f"{', '.join(bad)}")
        return bool(bad) or (self.shards[-1]["examples"][1] if self.shards else self.lo) < self.hi

    def _intact(self, shard: dict) -> bool:
        path = os.path.join(self.out, shard["file"])
        return (os.path.isfile(path) and os.path.getsize(path) == shard["bytes"]
                and file_digest(path) == shard["sha256"])

    # ---- computing ----

    def run(self, model, bar) -> None:
        index, cursor = 0, self.lo
        while cursor < self.hi:
            recorded = index < len(self.shards)
            if recorded and self.good[index]:
                start, end = self.shards[index]["examples"]
                bar.update(end - start)
                cursor, index = end, index + 1
                continue
            stop_at = self.shards[index]["examples"][1] if recorded else self.hi
            cursor = self._shard(model, bar, index, cursor, stop_at, forced=recorded)
            index += 1

    def _shard(self, model, bar, index: int, start: int, stop_at: int, forced: bool) -> int:
        """Computes shard ``index`` from example ``start``: whole batches until it holds ``shard_mb`` (or, for a
        recorded shard, until its recorded end ``stop_at``); writes it and the progress; returns its end."""
        ids, logprobs, counts = [], [], []
        cursor, batch_size = start, self.settings["batch_size"]
        while True:
            stop = min(cursor + batch_size, stop_at)
            batch_ids, batch_lp, batch_counts = self._targets(model, cursor, stop)
            ids.append(encode_ids(batch_ids, self.id_dtype))
            logprobs.append(batch_lp.to(LOGPROB_DTYPES[self.settings["dtype"]]))
            counts.extend(batch_counts)
            batch_index, cursor = (cursor - self.lo) // batch_size, stop
            self.computed_examples += len(batch_counts)
            self.computed_tokens += sum(batch_counts)
            bar.update(len(batch_counts))
            bar.set_postfix(tok_s=f"{self.computed_tokens / max(time.perf_counter() - self.started, 1e-9):.0f}")
            size = sum(counts) * self.row_bytes + 8 * (len(counts) + 1)
            closes = cursor >= stop_at or (not forced and size >= self.limit)
            if closes:
                self._write(index, start, cursor, torch.cat(ids), torch.cat(logprobs), counts)
            if self.on_batch is not None:
                self.on_batch(batch_index)
            if closes:
                return cursor

    def _targets(self, model, first: int, stop: int):
        """Sparse targets of examples [first, stop): ids [rows, k] int64, logprobs [rows, k] float32 (CPU) and each
        example's row count."""
        from ..hf.models import lm_hidden
        from ..sparse.targets import fused_linear_topk

        s = self.settings
        examples = self.examples[first:stop]
        batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                        self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        counted = batch["labels"] != IGNORE_INDEX
        counts = counted.sum(1).tolist()
        expected = [len(e.response_ids) + 1 for e in examples]
        if counts != expected:  # collate's contract; a break here would misplace every later row
            raise RuntimeError(f"examples {first}..{stop}: {counts} counted positions, expected {expected}")
        device = self.procs.device
        with torch.no_grad():
            out = lm_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            rows = out.hidden[counted.to(device)]
            seed = None
            if s["mode"] == "samples":
                positions = (counted.cumsum(1) - 1)[counted]
                owners = torch.arange(first, stop)[:, None].expand_as(counted)[counted]
                seed = row_keys(s["seed"], owners, positions).to(device)
            form = s["teacher_logit_transform"]
            targets = fused_linear_topk(rows, out.weight, self.k, bias=out.bias, temperature=s["temperature"],
                                        vocab_size=s["vocab_size"], samples=s["samples"] or 0, seed=seed,
                                        logit_scale=form["logit_scale"], softcap=form["softcap"])
        return targets.ids.cpu(), targets.logprobs.float().cpu(), counts

    def _write(self, index: int, start: int, end: int, ids, logprobs, counts) -> None:
        from safetensors.torch import save_file

        name = shard_name(self.procs.rank, index)
        path = os.path.join(self.out, name)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        tensors = {"ids": ids.contiguous(), "logprobs": logprobs.contiguous(), "offsets": offsets}
        # One metadata key: safetensors writes the metadata map in a per-process random order, and a resumed
        # cache must be byte-identical to an uninterrupted one.
        metadata = {FORMAT: json.dumps({"format_version": FORMAT_VERSION, "examples": [start, end]})}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        record = {"file": name, "sha256": file_digest(path), "bytes": os.path.getsize(path), "examples": [start, end],
                  "tokens": int(offsets[-1])}
        if index < len(self.shards):
            self.shards[index], self.good[index] = record, True
        else:
            self.shards.append(record)
            self.good.append(True)
        progress = {"rank": self.procs.rank, "examples": [self.lo, self.hi], "shards": self.shards}
        write_text(self.progress_path, json.dumps(progress, indent=1))


def _settings(teacher, data, tokenizer_path, tokenizer, mode, k, samples, temperature, max_length, max_prompt_length,
              batch_size, dtype, seed, shard_mb, vocab_size, processes) -> dict:
    """What ``cache.json`` records (rank 0 computes it: the teacher's files are hashed once)."""
    from ..hf.models import load_config, logit_transform

    config = load_config("teacher", teacher)
    logit_scale, softcap = logit_transform("teacher", config)
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if vocab_size is not None and rows is not None and vocab_size > rows:
        raise InputError(f"vocab_size={vocab_size} exceeds the teacher's vocabulary ({rows})")
    vocab = vocab_size or rows
    if vocab is None:
        raise InputError("teacher: its config states no vocab_size; pass vocab_size (--vocab-size)")
    if mode == "top_k" and k > vocab:
        raise InputError(f"top_k={k} exceeds the vocabulary ({vocab})")
    fingerprint = teacher_digest(_local_teacher(teacher)) | {"path": teacher}
    words = tokenizer_digest(tokenizer)
    data_sha256 = file_digest(data)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "promptkd_version": _version(),
            "teacher": fingerprint, "tokenizer": {"path": tokenizer_path, "sha256": words},
            "data": {"path": data, "sha256": data_sha256}, "teacher_sha256": fingerprint["sha256"],
            "tokenizer_sha256": words, "data_sha256": data_sha256, "template_sha256": template_digest(),
            "max_length": max_length, "max_prompt_length": max_prompt_length, "mode": mode, "k": k, "samples": samples,
            "temperature": float(temperature), "dtype": dtype, "id_dtype": id_dtype_for(vocab), "vocab_size": vocab,
            "seed": seed, "batch_size": batch_size, "shard_mb": float(shard_mb), "processes": processes,
            "teacher_logit_transform": {"logit_scale": logit_scale, "softcap": softcap}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("promptkd")
    except PackageNotFoundError:
        return "unknown"


def _prepare(out: str, settings: dict, resume: bool, overwrite: bool, log) -> None:
    """Rank 0: the directory's state against ``resume`` / ``overwrite``; writes ``cache.json`` for a new run."""
    existing = cache_files(out)
    settings_path = os.path.join(out, SETTINGS_FILE)
    if resume:
        if not os.path.isfile(settings_path):
            hint = "start it again with --overwrite" if existing else "drop --resume to start one"
            raise InputError(f"--resume: {out!r} holds no cache run to continue (no {SETTINGS_FILE}); {hint}")
        saved = _read_json(settings_path)
        differences = _differences(saved, settings)
        if differences:
            raise InputError(f"--resume: the settings differ from those the cache in {out!r} was started with "
                             f"({'; '.join(differences)}); resume with the same settings, or start again with "
                             "--overwrite (or another --out)")
        return
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        if MANIFEST in existing:
            raise InputError(f"{out!r} holds a complete teacher cache ({shown}); pass --overwrite to replace it or "
                             "choose another --out (--resume checks it and recomputes damaged shards)")
        raise InputError(f"{out!r} holds an incomplete teacher cache ({shown}); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    if existing:
        for name in existing:
            os.remove(os.path.join(out, name))
        sync_dir(out)
        log(f"overwrite: removed the previous cache in {out} ({len(existing)} files)")
    write_text(settings_path, json.dumps(settings, indent=1))


def _manifest(out: str, settings: dict, procs, measured: dict) -> dict:
    shards, tokens = [], 0
    for rank in range(procs.world_size):
        for shard in _read_json(os.path.join(out, progress_name(rank)))["shards"] if os.path.isfile(
                os.path.join(out, progress_name(rank))) else []:
            shards.append(shard)
            tokens += shard["tokens"]
    examples = shards[-1]["examples"][1] if shards else 0
    size = sum(s["bytes"] for s in shards)
    measured = dict(measured, bytes_per_token=round(size / max(tokens, 1), 3))
    keys = ("format", "format_version", "promptkd_version", "teacher", "tokenizer", "data", "template_sha256",
            "max_length", "max_prompt_length", "mode", "k", "samples", "temperature", "teacher_logit_transform",
            "dtype", "id_dtype", "vocab_size", "seed", "batch_size", "shard_mb", "processes")
    return {**{key: settings[key] for key in keys}, "num_examples": examples, "num_tokens": tokens, "bytes": size,
            "shards": shards, "measured": measured}


def cache_teacher(teacher: str, data: str, out: str, *, top_k: int | None = None, samples: int | None = None,
                  temperature: float = 1.0, max_length: int = 512, max_prompt_length: int = 256, batch_size: int = 8,
                  dtype: str = "float16", seed: int = 0, shard_mb: float = 256.0, tokenizer: str | None = None,
                  vocab_size: int | None = None, device: str = "auto", resume: bool = False, overwrite: bool = False,
                  log=print, on_batch: Callable[[int], None] | None = None) -> dict:
    """Runs ``teacher`` over the training file ``data`` once and writes its sparse targets to ``out``; returns the
    manifest (see the module docstring for what is cached, the files and the guarantees).

    Exactly one of ``top_k`` (the k most likely ids) and ``samples`` (S draws; stored width k = S). ``temperature``
    T of the softmax; ``max_length`` / ``max_prompt_length`` as the trainer's (they decide the examples);
    ``batch_size`` examples per teacher forward; ``dtype`` of the stored log-probabilities (float16 or float32);
    ``seed`` of sampled targets (ignored by top-k, but recorded); ``shard_mb`` MiB per shard; ``tokenizer``
    (default: the teacher's); ``vocab_size``: how many leading rows of the teacher's head are real tokens (default:
    its config's vocab_size); ``device``: auto (cuda:LOCAL_RANK if CUDA is available), cpu, cuda or cuda:N.
    ``resume`` / ``overwrite``: continue or replace a cache in ``out`` (without either, one there is an error).
    ``on_batch(i)`` is called after each batch (i: the batch's index in this process's share), once its shard
    is written if the batch completed one. Under torchrun, every process calls it with the same arguments.
    """
    from tqdm.auto import tqdm

    from ..hf.models import load_model, load_tokenizer, probe_logits
    from .distributed import Processes

    check_cache_args(teacher, data, out, top_k=top_k, samples=samples, temperature=temperature,
                     max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size, dtype=dtype,
                     seed=seed, shard_mb=shard_mb, tokenizer=tokenizer, vocab_size=vocab_size, device=device,
                     resume=resume, overwrite=overwrite)
    mode, k = ("top_k", top_k) if top_k is not None else ("samples", samples)
    procs = Processes(device)
    say = log if procs.main else (lambda _: None)
    lock = None
    try:
        os.makedirs(out, exist_ok=True)
        lock = _each(procs, lambda: _Lock(out, procs.rank))
        tokenizer_path = tokenizer or teacher
        tok = load_tokenizer("tokenizer" if tokenizer else "teacher", tokenizer_path)
        examples, stats = load_examples(data, tok, max_prompt_length, max_length)

        def prepare():
            settings = _settings(teacher, data, tokenizer_path, tok, mode, k, samples, temperature, max_length,
                                 max_prompt_length, batch_size, dtype, seed, shard_mb, vocab_size, procs.world_size)
            _prepare(out, settings, resume, overwrite, say)
            return settings

        settings = _on_main(procs, prepare)
        say(f"cache: {stats.kept} examples from {data} ({stats.dropped_long_prompt} dropped for prompts over "
            f"{max_prompt_length} tokens, {stats.truncated_response} responses cut); {mode} k={k}, "
            f"T={settings['temperature']}, {dtype} log-probabilities, {settings['id_dtype']} ids")
        run = _Run(out, procs, examples, tok, settings, say, on_batch)
        pending = _each(procs, run.inspect)
        anything = any(_gather(procs, pending))
        manifest_path = os.path.join(out, MANIFEST)
        if not anything and os.path.isfile(manifest_path):
            say(f"cache: {out} is complete; nothing to compute")
            procs.barrier()
            return _read_json(manifest_path)
        if procs.main and os.path.exists(manifest_path):
            os.remove(manifest_path)  # shards are about to change: the cache is incomplete until the end
            sync_dir(out)
        procs.barrier()

        model = load_model("teacher", teacher, torch.bfloat16 if procs.device.type == "cuda" else torch.float32,
                           procs.device)
        model.requires_grad_(False).eval()
        probe_logits("teacher", model)
        head_rows = model.get_output_embeddings().weight.shape[0]
        if settings["vocab_size"] > head_rows:
            raise InputError(f"vocab_size={settings['vocab_size']} exceeds the rows of the teacher's output layer "
                             f"({head_rows})")
        run.started = started = time.perf_counter()
        bar = tqdm(total=run.hi - run.lo, desc="cache-teacher", unit="ex", dynamic_ncols=True,
                   disable=not procs.main, file=sys.stderr)
        try:
            run.run(model, bar)
        finally:
            bar.close()
        counts = procs.mean(torch.tensor([run.computed_examples, run.computed_tokens], dtype=torch.float64,
                                         device=procs.device))
        computed_examples, computed_tokens = (round(float(c) * procs.world_size) for c in counts)
        procs.barrier()
        seconds = time.perf_counter() - started
        measured = {"seconds": round(seconds, 3), "computed_examples": computed_examples,
                    "computed_tokens": computed_tokens,
                    "examples_per_s": round(computed_examples / max(seconds, 1e-9), 2),
                    "tokens_per_s": round(computed_tokens / max(seconds, 1e-9), 1)}
        if procs.main:
            manifest = _manifest(out, settings, procs, measured)
            if manifest["num_examples"] != len(examples):
                raise RuntimeError(f"the shards hold {manifest['num_examples']} examples, not {len(examples)}")
            write_text(manifest_path, json.dumps(manifest, indent=1))
            m = manifest["measured"]
            say(f"cache: {manifest['num_examples']} examples, {manifest['num_tokens']} tokens in "
                f"{len(manifest['shards'])} shard(s), {manifest['bytes'] / MIB:.1f} MiB; {m['examples_per_s']:.1f} "
                f"examples/s, {m['tokens_per_s']:.0f} tokens/s, {m['bytes_per_token']:.1f} bytes per token; {out}")
        procs.barrier()
        return _read_json(manifest_path)
    finally:
        if lock is not None:
            lock.release()
        procs.close()


# ---------------------------------------------------------------- the reader


class TeacherCache:
    """A complete teacher cache, read by example (see the module docstring).

    ``verify``: check every shard's size and sha256 at open (a truncated or corrupt shard is an InputError
    naming its file); sizes are checked either way. Shards are memory-mapped when first read and only the rows
    asked for are read."""

    def __init__(self, path: str, verify: bool = True):
        self.path = path
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise InputError(f"teacher cache {path!r} does not exist")
        if not os.path.isfile(manifest_path):
            if os.path.isfile(os.path.join(path, SETTINGS_FILE)):
                raise InputError(f"teacher cache {path!r} is incomplete (no {MANIFEST}: its run was interrupted); "
                                 "finish it by running the same `promptkd cache-teacher` command with --resume")
            raise InputError(f"{path!r} is not a teacher cache (no {MANIFEST}); write one with "
                             "`promptkd cache-teacher`")
        with open(manifest_path, "rb") as f:
            raw = f.read()
        self.digest = _sha256_bytes(raw)
        try:
            self.manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{manifest_path}: not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{manifest_path}: not a promptkd teacher cache of format version {FORMAT_VERSION}")
        self.shards = self.manifest["shards"]
        for shard in self.shards:
            file = os.path.join(path, shard["file"])
            if not os.path.isfile(file):
                raise InputError(f"teacher cache {path!r}: shard {shard['file']} is missing")
            size = os.path.getsize(file)
            if size != shard["bytes"]:
                raise InputError(f"teacher cache {path!r}: shard {shard['file']} is truncated or damaged ({size} "
                                 f"bytes, the manifest says {shard['bytes']}); rebuild it with `promptkd "
                                 "cache-teacher ... --resume`")
            if verify and file_digest(file) != shard["sha256"]:
                raise InputError(f"teacher cache {path!r}: shard {shard['file']} is corrupt (its sha256 is not the "
                                 "manifest's); rebuild it with `promptkd cache-teacher ... --resume`")
        self._starts = [s["examples"][0] for s in self.shards]
        self._open: dict[int, tuple] = {}

    # ---- what it holds ----

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def tail(self) -> bool:
        """True for top-k targets (the sparse loss's tail bucket), False for sampled ones."""
        return self.manifest["mode"] == "top_k"

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def num_examples(self) -> int:
        return self.manifest["num_examples"]

    @property
    def logprob_dtype(self) -> torch.dtype:
        """The stored log-probabilities' dtype (the sparse loss's sum tolerance follows it)."""
        return LOGPROB_DTYPES[self.manifest["dtype"]]

    def check_compatible(self, tokenizer, data_file: str, max_length: int, max_prompt_length: int,
                         num_examples: int) -> None:
        """The cache must hold the targets of these examples: the same tokenizer, training file contents,
        prompt template, lengths and example count as when it was written (InputError naming the mismatch)."""
        m, where = self.manifest, f"teacher_cache {self.path!r}"
        if tokenizer_digest(tokenizer) != m["tokenizer"]["sha256"]:
            raise InputError(f"{where} was written with another tokenizer ({m['tokenizer']['path']}: a different "
                             "vocabulary or bos/eos/pad ids than this run's tokenizer)")
        if file_digest(data_file) != m["data"]["sha256"]:
            raise InputError(f"{where} was written for other training data: train_file {data_file!r} does not have "
                             f"the contents of {m['data']['path']!r} the cache was made from")
        if template_digest() != m["template_sha256"]:
            raise InputError(f"{where} was written with another prompt template (promptkd.train.data.TEMPLATE)")
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
            if m[name] != value:
                raise InputError(f"{where} was written with {name}={m[name]}, this run has {name}={value}")
        if m["num_examples"] != num_examples:
            raise InputError(f"{where} holds {m['num_examples']} examples, this run's training data {num_examples}")

    # ---- reading ----

    def _shard(self, index: int):
        if index not in self._open:
            from safetensors import safe_open

            handle = safe_open(os.path.join(self.path, self.shards[index]["file"]), framework="pt")
            self._open[index] = (handle, handle.get_tensor("offsets").tolist(), handle.get_slice("ids"),
                                 handle.get_slice("logprobs"))
        return self._open[index]

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``i``'s targets: ids [n_i, k] int64 (-1: no target) and logprobs [n_i, k] float32 (-inf there),
        one row per counted position (n_i = its response length + 1)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_examples:
            raise InputError(f"example index {i!r} is outside the cache's {self.num_examples} examples")
        index = bisect.bisect_right(self._starts, i) - 1
        _, offsets, ids, logprobs = self._shard(index)
        local = i - self._starts[index]
        a, b = offsets[local], offsets[local + 1]
        return decode_ids(ids[a:b]), logprobs[a:b].float()

    def batch_targets(self, example_indices, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets aligned with a training batch: ids [B, L, k] int64 and logprobs [B, L, k] float32 on ``labels``'
        device, example ``example_indices[b]``'s rows at row b's counted positions (``labels != -100``) in order,
        -1 / -inf elsewhere. A row whose count of counted positions is not its example's is an InputError."""
        counted = (labels != IGNORE_INDEX).cpu()
        if counted.ndim != 2 or counted.shape[0] != len(example_indices):
            raise InputError(f"labels must be [B, L] with B = {len(example_indices)} examples, got "
                             f"{tuple(labels.shape)}")
        rows_ids, rows_lp = [], []
        for b, i in enumerate(example_indices):
            ids, lp = self.example(int(i))
            if ids.shape[0] != int(counted[b].sum()):
                raise InputError(f"example {i}: the cache holds {ids.shape[0]} target rows, the batch counts "
                                 f"{int(counted[b].sum())} positions (labels from other data or settings)")
            rows_ids.append(ids)
            rows_lp.append(lp)
        shape = (*counted.shape, self.k)
        out_ids = torch.full(shape, -1, dtype=torch.int64)
        out_lp = torch.full(shape, float("-inf"), dtype=torch.float32)
        if rows_ids:
            out_ids[counted] = torch.cat(rows_ids)
            out_lp[counted] = torch.cat(rows_lp)
        return out_ids.to(labels.device), out_lp.to(labels.device)

"""The cache writer: one run over a training file, its teacher a :class:`~.source.TeacherSource`, with the
directory's guarantees (never overwritten unless asked, resumed with the same settings or refused, one writer per
rank, atomic shards with their sha256, byte-identical after a resume; the package docstring)."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from ...errors import InputError
from ...files import sync_dir, write_atomic, write_text
from ...kd.settings import IGNORE_INDEX
from ..checkpoints import file_digest
from ..data import collate, load_examples
from .checks import cache_mode, check_cache_args, resolve_dtype
from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MIB,
    SETTINGS_FILE,
    cache_files,
    check_width,
    differences,
    encode_ids,
    id_dtype_for,
    lock_path,
    manifest,
    own_file,
    progress_name,
    promptkd_version,
    read_json,
    row_bytes,
    row_keys,
    shard_name,
    stored_dtype,
    template_digest,
    tokenizer_digest,
)
from .source import InProcessTeacher, TeacherSource


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
        self.id_dtype = settings["id_dtype"]
        self.row_bytes = row_bytes(settings["k"], self.id_dtype, settings["dtype"])
        self.limit = settings["shard_mb"] * MIB
        self.computed_examples = self.computed_tokens = 0
        self.started = time.perf_counter()

    # ---- resume ----

    def inspect(self) -> bool:
        """Reads this rank's progress (resume), checks each recorded shard's size and sha256, removes temporary
        and unrecorded files of this rank; returns whether anything is left to compute."""
        r = self.procs.rank
        mine = (f"shard-{r:03d}-", progress_name(r)) + ((MANIFEST, SETTINGS_FILE) if self.procs.main else ())
        for name in os.listdir(self.out):
            if name.startswith(".") and name.endswith(".tmp") and own_file(name) and name[1:].startswith(mine):
                os.remove(os.path.join(self.out, name))  # a kill while writing it
        if os.path.isfile(self.progress_path):
            progress = read_json(self.progress_path)
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

    def run(self, source: TeacherSource, bar) -> None:
        self.started = time.perf_counter()
        index, cursor = 0, self.lo
        while cursor < self.hi:
            recorded = index < len(self.shards)
            if recorded and self.good[index]:
                start, end = self.shards[index]["examples"]
                bar.update(end - start)
                cursor, index = end, index + 1
                continue
            stop_at = self.shards[index]["examples"][1] if recorded else self.hi
            cursor = self._shard(source, bar, index, cursor, stop_at, forced=recorded)
            index += 1

    def _shard(self, source, bar, index: int, start: int, stop_at: int, forced: bool) -> int:
        """Computes shard ``index`` from example ``start``: whole batches until it holds ``shard_mb`` (or, for a
        recorded shard, until its recorded end ``stop_at``); writes it and the progress; returns its end."""
        parts, counts = [], []
        cursor, batch_size = start, self.settings["batch_size"]
        while True:
            stop = min(cursor + batch_size, stop_at)
            batch_tensors, batch_counts = self._targets(source, cursor, stop)
            parts.append(batch_tensors)
            counts.extend(batch_counts)
            batch_index, cursor = (cursor - self.lo) // batch_size, stop
            self.computed_examples += len(batch_counts)
            self.computed_tokens += sum(batch_counts)
            bar.update(len(batch_counts))
            bar.set_postfix(tok_s=f"{self.computed_tokens / max(time.perf_counter() - self.started, 1e-9):.0f}")
            size = sum(counts) * self.row_bytes + 8 * (len(counts) + 1)
            closes = cursor >= stop_at or (not forced and size >= self.limit)
            if closes:
                self._write(index, start, cursor, {n: torch.cat([p[n] for p in parts]) for n in parts[0]}, counts)
            if self.on_batch is not None:
                self.on_batch(batch_index)
            if closes:
                return cursor

    def _targets(self, source, first: int, stop: int):
        """The stored tensors of examples [first, stop) (``ids`` [rows, k] and ``logprobs`` [rows, k] as stored, or
        ``hidden`` [rows, D]) and each example's row count."""
        s = self.settings
        examples = self.examples[first:stop]
        batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                        self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        counted = batch["labels"] != IGNORE_INDEX
        counts = counted.sum(1).tolist()
        expected = [len(e.response_ids) + 1 for e in examples]
        if counts != expected:  # collate's contract; a break here would misplace every later row
            raise RuntimeError(f"examples {first}..{stop}: {counts} counted positions, expected {expected}")
        keys = None
        if s["mode"] == "samples":
            positions = (counted.cumsum(1) - 1)[counted]
            owners = torch.arange(first, stop)[:, None].expand_as(counted)[counted]
            keys = row_keys(s["seed"], owners, positions)
        batch["examples"] = torch.arange(first, stop)
        rows = sum(counts)
        values = stored_dtype(s["mode"], s["dtype"])
        if s["mode"] == "hidden":
            hidden = source.hidden(batch, counted)
            if tuple(hidden.shape) != (rows, s["k"]) or not torch.isfinite(hidden).all():
                raise RuntimeError(f"examples {first}..{stop}: the teacher gave hidden states of shape "
                                   f"{tuple(hidden.shape)} (finite: {bool(torch.isfinite(hidden).all())}), expected "
                                   f"({rows}, {s['k']})")
            return {"hidden": hidden.to(values)}, counts
        ids, logprobs = source.targets(batch, counted, keys)
        if tuple(ids.shape) != (rows, s["k"]) or tuple(logprobs.shape) != (rows, s["k"]):
            raise RuntimeError(f"examples {first}..{stop}: the teacher gave targets of shape {tuple(ids.shape)} / "
                               f"{tuple(logprobs.shape)}, expected ({rows}, {s['k']})")
        return {"ids": encode_ids(ids, self.id_dtype), "logprobs": logprobs.to(values)}, counts

    def _write(self, index: int, start: int, end: int, tensors: dict, counts) -> None:
        from safetensors.torch import save_file

        name = shard_name(self.procs.rank, index)
        path = os.path.join(self.out, name)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        tensors = {**{n: t.contiguous() for n, t in tensors.items()}, "offsets": offsets}
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


def _settings(source: TeacherSource, data, tokenizer_path, tokenizer, mode, k, samples, temperature, max_length,
              max_prompt_length, batch_size, dtype, seed, shard_mb, vocab_size, processes) -> dict:
    """What ``cache.json`` records (rank 0 computes it: the teacher is fingerprinted once)."""
    teacher = source.describe(mode, k, vocab_size, tokenizer, float(temperature))
    vocab = teacher["vocab_size"]
    check_width(mode, k, vocab)
    k = teacher.get("width", k)  # the stored row width: a served teacher adds the label where it is not in the top k
    words = tokenizer_digest(tokenizer)
    data_sha256 = file_digest(data)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "promptkd_version": promptkd_version(),
            "teacher": teacher["teacher"], "tokenizer": {"path": tokenizer_path, "sha256": words},
            "data": {"path": data, "sha256": data_sha256}, "teacher_sha256": teacher["teacher_sha256"],
            "tokenizer_sha256": words, "data_sha256": data_sha256, "template_sha256": template_digest(),
            "max_length": max_length, "max_prompt_length": max_prompt_length, "mode": mode, "k": k, "samples": samples,
            "temperature": float(temperature), "dtype": dtype, "vocab_size": vocab,
            "id_dtype": None if mode == "hidden" else id_dtype_for(vocab),
            "seed": seed, "batch_size": batch_size, "shard_mb": float(shard_mb), "processes": processes,
            "teacher_logit_transform": teacher["teacher_logit_transform"]}


def _prepare(out: str, settings: dict, resume: bool, overwrite: bool, log) -> None:
    """Rank 0: the directory's state against ``resume`` / ``overwrite``; writes ``cache.json`` for a new run."""
    existing = cache_files(out)
    settings_path = os.path.join(out, SETTINGS_FILE)
    if resume:
        if not os.path.isfile(settings_path):
            hint = "start it again with --overwrite" if existing else "drop --resume to start one"
            raise InputError(f"--resume: {out!r} holds no cache run to continue (no {SETTINGS_FILE}); {hint}")
        changed = differences(read_json(settings_path), settings)
        if changed:
            raise InputError(f"--resume: the settings differ from those the cache in {out!r} was started with "
                             f"({'; '.join(changed)}); resume with the same settings, or start again with "
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


def _all_shards(out: str, world_size: int) -> list[dict]:
    shards = []
    for rank in range(world_size):
        path = os.path.join(out, progress_name(rank))
        shards += read_json(path)["shards"] if os.path.isfile(path) else []
    return shards


def write_cache(source: TeacherSource, data: str, out: str, *, top_k: int | None = None, samples: int | None = None,
                hidden: bool = False, temperature: float = 1.0, max_length: int = 512, max_prompt_length: int = 256,
                batch_size: int = 8, dtype: str | None = None, seed: int = 0, shard_mb: float = 256.0,
                tokenizer: str | None = None, vocab_size: int | None = None, device: str = "auto", resume: bool = False,
                overwrite: bool = False,
                log=print, on_batch: Callable[[int], None] | None = None) -> dict:
    """Writes the targets ``source`` gives over the training file ``data`` to ``out``; returns the manifest. The
    arguments are :func:`~promptkd.train.teacher_cache.cache_teacher`'s, checked by the caller."""
    from tqdm.auto import tqdm

    from ...hf.models import load_tokenizer
    from ..distributed import Processes

    mode = cache_mode(top_k, samples, hidden)
    k = {"top_k": top_k, "samples": samples, "hidden": None}[mode]  # hidden: the width comes from the teacher
    dtype = resolve_dtype(dtype, hidden)
    procs = Processes(device)
    say = log if procs.main else (lambda _: None)
    lock = None
    try:
        os.makedirs(out, exist_ok=True)
        lock = _each(procs, lambda: _Lock(out, procs.rank))
        tokenizer_path = tokenizer or source.tokenizer_path
        tok = load_tokenizer("tokenizer" if tokenizer else "teacher", tokenizer_path)
        examples, stats = load_examples(data, tok, max_prompt_length, max_length)

        def prepare():
            settings = _settings(source, data, tokenizer_path, tok, mode, k, samples, temperature, max_length,
                                 max_prompt_length, batch_size, dtype, seed, shard_mb, vocab_size, procs.world_size)
            _prepare(out, settings, resume, overwrite, say)
            return settings

        settings = _on_main(procs, prepare)
        say(f"cache: {stats.kept} examples from {data} ({stats.dropped_long_prompt} dropped for prompts over "
            f"{max_prompt_length} tokens, {stats.truncated_response} responses cut); "
            + (f"hidden states of width {settings['k']} in {dtype}" if mode == "hidden" else
               f"{mode} k={k}, T={settings['temperature']}, {dtype} log-probabilities, {settings['id_dtype']} ids"))
        run = _Run(out, procs, examples, tok, settings, say, on_batch)
        pending = _each(procs, run.inspect)
        anything = any(_gather(procs, pending))
        manifest_path = os.path.join(out, MANIFEST)
        if not anything and os.path.isfile(manifest_path):
            say(f"cache: {out} is complete; nothing to compute")
            procs.barrier()
            return read_json(manifest_path)
        if procs.main and os.path.exists(manifest_path):
            os.remove(manifest_path)  # shards are about to change: the cache is incomplete until the end
            sync_dir(out)
        procs.barrier()

        source.open(settings, procs.device)
        bar = tqdm(total=run.hi - run.lo, desc="cache-teacher", unit="ex", dynamic_ncols=True,
                   disable=not procs.main, file=sys.stderr)
        try:
            run.run(source, bar)
        finally:
            bar.close()
        counts = procs.mean(torch.tensor([run.computed_examples, run.computed_tokens], dtype=torch.float64,
                                         device=procs.device))
        computed_examples, computed_tokens = (round(float(c) * procs.world_size) for c in counts)
        procs.barrier()
        seconds = time.perf_counter() - run.started
        measured = {"seconds": round(seconds, 3), "computed_examples": computed_examples,
                    "computed_tokens": computed_tokens,
                    "examples_per_s": round(computed_examples / max(seconds, 1e-9), 2),
                    "tokens_per_s": round(computed_tokens / max(seconds, 1e-9), 1)}
        if procs.main:
            written = manifest(settings, _all_shards(out, procs.world_size), measured)
            if written["num_examples"] != len(examples):
                raise RuntimeError(f"the shards hold {written['num_examples']} examples, not {len(examples)}")
            write_text(manifest_path, json.dumps(written, indent=1))
            m = written["measured"]
            say(f"cache: {written['num_examples']} examples, {written['num_tokens']} tokens in "
                f"{len(written['shards'])} shard(s), {written['bytes'] / MIB:.1f} MiB; {m['examples_per_s']:.1f} "
                f"examples/s, {m['tokens_per_s']:.0f} tokens/s, {m['bytes_per_token']:.1f} bytes per token; {out}")
        procs.barrier()
        return read_json(manifest_path)
    finally:
        source.close()
        if lock is not None:
            lock.release()
        procs.close()


def cache_teacher(teacher: str, data: str, out: str, *, top_k: int | None = None, samples: int | None = None,
                  hidden: bool = False, temperature: float = 1.0, max_length: int = 512, max_prompt_length: int = 256,
                  batch_size: int = 8, dtype: str | None = None, seed: int = 0, shard_mb: float = 256.0,
                  tokenizer: str | None = None, vocab_size: int | None = None, device: str = "auto",
                  resume: bool = False, overwrite: bool = False, log=print,
                  on_batch: Callable[[int], None] | None = None) -> dict:
    """Runs ``teacher`` over the training file ``data`` once and writes its sparse targets to ``out``; returns the
    manifest (see the package docstring for what is cached, the files and the guarantees).

    Exactly one of ``top_k`` (the k most likely ids), ``samples`` (S draws; stored width k = S) and ``hidden``
    (the teacher's final hidden states, width k = D: ``kd`` then applies the teacher's output head, exactly).
    ``temperature`` T of the softmax; ``max_length`` / ``max_prompt_length`` as the trainer's (they decide the
    examples); ``batch_size`` examples per teacher forward; ``dtype`` of the stored log-probabilities (float16, the
    default, or float32) or hidden states (bfloat16, the default, or float32);
    ``seed`` of sampled targets (ignored by top-k, but recorded); ``shard_mb`` MiB per shard; ``tokenizer``
    (default: the teacher's); ``vocab_size``: how many leading rows of the teacher's head are real tokens (default:
    its config's vocab_size); ``device``: auto (cuda:LOCAL_RANK if CUDA is available), cpu, cuda or cuda:N.
    ``resume`` / ``overwrite``: continue or replace a cache in ``out`` (without either, one there is an error).
    ``on_batch(i)`` is called after each batch (i: the batch's index in this process's share), once its shard
    is written if the batch completed one. Under torchrun, every process calls it with the same arguments.
    """
    options = dict(top_k=top_k, samples=samples, hidden=hidden, temperature=temperature, max_length=max_length,
                   max_prompt_length=max_prompt_length, batch_size=batch_size, dtype=dtype, seed=seed,
                   shard_mb=shard_mb, tokenizer=tokenizer, vocab_size=vocab_size, device=device, resume=resume,
                   overwrite=overwrite)
    check_cache_args(teacher, data, out, **options)
    return write_cache(InProcessTeacher(teacher), data, out, **options, log=log, on_batch=on_batch)

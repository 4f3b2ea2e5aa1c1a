"""The cache reader: a complete cache, verified at open and memory-mapped, read by example or aligned with a
training batch (the trainer's ``teacher_cache=DIR``)."""

from __future__ import annotations

import bisect
import json
import os

import torch

from ...errors import InputError
from ...kd.settings import IGNORE_INDEX
from ..checkpoints import file_digest
from .format import (
    FORMAT,
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    MANIFEST,
    SETTINGS_FILE,
    decode_ids,
    sha256_bytes,
    template_digest,
    tokenizer_digest,
)


class TeacherCache:
    """A complete teacher cache, read by example (see the package docstring, :mod:`promptkd.train.teacher_cache`).

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
        self.digest = sha256_bytes(raw)
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
    def mode(self) -> str:
        """``top_k``, ``samples`` or ``hidden``."""
        return self.manifest["mode"]

    @property
    def hidden(self) -> bool:
        """True for a cache of the teacher's final hidden states (width :attr:`k`, its output head's input)."""
        return self.mode == "hidden"

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
            names = ("hidden",) if self.hidden else ("ids", "logprobs")
            self._open[index] = (handle, handle.get_tensor("offsets").tolist(), *(handle.get_slice(n) for n in names))
        return self._open[index]

    def _rows(self, i: int):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_examples:
            raise InputError(f"example index {i!r} is outside the cache's {self.num_examples} examples")
        index = bisect.bisect_right(self._starts, i) - 1
        _, offsets, *tensors = self._shard(index)
        local = i - self._starts[index]
        a, b = offsets[local], offsets[local + 1]
        return [t[a:b] for t in tensors]

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``i``'s targets: ids [n_i, k] int64 (-1: no target) and logprobs [n_i, k] float32 (-inf there),
        one row per counted position (n_i = its response length + 1). A hidden-state cache has no targets:
        :meth:`example_hidden`."""
        if self.hidden:
            raise InputError(f"teacher cache {self.path!r} holds hidden states, not targets: read them with "
                             "example_hidden / batch_hidden")
        ids, logprobs = self._rows(i)
        return decode_ids(ids), logprobs.float()

    def example_hidden(self, i: int) -> torch.Tensor:
        """Example ``i``'s teacher hidden states [n_i, D] as stored (bfloat16 or float32), one row per counted
        position, for a ``hidden`` cache."""
        if not self.hidden:
            raise InputError(f"teacher cache {self.path!r} holds {self.mode} targets, not hidden states")
        (rows,) = self._rows(i)
        return rows

    def batch_hidden(self, example_indices, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Hidden states aligned with a training batch: [B, L, D] in ``dtype`` on ``labels``' device, example
        ``example_indices[b]``'s rows at row b's counted positions in order, zeros elsewhere (as
        :meth:`batch_targets` places targets)."""
        counted = self._counted(example_indices, labels)
        rows = []
        for b, i in enumerate(example_indices):
            h = self.example_hidden(int(i))
            self._check_rows(int(i), h.shape[0], counted[b])
            rows.append(h)
        out = torch.zeros((*counted.shape, self.k), dtype=dtype)
        if rows:
            out[counted] = torch.cat(rows).to(dtype)
        return out.to(labels.device)

    def _counted(self, example_indices, labels: torch.Tensor) -> torch.Tensor:
        counted = (labels != IGNORE_INDEX).cpu()
        if counted.ndim != 2 or counted.shape[0] != len(example_indices):
            raise InputError(f"labels must be [B, L] with B = {len(example_indices)} examples, got "
                             f"{tuple(labels.shape)}")
        return counted

    @staticmethod
    def _check_rows(i: int, rows: int, counted: torch.Tensor) -> None:
        if rows != int(counted.sum()):
            raise InputError(f"example {i}: the cache holds {rows} target rows, the batch counts "
                             f"{int(counted.sum())} positions (labels from other data or settings)")

    def batch_targets(self, example_indices, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets aligned with a training batch: ids [B, L, k] int64 and logprobs [B, L, k] float32 on ``labels``'
        device, example ``example_indices[b]``'s rows at row b's counted positions (``labels != -100``) in order,
        -1 / -inf elsewhere. A row whose count of counted positions is not its example's is an InputError."""
        counted = self._counted(example_indices, labels)
        rows_ids, rows_lp = [], []
        for b, i in enumerate(example_indices):
            ids, lp = self.example(int(i))
            self._check_rows(int(i), ids.shape[0], counted[b])
            rows_ids.append(ids)
            rows_lp.append(lp)
        shape = (*counted.shape, self.k)
        out_ids = torch.full(shape, -1, dtype=torch.int64)
        out_lp = torch.full(shape, float("-inf"), dtype=torch.float32)
        if rows_ids:
            out_ids[counted] = torch.cat(rows_ids)
            out_lp[counted] = torch.cat(rows_lp)
        return out_ids.to(labels.device), out_lp.to(labels.device)

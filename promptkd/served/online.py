"""A served teacher asked at every training step (``TrainConfig.teacher_server``): the trainer loads no teacher.

Two payloads (``teacher_server_payload``):

- ``logprobs`` (a scoring server): for each sequence of the batch, the teacher's log-probabilities at every
  counted position: the top ``teacher_server_top_k`` plus the actual next token's (:meth:`OnlineTeacher.targets`,
  for ``kd``: the fused sparse loss, top-k plus the tail bucket), or only the actual next token's
  (:meth:`OnlineTeacher.label_logprobs`, for ``rkl``: the on-policy reverse KL from the student's samples,
  :func:`promptkd.sampled_reverse_kl_loss`).
- ``hidden`` (a vLLM pooling server): the teacher's final hidden states at every position
  (:meth:`OnlineTeacher.hidden`); with the teacher's output head loaded alone (:func:`promptkd.hf.head.load_head`)
  every method's loss is then the exact one of :func:`promptkd.fused_linear_kd_loss`, as with the teacher in
  memory.

Before the first step (:meth:`OnlineTeacher.connect`): the server answers and names its model, its tokenizer
gives the student's ids on the probe texts, and it admits the payload (k log-probabilities per position; hidden
states as wide as the head). Each refusal names the server, the setting and the fix.

A sequence is sent whole: for a batch whose rows continue shared prefixes (``share_prefix``) the prefix and the
row, then the row's part is kept. Rows are sent ``teacher_server_concurrency`` at a time.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from .apis import API, api
from .client import Client, RequestRefused, ServerError
from .source import PROBE_TEXTS

PAYLOADS = ("logprobs", "hidden")


class OnlineTeacher:
    """The teacher served at ``url`` for a training run (see the module docstring); ``tokenizer``: the student's."""

    def __init__(self, url: str, api_name: str = "vllm", model: str | None = None, payload: str = "logprobs",
                 top_k: int = 20, concurrency: int = 8, timeout: float = 120.0, retries: int = 4):
        if payload not in PAYLOADS:
            raise InputError(f"teacher_server_payload must be one of {PAYLOADS}, got {payload!r}")
        self.client = Client(url, timeout=timeout, retries=retries, concurrency=concurrency)
        self.server: API = api(api_name)
        self.wanted, self.payload, self.top_k = model or None, payload, top_k
        self.model: str | None = None
        self.vocab_size: int | None = None

    def connect(self, tokenizer, vocab_size: int, hidden_size: int | None = None) -> str:
        """The probes (see the module docstring); returns a line describing the server for the log."""
        c, s = self.client, self.server
        self.model = s.model(c, self.wanted)
        self.vocab_size = vocab_size
        for text in PROBE_TEXTS:
            theirs, ours = s.token_ids(c, self.model, text), list(tokenizer(text)["input_ids"])
            if theirs != ours:
                raise ServerError(f"teacher_server {c.url} ({self.model}) tokenizes differently from the student: "
                                  f"{text!r} is {theirs[:12]} there, {ours[:12]} here; serve a teacher that shares "
                                  "the student's tokenizer")
        probe = list(tokenizer(PROBE_TEXTS[1])["input_ids"])
        if len(probe) < 2:
            probe = [i % vocab_size for i in (1, 2, 3, 4, 5)]
        if self.payload == "hidden":
            try:
                hidden = s.hidden(c, self.model, probe, "a probe for the hidden states")
            except RequestRefused as e:
                if e.status != 404:
                    raise
                raise ServerError(f"teacher_server {c.url} has no /pooling (HTTP 404): hidden states come from a "
                                  "vLLM server started as a pooling model (--runner pooling --convert embed, "
                                  "token_embed with ALL pooling); this one scores (teacher_server_payload="
                                  "logprobs)") from None
            if hidden_size is not None and hidden.shape[1] != hidden_size:
                raise ServerError(f"teacher_server {c.url} ({self.model}) returns hidden states of width "
                                  f"{hidden.shape[1]}, and the teacher's output head (teacher) takes {hidden_size}: "
                                  "the head must be the served model's")
            return f"teacher server: {c.url} ({s.name}, {self.model}): hidden states of width {hidden.shape[1]}"
        try:
            s.score(c, self.model, probe, self.top_k, what=f"a probe with {self.top_k} log-probabilities")
        except RequestRefused as e:
            if e.status == 404:
                raise ServerError(f"teacher_server {c.url} has no /v1/completions (HTTP 404): is it a pooling "
                                  "server? Log-probabilities come from a generating server; a pooling one gives "
                                  "hidden states (teacher_server_payload=hidden)") from None
            raise ServerError(f"teacher_server {c.url} refuses {self.top_k} log-probabilities per position "
                              f"({e.message}); start it with --max-logprobs {self.top_k} or more, or lower "
                              "teacher_server_top_k") from None
        return f"teacher server: {c.url} ({s.name}, {self.model}): top-{self.top_k} log-probabilities"

    # ---- the batch's sequences ----

    @staticmethod
    def _rows(batch: dict) -> list[tuple[list[int], int]]:
        """Each row's whole sequence (its shared prefix first, where it has one) and where the row starts in it."""
        lengths = batch["attention_mask"].sum(1).tolist()
        ids = batch["input_ids"].tolist()
        if "group_index" not in batch:
            return [(ids[b][:n], 0) for b, n in enumerate(lengths)]
        prefix_lengths = batch["prefix_mask"].sum(1).tolist()
        prefixes = batch["prefix_ids"].tolist()
        out = []
        for b, g in enumerate(batch["group_index"].tolist()):
            prefix = prefixes[g][:prefix_lengths[g]]
            out.append((prefix + ids[b][:lengths[b]], len(prefix)))
        return out

    def _scored(self, batch: dict, labels: torch.Tensor, k: int):
        """For every row, the server's positions at its counted columns (column c: the position predicting
        the row's token c + 1)."""
        counted = (labels != -100).cpu()
        jobs = [(b, seq, start, counted[b].nonzero().flatten().tolist()) for b, (seq, start)
                in enumerate(self._rows(batch))]

        def score(job):
            b, seq, start, cols = job
            if not cols:
                return []
            positions = self.server.score(self.client, self.model, seq, k, what=f"row {b} of a training batch")
            return [positions[start + c] for c in cols]

        return counted, self.client.map(score, jobs)

    def targets(self, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L, k + 1] int64 and log-probabilities [B, L, k + 1] float32 on ``labels``' device: the top k
        and, where the label is not among them, the label's (-1 / -inf elsewhere and at uncounted positions)."""
        counted, rows = self._scored(batch, labels, self.top_k)
        width = self.top_k + 1
        ids = torch.full((*counted.shape, width), -1, dtype=torch.int64)
        lp = torch.full((*counted.shape, width), -math.inf, dtype=torch.float32)
        for b, positions in enumerate(rows):
            for c, p in zip(counted[b].nonzero().flatten().tolist(), positions, strict=True):
                self._check_ids(p.ids)
                ids[b, c, :len(p.ids)] = torch.tensor(p.ids)
                lp[b, c, :len(p.ids)] = torch.tensor(p.logprobs)
        return ids.to(labels.device), lp.to(labels.device)

    def label_logprobs(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        """[B, L] float32: the teacher's log-probability of each label (0 at uncounted positions)."""
        counted, rows = self._scored(batch, labels, 0)
        out = torch.zeros(counted.shape, dtype=torch.float32)
        flat = labels.cpu()
        for b, positions in enumerate(rows):
            for c, p in zip(counted[b].nonzero().flatten().tolist(), positions, strict=True):
                label = int(flat[b, c])
                if label not in p.ids:
                    raise ServerError(f"teacher_server {self.client.url} returned no log-probability for token "
                                      f"{label} at column {c} of row {b}")
                out[b, c] = p.logprobs[p.ids.index(label)]
        return out.to(labels.device)

    def hidden(self, batch: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, L, D] on the batch's device: each row's final hidden states (zeros at padding)."""
        rows = self._rows(batch)
        mask = batch["attention_mask"]

        def fetch(job):
            b, (seq, start) = job
            return self.server.hidden(self.client, self.model, seq, f"row {b} of a training batch")[start:]

        states = self.client.map(fetch, list(enumerate(rows)))
        width = states[0].shape[1]
        out = torch.zeros((*mask.shape, width), dtype=torch.float32)
        for b, h in enumerate(states):
            if h.shape[1] != width:
                raise ServerError(f"teacher_server {self.client.url} returned hidden states of widths {width} and "
                                  f"{h.shape[1]} in one batch")
            out[b, :h.shape[0]] = h
        return out.to(mask.device, dtype)

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ServerError(f"teacher_server {self.client.url} returned id {bad[0]}, outside the student's "
                              f"vocabulary of {self.vocab_size} ids")

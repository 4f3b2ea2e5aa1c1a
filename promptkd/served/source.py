"""A served teacher as a source of the teacher cache (:class:`~promptkd.train.teacher_cache.TeacherSource`): each
training example is one scoring request, ``concurrency`` of them in flight.

Before any example is sent (:meth:`ServedTeacher.describe`): the server answers and names its model; its
tokenizer gives the student tokenizer's ids on probe texts; it admits ``prompt_logprobs``/``top_logprobs_num`` of
k; and a temperature other than 1 is refused unless the server's log-probabilities follow the request's
temperature (checked on a probe sequence). Each is refused naming the server, the setting and the fix.

With ``hidden`` (a vLLM pooling server): each counted position's final hidden state, width D (probed), the
record naming the payload; ``kd`` applies the teacher's output head (``teacher=``) to them.

What is stored: ``mode: top_k`` with width k + 1: each row's k most likely ids and, where the actual next token
(the label) is not among them, that token's exact log-probability as one more target (-1 / -inf pad the rows
where it is). The teacher's record in the manifest is the server (URL, API, model name, version) in place of
weight digests; a resume must find the same API and model (the URL may change).
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..train.teacher_cache.format import canonical, check_width, sha256_bytes
from ..train.teacher_cache.source import TeacherSource
from .apis import APIS, api
from .client import Client, RequestRefused, ServerError

#: Texts whose ids the server's tokenizer must give as the student's does.
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Instruction: add 17 and 25.\nResponse: 42",
               "  spaces,\ttabs and\nnewlines; unicode: café, 東京, ½ — and digits 0123456789")


class ServedTeacher(TeacherSource):
    """The teacher served by a vLLM or SGLang server at ``url`` (``api``); ``model``: its served name (default:
    the only one it serves); ``tokenizer``: the student's tokenizer (a path), which the examples are encoded with
    and the server must agree with. HTTP: ``concurrency`` requests in flight, ``timeout`` seconds each,
    ``retries`` with exponential backoff (:class:`~promptkd.served.client.Client`)."""

    def __init__(self, url: str, api_name: str = "vllm", model: str | None = None, tokenizer: str | None = None,
                 concurrency: int = 8, timeout: float = 120.0, retries: int = 4, backoff: float = 0.5):
        self.url, self.api_name, self.wanted, self.tokenizer_path = url, api_name, model, tokenizer
        self.options = dict(concurrency=concurrency, timeout=timeout, retries=retries, backoff=backoff)
        self.client: Client | None = None
        self.model: str | None = None
        self.settings: dict = {}

    def check(self, name, mode: str = "top_k", temperature: float = 1.0) -> None:
        if mode == "hidden" and self.api_name != "vllm":
            raise InputError(f"{name('hidden')} with {name('api')} {self.api_name}: promptkd reads served hidden "
                             "states from vLLM's /pooling only (SGLang's hidden-state output is not verified here)")
        if mode == "samples":
            raise InputError(f"{name('samples')}: a served teacher gives its top-k log-probabilities, not samples "
                             f"drawn with promptkd's keys; use {name('top_k')}")
        if self.api_name not in APIS:
            raise InputError(f"{name('api')} must be one of {', '.join(APIS)}, got {self.api_name!r}")
        if self.wanted is not None and (not isinstance(self.wanted, str) or not self.wanted):
            raise InputError(f"{name('model')} must be a served model's name, got {self.wanted!r}")
        if not self.tokenizer_path:
            raise InputError(f"{name('tokenizer')} is needed with {name('server')}: the student's tokenizer, which "
                             "the examples are encoded with (the server's must give the same ids)")
        self.client = Client(self.url, **self.options)

    def _connect(self) -> tuple[Client, object]:
        if self.client is None:
            self.client = Client(self.url, **self.options)
        return self.client, api(self.api_name)

    def describe(self, mode: str, k: int, vocab_size: int | None, tokenizer=None, temperature: float = 1.0) -> dict:
        """Probes the server (see the module docstring) and returns the teacher's record."""
        client, server = self._connect()
        if mode == "samples":
            raise InputError("samples: a served teacher gives its top-k log-probabilities; use top_k")
        self.model = server.model(client, self.wanted)
        info = server.describe(client)
        if tokenizer is not None:
            self._check_tokenizer(client, server, tokenizer)
        vocab = vocab_size or (len(tokenizer) if tokenizer is not None else None)
        if vocab is None:
            raise InputError("vocab_size (--vocab-size) is needed: how many ids the teacher's head scores")
        check_width(mode, k, vocab)
        probe = _probe_ids(tokenizer, vocab)
        if mode == "hidden":
            try:
                width = server.hidden(client, self.model, probe, "a probe for the hidden states").shape[1]
            except RequestRefused as e:
                if e.status != 404:
                    raise
                raise ServerError(f"the teacher server at {client.url} has no /pooling (HTTP 404): --hidden needs a "
                                  "vLLM server started as a pooling model (--runner pooling --convert embed, "
                                  "token_embed with ALL pooling)") from None
            record = {"server": client.url, "api": server.name, "model": self.model, **info, "payload": "hidden"}
            identity = {key: record[key] for key in ("api", "model", "payload")}
            return {"teacher": record, "teacher_sha256": sha256_bytes(canonical(identity)), "vocab_size": vocab,
                    "width": width, "teacher_logit_transform": {"logit_scale": None, "softcap": None, "by": "trainer"}}
        self._check_logprobs(client, server, probe, k)
        processed = self._check_temperature(client, server, probe, k, temperature)
        record = {"server": client.url, "api": server.name, "model": self.model, **info,
                  "logprobs": "processed" if processed else "raw"}
        identity = {key: record[key] for key in ("api", "model")}
        return {"teacher": record, "teacher_sha256": sha256_bytes(canonical(identity)), "vocab_size": vocab,
                "width": k + 1, "teacher_logit_transform": {"logit_scale": None, "softcap": None, "by": "server"}}

    def _check_tokenizer(self, client, server, tokenizer) -> None:
        for text in PROBE_TEXTS:
            theirs = server.token_ids(client, self.model, text)
            ours = list(tokenizer(text)["input_ids"])
            if theirs != ours:
                raise ServerError(f"the teacher server at {client.url} ({self.model}) tokenizes differently from "
                                  f"--tokenizer {self.tokenizer_path}: {text!r} is {theirs[:12]} there, {ours[:12]} "
                                  "here; serve a teacher that shares the student's tokenizer (--tokenizer on the "
                                  "server), or pass the tokenizer the server uses")

    def _check_logprobs(self, client, server, probe: list[int], k: int) -> None:
        try:
            server.score(client, self.model, probe, k, what=f"a probe with {k} log-probabilities per position")
        except RequestRefused as e:
            if e.status == 404:
                raise ServerError(f"the teacher server at {client.url} has no scoring route (HTTP 404): is it a "
                                  "pooling server? Its hidden states are cached with --hidden") from None
            setting = "--max-logprobs" if server.name == "vllm" else "the server's limit on top_logprobs_num"
            raise ServerError(f"the teacher server at {client.url} refuses {k} log-probabilities per position "
                              f"({e.message}); start it with {setting} {k} or more, or lower --top-k") from None

    def _check_temperature(self, client, server, probe: list[int], k: int, temperature: float) -> bool:
        """Whether the server's log-probabilities follow the request's temperature; T != 1 needs them to."""
        if temperature == 1.0:
            return False
        plain = server.score(client, self.model, probe, k, 1.0, "a probe at temperature 1")
        hot = server.score(client, self.model, probe, k, temperature, f"a probe at temperature {temperature:g}")
        moved = any(abs(a - b) > 1e-6 for p, q in zip(plain, hot, strict=True)
                    for a, b in zip(p.logprobs, q.logprobs, strict=False))
        if not moved:
            raise InputError(f"--temperature {temperature:g}: the server at {client.url} returns the raw model's "
                             "log-probabilities whatever the request's temperature, and a top-k slice cannot be "
                             "re-tempered without the full normalizer; start vLLM with --logprobs-mode "
                             "processed_logprobs (its values then follow the temperature), or use --temperature 1")
        return True

    def open(self, settings: dict, device: torch.device) -> None:
        self.settings = settings
        if self.model is None:  # a process other than rank 0: the record names the model
            self._connect()
            self.model = settings["teacher"]["model"]

    def targets(self, batch: dict, counted: torch.Tensor, keys: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        client, server = self._connect()
        s = self.settings
        k, width, vocab = s["k"] - 1, s["k"], s["vocab_size"]
        lengths = batch["attention_mask"].sum(1).tolist()
        examples = batch["examples"].tolist()
        jobs = [(examples[b], batch["input_ids"][b, :n].tolist(), counted[b].nonzero().flatten().tolist())
                for b, n in enumerate(lengths)]

        def score(job):
            example, ids, cols = job
            positions = server.score(client, self.model, ids, k, s["temperature"], what=f"example {example}")
            return [positions[c] for c in cols]  # column c's label is token c + 1: the server's position c

        rows = [p for positions in client.map(score, jobs) for p in positions]
        out_ids = torch.full((len(rows), width), -1, dtype=torch.int64)
        out_lp = torch.full((len(rows), width), -math.inf, dtype=torch.float32)
        for r, p in enumerate(rows):
            bad = [i for i in p.ids if not 0 <= i < vocab]
            if bad:
                raise ServerError(f"the teacher server at {client.url} returned id {bad[0]}, outside the vocabulary "
                                  f"of {vocab} ids (--vocab-size: the rows of the teacher's head)")
            out_ids[r, :len(p.ids)] = torch.tensor(p.ids, dtype=torch.int64)
            out_lp[r, :len(p.ids)] = torch.tensor(p.logprobs, dtype=torch.float32)
        return out_ids, out_lp


    def hidden(self, batch: dict, counted: torch.Tensor) -> torch.Tensor:
        client, server = self._connect()
        lengths = batch["attention_mask"].sum(1).tolist()
        examples = batch["examples"].tolist()
        jobs = [(examples[b], batch["input_ids"][b, :n].tolist(), counted[b].nonzero().flatten()) for b, n in
                enumerate(lengths)]

        def fetch(job):
            example, ids, cols = job
            return server.hidden(client, self.model, ids, f"example {example}")[cols]  # column c: token c's state

        rows = client.map(fetch, jobs)
        return torch.cat(rows) if rows else torch.zeros((0, self.settings["k"]))


def _probe_ids(tokenizer, vocab: int) -> list[int]:
    """A short sequence of the tokenizer's ids for the probes (any ids below ``vocab`` without one)."""
    if tokenizer is not None:
        ids = list(tokenizer(PROBE_TEXTS[1])["input_ids"])
        if len(ids) >= 2:
            return ids
    return [i % vocab for i in (1, 2, 3, 4, 5)]

"""The two server APIs a teacher is scored through, as requests and the parsing of their answers.

**vLLM** (its OpenAI-compatible server, ``python -m vllm.entrypoints.openai.api_server``): ``POST
/v1/completions`` with the sequence as token ids (``prompt``: a list of ints, so nothing is tokenized again),
``max_tokens=1`` and ``prompt_logprobs=k``. ``choices[0].prompt_logprobs`` holds one entry per prompt token: null
for the first, then ``{"<id>": {"logprob", "rank", "decoded_token"}}`` with the k most likely ids, plus the
token that is actually there when it is not among them (its exact log-probability: kept, as one more target).
``GET /v1/models`` names the model, ``POST /tokenize`` shows the server's ids for a text, ``GET /version`` its
version. The server refuses ``prompt_logprobs`` above its ``--max-logprobs`` (default 20). The values are the raw
model's log-softmax whatever the request's ``temperature`` (``--logprobs-mode raw_logprobs``, the default);
``--logprobs-mode processed_logprobs`` makes them follow the sampling parameters.

**SGLang** (``python -m sglang.launch_server``): ``POST /generate`` with ``input_ids``, ``return_logprob=true``,
``logprob_start_len=0``, ``top_logprobs_num=k`` and ``max_new_tokens=1``. ``meta_info.input_token_logprobs``
holds ``[logprob, id, text]`` per input token (logprob null for the first) and ``meta_info.input_top_logprobs``
a list of k such triples per token (null for the first). ``GET /get_model_info`` names the model
(``model_path``), ``GET /get_server_info`` describes the server. promptkd reads SGLang's documented format; it
is tested against answers of that format (its reference server), not against a live SGLang.

**Hidden states** (vLLM only): a second vLLM server, started as a pooling model with ``--runner pooling --convert
embed --pooler-config '{"task": "token_embed", "tok_pooling_type": "ALL", "use_activation": false}'``, answers
``POST /pooling`` with ``{"model", "input": [ids], "task": "token_embed"}`` by the final hidden states (after the
model's final norm: the input of its output head), ``data[0].data`` [n, D]. One vLLM server runs one runner: the
scoring server and the hidden-state server are two processes. SGLang's hidden-state output is not read by
promptkd (not verified here): ``hidden`` refuses it.

Each API gives, for a sequence of n ids, n - 1 :class:`Position` records: position i (1 <= i < n) is the
distribution that predicts token i from tokens 0..i-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .client import Client, RequestRefused, ServerError

APIS = ("vllm", "sglang")


@dataclass
class Position:
    """The server's targets at one position: ``ids`` / ``logprobs`` most likely first (ties to the lower id),
    the k most likely and, when it is not among them, the actual next token last."""

    ids: list[int]
    logprobs: list[float]


def _sorted(pairs: dict[int, float], actual: int | None, k: int) -> Position:
    """The k most likely of ``pairs`` (by value, ties to the lower id), then ``actual`` if it is not among them."""
    order = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    top = order[:k]
    ids = [i for i, _ in top]
    if actual is not None and actual not in ids:
        if actual not in pairs:
            raise ValueError(f"no log-probability for the actual token {actual}")
        ids.append(actual)
        top.append((actual, pairs[actual]))
    return Position(ids, [float(v) for _, v in top])


def _logprob(value) -> float:
    if value is None:
        raise ValueError("a null log-probability")
    value = float(value)
    if math.isnan(value) or value > 1e-6:
        raise ValueError(f"a log-probability of {value}")
    return min(value, 0.0)


class API:
    """One server API: its requests and the parsing of their answers."""

    name: str

    def model(self, client: Client, wanted: str | None) -> str:
        """The served model's name (``wanted``, checked to be served, or the only one)."""
        raise NotImplementedError

    def describe(self, client: Client) -> dict:
        """What the server says of itself (its version), for the cache's manifest."""
        raise NotImplementedError

    def token_ids(self, client: Client, model: str, text: str) -> list[int]:
        """The server's ids for ``text`` (special tokens added as its tokenizer adds them)."""
        raise NotImplementedError

    def score(self, client: Client, model: str, ids: list[int], k: int, temperature: float = 1.0,
              what: str = "a scoring request") -> list[Position]:
        """The n - 1 positions of ``ids`` (n >= 2)."""
        raise NotImplementedError

    def hidden(self, client: Client, model: str, ids: list[int], what: str = "a hidden-state request"
               ) -> torch.Tensor:
        """The final hidden states [n, D] (float32) of ``ids``."""
        raise ServerError(f"--api {self.name}: promptkd reads served hidden states from vLLM's /pooling only; serve "
                          "the teacher's hidden states with vLLM (--runner pooling), or use its log-probabilities")


class VLLM(API):
    name = "vllm"

    def model(self, client: Client, wanted: str | None) -> str:
        served = [m.get("id") for m in client.get("/v1/models", "the model list (/v1/models)").get("data", [])]
        return _pick_model(client, served, wanted)

    def describe(self, client: Client) -> dict:
        try:
            return {"api": self.name, "version": client.get("/version", "its version (/version)").get("version")}
        except RequestRefused:
            return {"api": self.name, "version": None}

    def token_ids(self, client: Client, model: str, text: str) -> list[int]:
        answer = client.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": True},
                             "tokenizing a probe text (/tokenize)")
        return [int(t) for t in answer["tokens"]]

    def request(self, model: str, ids: list[int], k: int, temperature: float) -> dict:
        return {"model": model, "prompt": [int(i) for i in ids], "max_tokens": 1, "prompt_logprobs": int(k),
                "temperature": float(temperature), "n": 1}

    def score(self, client: Client, model: str, ids: list[int], k: int, temperature: float = 1.0,
              what: str = "a scoring request") -> list[Position]:
        answer = client.post("/v1/completions", self.request(model, ids, k, temperature), what)
        return self.parse(answer, ids, k, client.url, what)

    def parse(self, answer: dict, ids: list[int], k: int, url: str = "the server", what: str = "a request"
              ) -> list[Position]:
        try:
            entries = answer["choices"][0]["prompt_logprobs"]
            if entries is None or len(entries) != len(ids):
                raise ValueError(f"{0 if entries is None else len(entries)} prompt_logprobs entries for "
                                 f"{len(ids)} tokens")
            out = []
            for i in range(1, len(ids)):
                pairs = {int(t): _logprob(v["logprob"]) for t, v in entries[i].items()}
                out.append(_sorted(pairs, ids[i], k))
            return out
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ServerError(f"{url} answered {what} with prompt log-probabilities promptkd cannot read ({e}); "
                              "is it a vLLM OpenAI-compatible server (--api vllm)?") from None


    def hidden(self, client: Client, model: str, ids: list[int], what: str = "a hidden-state request"
               ) -> torch.Tensor:
        answer = client.post("/pooling", {"model": model, "input": [int(i) for i in ids], "task": "token_embed"},
                             what)
        try:
            rows = answer["data"][0]["data"]
            hidden = torch.tensor(rows, dtype=torch.float32)
            if hidden.ndim != 2 or hidden.shape[0] != len(ids):
                raise ValueError(f"hidden states of shape {tuple(hidden.shape)} for {len(ids)} tokens")
            if not torch.isfinite(hidden).all():
                raise ValueError("non-finite hidden states")
            return hidden
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ServerError(f"{client.url} answered {what} with hidden states promptkd cannot read ({e}); is it a "
                              "vLLM pooling server (--runner pooling --convert embed, token_embed with ALL "
                              "pooling)?") from None


class SGLang(API):
    name = "sglang"

    def model(self, client: Client, wanted: str | None) -> str:
        info = client.get("/get_model_info", "the model's description (/get_model_info)")
        if info.get("is_generation") is False:
            raise ServerError(f"{client.url} serves {info.get('model_path')!r} as a non-generative model; a teacher "
                              "must be a causal LM")
        return _pick_model(client, [info.get("model_path")], wanted)

    def describe(self, client: Client) -> dict:
        try:
            info = client.get("/get_server_info", "its description (/get_server_info)")
        except RequestRefused:
            info = {}
        return {"api": self.name, "version": info.get("version")}

    def token_ids(self, client: Client, model: str, text: str) -> list[int]:
        answer = client.post("/generate", {"text": text, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                                           "return_logprob": True, "logprob_start_len": 0},
                             "tokenizing a probe text (/generate)")
        return [int(entry[1]) for entry in answer["meta_info"]["input_token_logprobs"]]

    def request(self, model: str, ids: list[int], k: int, temperature: float) -> dict:
        return {"input_ids": [int(i) for i in ids], "return_logprob": True, "logprob_start_len": 0,
                "top_logprobs_num": int(k), "return_text_in_logprobs": False,
                "sampling_params": {"max_new_tokens": 1, "temperature": float(temperature)}}

    def score(self, client: Client, model: str, ids: list[int], k: int, temperature: float = 1.0,
              what: str = "a scoring request") -> list[Position]:
        answer = client.post("/generate", self.request(model, ids, k, temperature), what)
        return self.parse(answer, ids, k, client.url, what)

    def parse(self, answer: dict, ids: list[int], k: int, url: str = "the server", what: str = "a request"
              ) -> list[Position]:
        try:
            meta = answer["meta_info"]
            actual, top = meta["input_token_logprobs"], meta["input_top_logprobs"]
            if len(actual) != len(ids) or len(top) != len(ids):
                raise ValueError(f"{len(actual)} / {len(top)} entries for {len(ids)} tokens")
            out = []
            for i in range(1, len(ids)):
                if int(actual[i][1]) != ids[i]:
                    raise ValueError(f"token {i} is {actual[i][1]}, not the {ids[i]} sent")
                pairs = {int(t): _logprob(v) for v, t, *_ in top[i]}
                pairs.setdefault(ids[i], _logprob(actual[i][0]))
                out.append(_sorted(pairs, ids[i], k))
            return out
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ServerError(f"{url} answered {what} with input log-probabilities promptkd cannot read ({e}); "
                              "is it an SGLang server (--api sglang)?") from None


def _pick_model(client: Client, served: list, wanted: str | None) -> str:
    served = [m for m in served if m]
    if wanted:
        if wanted not in served:
            raise ServerError(f"--model {wanted!r}: the server at {client.url} serves {served or 'no model'}")
        return wanted
    if len(served) != 1:
        raise ServerError(f"the server at {client.url} serves {served or 'no model'}: name one with --model")
    return served[0]


def api(name: str) -> API:
    if name == "vllm":
        return VLLM()
    if name == "sglang":
        return SGLang()
    raise ServerError(f"--api must be one of {', '.join(APIS)}, got {name!r}")

"""A small teacher server speaking both APIs promptkd's client reads (vLLM's ``/v1/completions`` with
``prompt_logprobs`` and, as a pooling server, ``/pooling``'s final hidden states; SGLang's ``/generate``), over a
transformers causal LM in float32 on the CPU: for tests, and for trying the client where no vLLM runs.
It is not a serving engine: one forward per request, in turn.

    python -m promptkd.served.reference --model DIR [--host 127.0.0.1] [--port 0] [--name NAME]
        [--runner generate|pooling] [--max-logprobs 20] [--logprobs-mode raw|processed] [--tokenizer DIR]
        [--fail-every N] [--delay SECONDS [--delay-after N]] [--exit-after N]

It prints ``listening on http://HOST:PORT`` once it serves. ``--runner pooling`` serves hidden states instead of
log-probabilities, as a vLLM server started with ``--runner pooling`` does (one runner per server). The fault
switches: ``--fail-every N`` answers every Nth scoring (or pooling) request with HTTP 503; ``--delay`` waits before
each scoring answer after the first ``--delay-after``; ``--exit-after N`` ends the process (no answer) at the
(N+1)th scoring request; ``--tokenizer`` tokenizes ``/tokenize`` and text prompts with another tokenizer than the
model's (a server that disagrees with the student's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class Scorer:
    """The model's log-probabilities: for token ids [n], the [n, V] log-softmax of its logits (float32)."""

    def __init__(self, model_dir: str, tokenizer_dir: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        self.lock = threading.Lock()

    def logprobs(self, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
        with self.lock, torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits / temperature, dim=-1)

    def hidden(self, ids: list[int]) -> torch.Tensor:
        """The final hidden states [n, D] (after the final norm: the output head's input)."""
        with self.lock, torch.no_grad():
            return self.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0].float()

    def top(self, row: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """The k largest (id, logprob) of a row, ties to the lower id."""
        values, order = torch.sort(row, descending=True, stable=True)
        return [(int(i), float(v)) for v, i in zip(values[:k].tolist(), order[:k].tolist(), strict=True)]


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, scorer: Scorer, args):
        super().__init__(address, Handler)
        self.scorer, self.args = scorer, args
        self.scored = 0
        self.count_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format, *args):  # quiet: tests read stdout for the address only
        pass

    def _send(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"object": "error", "message": message, "error": {"message": message, "code": status}})

    def do_GET(self):  # noqa: N802 (http.server's name)
        a, name = self.server.args, self.server.args.name
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "max_model_len": a.max_len}]})
        elif self.path == "/version":
            self._send(200, {"version": "promptkd-reference"})
        elif self.path == "/get_model_info":
            self._send(200, {"model_path": name, "tokenizer_path": name, "is_generation": True})
        elif self.path == "/get_server_info":
            self._send(200, {"version": "promptkd-reference"})
        elif self.path == "/health":
            self._send(200, {})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):  # noqa: N802
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        except ValueError:
            return self._error(400, "the body is not JSON")
        if self.path == "/tokenize":
            ids = self.server.scorer.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
            return self._send(200, {"tokens": ids["input_ids"], "count": len(ids["input_ids"]),
                                    "max_model_len": self.server.args.max_len})
        if self.path not in ("/v1/completions", "/generate", "/pooling"):
            return self._error(404, f"no route {self.path}")
        pooling = self.server.args.runner == "pooling"
        if (self.path == "/pooling") != pooling:  # as vLLM: the other runner's routes do not exist
            return self._send(404, {"detail": "Not Found"})
        scoring = self.path in ("/v1/completions", "/pooling") or "input_ids" in body and body.get("top_logprobs_num")
        if scoring and not self._fault():
            return None
        try:
            if self.path == "/pooling":
                return self._pooling(body)
            return self._completions(body) if self.path == "/v1/completions" else self._generate(body)
        except (KeyError, TypeError, ValueError) as e:
            return self._error(400, f"bad request: {e}")

    def _fault(self) -> bool:
        """The fault switches for a scoring request; False when it has been answered (or the server is gone)."""
        a = self.server.args
        with self.server.count_lock:
            self.server.scored += 1
            n = self.server.scored
        if a.exit_after is not None and n > a.exit_after:
            os._exit(0)  # gone mid-run, as a killed server
        if a.delay and n > a.delay_after:
            time.sleep(a.delay)
        if a.fail_every and n % a.fail_every == 0:
            self._error(503, "the reference server fails this request on purpose (--fail-every)")
            return False
        return True

    def _temperature(self, value) -> float:
        t = float(value if value is not None else 1.0)
        return t if self.server.args.logprobs_mode == "processed" and t > 0 else 1.0

    def _completions(self, body: dict):
        a, scorer = self.server.args, self.server.scorer
        prompt = body["prompt"]
        ids = scorer.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else [int(i) for i in prompt]
        k = body.get("prompt_logprobs")
        if k is not None and k > a.max_logprobs:
            return self._error(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                    f"{a.max_logprobs}")
        rows = scorer.logprobs(ids, self._temperature(body.get("temperature")))
        entries = None
        if k is not None:
            entries = [None]
            for i in range(1, len(ids)):
                row = rows[i - 1]
                top = dict(scorer.top(row, k))
                top.setdefault(ids[i], float(row[ids[i]]))
                rank = {t: 1 + int((row > row[t]).sum()) for t in top}
                entries.append({str(t): {"logprob": _finite(v), "rank": rank[t],
                                         "decoded_token": scorer.tokenizer.decode([t])} for t, v in top.items()})
        following = int(rows[-1].argmax())
        self._send(200, {"id": "cmpl-reference", "object": "text_completion", "model": a.name,
                         "choices": [{"index": 0, "text": scorer.tokenizer.decode([following]), "logprobs": None,
                                      "finish_reason": "length", "prompt_logprobs": entries}],
                         "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}})

    def _pooling(self, body: dict):
        a, scorer = self.server.args, self.server.scorer
        if body.get("task", "token_embed") != "token_embed":
            return self._error(400, f"task {body.get('task')!r}: this server pools token_embed (ALL) only")
        prompt = body["input"]
        ids = scorer.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else [int(i) for i in prompt]
        hidden = scorer.hidden(ids)
        self._send(200, {"id": "pool-reference", "object": "list", "model": a.name,
                         "data": [{"index": 0, "object": "pooling", "data": hidden.tolist()}],
                         "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids)}})

    def _generate(self, body: dict):
        scorer = self.server.scorer
        ids = ([int(i) for i in body["input_ids"]] if "input_ids" in body
               else scorer.tokenizer(body["text"])["input_ids"])
        params = body.get("sampling_params") or {}
        rows = scorer.logprobs(ids, self._temperature(params.get("temperature")))
        meta = {"id": "reference", "prompt_tokens": len(ids), "completion_tokens": 1}
        if body.get("return_logprob"):
            k = int(body.get("top_logprobs_num") or 0)
            meta["input_token_logprobs"] = [[None, ids[0], None]] + [
                [_finite(float(rows[i - 1][ids[i]])), ids[i], None] for i in range(1, len(ids))]
            meta["input_top_logprobs"] = [None] + [
                [[_finite(v), t, None] for t, v in scorer.top(rows[i - 1], k)] if k else None
                for i in range(1, len(ids))]
        following = int(rows[-1].argmax())
        self._send(200, {"text": scorer.tokenizer.decode([following]), "meta_info": meta})


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m promptkd.served.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a transformers model directory")
    parser.add_argument("--name", default=None, help="the served model's name (default: the directory)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--runner", choices=("generate", "pooling"), default="generate",
                        help="pooling: answer /pooling with hidden states (and no scoring), as vLLM's pooling runner")
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--logprobs-mode", choices=("raw", "processed"), default="raw")
    parser.add_argument("--tokenizer", default=None, help="tokenize with this tokenizer instead of the model's")
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--delay-after", type=int, default=0, help="answer the first N scoring requests at once")
    parser.add_argument("--exit-after", type=int, default=None)
    args = parser.parse_args(argv)
    args.name = args.name or args.model
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    server = Server((args.host, args.port), Scorer(args.model, args.tokenizer), args)
    print(f"listening on http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

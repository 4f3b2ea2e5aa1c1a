"""``make test-served``'s checks of training through a live vLLM (``teacher_server``): a scoring server and a pooling
server of the same model.

    python bench/served_online_check.py --server URL --pooling URL --model DIR --student DIR --data TRAIN.jsonl
        --out DIR [--record tests/data/vllm]

1. ``--record``: the pooling server's answers to ``/pooling`` (``tests/data/vllm/pooling/*.json``, with
   transformers' float64 final hidden states and logits of the same sequence) and the scoring server's answer to
   ``prompt_logprobs=0`` (``tests/data/vllm/case3.json``): what the default suite parses without a server.
2. Hidden states: the served ones against transformers' ``last_hidden_state`` (largest relative difference) and
   ``hidden @ lm_head.T`` against the model's logits.
3. Training through the servers, against the teacher in memory, the same steps: ``kd``, ``rkl`` and ``gkd`` from
   hidden states (losses), ``kd`` from top-k log-probabilities against ``kd`` from a cache the same server wrote,
   ``rkl`` from the sampled-token estimator (its losses, beside the exact ``rkl``'s).

Everything goes to ``OUT/served_online_live.json`` (with the server's version, the commit and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from promptkd.hf.models import load_tokenizer
from promptkd.served import Client, cache_from_server
from promptkd.served.apis import VLLM
from promptkd.train import TrainConfig, train

LENGTHS = dict(max_length=200, max_prompt_length=180)
TEXTS = ("Instruction: add 17 and 25.\nResponse: 42", "sort 3 1 2", "the lazy dog")


def record(scoring: Client, pooling: Client, model_dir: str, name: str, out: Path) -> tuple[list[str], dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = load_tokenizer("model", model_dir)
    version = VLLM().describe(scoring)["version"]
    about = (f"vllm {version}", "a 2-layer Llama (hidden 128, vocabulary 300) promptkd's demo writes "
             "(bench/served_online_check.py)")
    written, worst_hidden, worst_logits = [], 0.0, 0.0
    (out / "pooling").mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"][:14]
        request = {"model": name, "input": ids, "task": "token_embed"}
        response = pooling.post("/pooling", request, f"recording pooling case {i}")
        with torch.no_grad():
            run = model(torch.tensor([ids]), output_hidden_states=True)
            hidden = model.base_model(torch.tensor([ids])).last_hidden_state[0]
        served = VLLM().hidden(pooling, name, ids).double()
        worst_hidden = max(worst_hidden, float((served - hidden).abs().max() / hidden.abs().max()))
        logits = served @ model.get_output_embeddings().weight.double().T
        worst_logits = max(worst_logits, float((logits - run.logits[0]).abs().max()))
        case = {"server": about[0], "model": about[1], "request": request, "response": response,
                "transformers_hidden": [[round(v, 7) for v in row] for row in hidden.tolist()]}
        path = out / "pooling" / f"case{i}.json"
        path.write_text(json.dumps(case, indent=None, separators=(",", ":")) + "\n")
        written.append(str(path))
    ids = tok(TEXTS[0])["input_ids"][:14]
    request = VLLM().request(name, ids, 0, 1.0)
    response = scoring.post("/v1/completions", request, "recording prompt_logprobs=0")
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    case = {"server": about[0], "model": about[1], "request": request, "response": response,
            "transformers_logprobs": [[round(v, 7) for v in row] for row in reference.tolist()]}
    (out / "case3.json").write_text(json.dumps(case, indent=None, separators=(",", ":")) + "\n")
    written.append(str(out / "case3.json"))
    return written, {"max_rel_hidden_diff": worst_hidden, "max_abs_logit_diff_hidden_times_head": worst_logits}


def losses(run_dir: str) -> list[float]:
    return [json.loads(x)["train/loss"] for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def trained(work: Path, name: str, **settings) -> list[float]:
    base = dict(batch_size=4, max_steps=3, lr=1e-3, warmup_steps=0, progress=False, tensorboard=False, device="cpu",
                max_new_tokens=16, output_dir=str(work / name), **LENGTHS)
    return losses(train(TrainConfig(**{**base, **settings}), log=lambda _: None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="the scoring server")
    p.add_argument("--pooling", required=True, help="the pooling server (--runner pooling) of the same model")
    p.add_argument("--name", default="tiny")
    p.add_argument("--model", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--record", default=None)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    scoring, pooling = Client(a.server), Client(a.pooling)
    result = {}
    if a.record:
        written, result["hidden_states"] = record(scoring, pooling, a.model, a.name, Path(a.record))
        print("recorded", *written, sep="\n  ")
    common = dict(student=a.student, teacher=a.model, train_file=a.data)
    runs = {}
    for method, extra in (("kd", {}), ("rkl", {}), ("gkd", {"gkd_lambda": 1.0})):
        local = trained(work, f"{method}-local", method=method, **common, **extra)
        served = trained(work, f"{method}-hidden", method=method, teacher_server=a.pooling,
                         teacher_server_payload="hidden", **common, **extra)
        runs[f"{method} from hidden states"] = {"local": local, "served": served, "max_rel_diff": max(
            abs(x - y) / max(1.0, abs(y)) for x, y in zip(served, local, strict=True))}
    cache = work / "cache"
    cache_from_server(a.server, a.data, str(cache), tokenizer=a.student, top_k=8, dtype="float32", overwrite=True,
                      log=lambda _: None, **LENGTHS)
    from_cache = trained(work, "kd-cache", method="kd", student=a.student, teacher_cache=str(cache), train_file=a.data)
    online = trained(work, "kd-topk", method="kd", student=a.student, teacher_server=a.server, teacher_server_top_k=8,
                     train_file=a.data)
    runs["kd from top-8 log-probabilities"] = {"cache": from_cache, "served": online, "max_rel_diff": max(
        abs(x - y) / max(1.0, abs(y)) for x, y in zip(online, from_cache, strict=True))}
    runs["rkl from sampled tokens"] = {"served": trained(work, "rkl-sampled", method="rkl", student=a.student,
                                                         teacher_server=a.server, train_file=a.data),
                                       "exact rkl, teacher in memory": runs["rkl from hidden states"]["local"]}
    result["training"] = runs
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result.update(server=VLLM().describe(scoring), commit=commit, torch=torch.__version__,
                  machine=f"{platform.machine()}, {os.cpu_count()} cores")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "served_online_live.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    bad = [k for k, v in runs.items() if v.get("max_rel_diff", 0.0) > 1e-4]
    if bad:
        print("differ by more than 1e-4:", bad, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make test-served``'s measurements against a live teacher server (vLLM here): what it records and reports.

    python bench/served_check.py --server URL --model DIR --student DIR --data TRAIN.jsonl --out DIR [--work DIR]
        [--record tests/data/vllm]

1. ``--record``: answers of the server to ``/v1/completions`` with ``prompt_logprobs`` on a few sequences, with
   the request and transformers' float64 log-softmax of the same model (``tests/data/vllm/*.json``: what the
   default test suite parses without a server).
2. Targets: the served cache against the in-process ``cache_teacher`` of the same model (float32 targets): ids
   equal but where values tie, the largest |log-probability| difference.
3. Client overhead: the server alone scoring every training sequence (the same requests, ``--concurrency`` in
   flight, nothing parsed or written) against the whole ``cache_from_server`` run; medians of ``--repeats``.
4. ``kd`` from the served cache against ``kd`` from the in-process cache: the same steps, their losses.

Everything goes to ``OUT/served.json`` (with the server's version, the commit and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from promptkd.hf.models import load_tokenizer
from promptkd.served import Client, cache_from_server
from promptkd.served.apis import VLLM
from promptkd.train import TrainConfig, train
from promptkd.train.data import collate, load_examples
from promptkd.train.teacher_cache import TeacherCache, cache_teacher

LENGTHS = dict(max_length=200, max_prompt_length=180)


def record(client: Client, model_dir: str, name: str, out: Path, k: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = load_tokenizer("model", model_dir)
    out.mkdir(parents=True, exist_ok=True)
    version = VLLM().describe(client)["version"]
    written = []
    for i, text in enumerate(("Instruction: add 17 and 25.\nResponse: 42", "sort 3 1 2", "the lazy dog")):
        ids = tok(text)["input_ids"][:14]
        request = VLLM().request(name, ids, k, 1.0)
        response = client.post("/v1/completions", request, f"recording case {i}")
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        case = {"server": f"vllm {version}", "model": "a 2-layer Llama (hidden 128, vocabulary 300) promptkd's "
                "demo writes (bench/served_check.py)", "request": request, "response": response,
                "transformers_logprobs": [[round(v, 7) for v in row] for row in reference.tolist()]}
        path = out / f"case{i}.json"
        path.write_text(json.dumps(case, indent=None, separators=(",", ":")) + "\n")
        written.append(str(path))
    return written


def compare(served: TeacherCache, local: TeacherCache, data: str, tokenizer_dir: str) -> dict:
    tok = load_tokenizer("t", tokenizer_dir)
    examples, _ = load_examples(data, tok, LENGTHS["max_prompt_length"], LENGTHS["max_length"])
    worst, differing, rows, label_added = 0.0, 0, 0, 0
    for i, e in enumerate(examples):
        ids, lp = served.example(i)
        want_ids, want_lp = local.example(i)
        k = want_ids.shape[1]
        rows += ids.shape[0]
        differing += int((ids[:, :k] != want_ids).any(1).sum())
        worst = max(worst, float((lp[:, :k] - want_lp).abs().max()))
        labels = collate([e.prompt_ids], [e.response_ids], tok.pad_token_id, tok.eos_token_id)["labels"]
        label_added += int((ids[:, k] >= 0).sum())
        assert torch.equal(ids[ids[:, k] >= 0, k], labels[labels != -100][ids[:, k] >= 0])
    return {"rows": rows, "rows_with_other_ids": differing, "max_abs_logprob_diff": worst,
            "rows_with_the_label_added": label_added}


def server_alone(client: Client, name: str, data: str, tokenizer_dir: str, k: int) -> float:
    tok = load_tokenizer("t", tokenizer_dir)
    examples, _ = load_examples(data, tok, LENGTHS["max_prompt_length"], LENGTHS["max_length"])
    payloads = [VLLM().request(name, e.prompt_ids + e.response_ids + [tok.eos_token_id], k, 1.0) for e in examples]
    start = time.perf_counter()
    client.map(lambda p: client.post("/v1/completions", p, "a timing request"), payloads)
    return time.perf_counter() - start


def kd_losses(model_dir: str, student: str, cache: str, data: str, out: str, steps: int) -> list[float]:
    cfg = TrainConfig(method="kd", student=student, teacher_cache=cache, train_file=data, output_dir=out,
                      batch_size=4, max_steps=steps, lr=1e-3, warmup_steps=0, progress=False, tensorboard=False,
                      device="cpu", **LENGTHS)
    run_dir = train(cfg, log=lambda _: None)
    return [json.loads(x)["train/loss"] for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True)
    p.add_argument("--name", default="tiny", help="the served model's name")
    p.add_argument("--model", required=True, help="the served model's directory (the same weights, in process)")
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None, help="scratch directory (default OUT/work)")
    p.add_argument("--record", default=None, help="write recorded answers here (tests/data/vllm)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    out = Path(a.out)
    work = Path(a.work) if a.work else out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    client = Client(a.server, concurrency=a.concurrency)
    report = {"server": a.server, "server_version": VLLM().describe(client)["version"], "top_k": a.top_k,
              "concurrency": a.concurrency, "machine": f"{platform.machine()} x{os.cpu_count()} cores",
              "python": platform.python_version(), "torch": torch.__version__,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()}
    if a.record:
        report["recorded"] = record(client, a.model, a.name, Path(a.record), a.top_k)
    common = dict(top_k=a.top_k, dtype="float32", **LENGTHS, log=lambda _: None)
    cache_teacher(a.model, a.data, str(work / "local"), device="cpu", **common)
    alone, whole = [], []
    for r in range(a.repeats):
        alone.append(server_alone(client, a.name, a.data, a.model, a.top_k))
        start = time.perf_counter()
        cache_from_server(a.server, a.data, str(work / f"served{r}"), tokenizer=a.model, model=a.name,
                          concurrency=a.concurrency, batch_size=8 * a.concurrency, overwrite=True, **common)
        whole.append(time.perf_counter() - start)
    served, local = TeacherCache(str(work / "served0")), TeacherCache(str(work / "local"))
    report["targets"] = compare(served, local, a.data, a.model)
    report["timing"] = {"server_alone_s": [round(x, 3) for x in alone],
                        "cache_from_server_s": [round(x, 3) for x in whole], "examples": served.num_examples,
                        "overhead": round(statistics.median(whole) / statistics.median(alone), 3)}
    report["kd_losses"] = {"served_cache": kd_losses(a.model, a.student, str(work / "served0"), a.data,
                                                     str(work / "kd_served"), a.steps),
                           "in_process_cache": kd_losses(a.model, a.student, str(work / "local"), a.data,
                                                         str(work / "kd_local"), a.steps)}
    (out / "served.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

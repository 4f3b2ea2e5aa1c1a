"""Pilot: the open regime with the student SFT-trained first (PromptKD's published setting), one training seed.

From the run's data (references sampled at seed 10; scored here at sampling seed 20) and its layer-dropped
student: sft_init = SFT for STEPS_INIT steps; then sft (continued), kd, rkl and promptkd for STEPS steps each from
sft_init. Scores: CE on the test references, ROUGE-L at sampling seed 20, final weights.

    python docs/smollm2-open/pilot_sft_first.py RUN_DIR OUT_DIR [METHODS]     # RUN_DIR: an smollm2-open run
"""

import json
import os
import sys
import time

import torch

from promptkd.hf.models import load_model, load_tokenizer
from promptkd.train import TrainConfig, train
from promptkd.train.data import load_examples
from promptkd.train.evaluate import evaluate, reference_ce

RUN = sys.argv[1]
OUT = sys.argv[2]
STEPS_INIT, STEPS = int(os.environ.get("STEPS_INIT", 120)), int(os.environ.get("STEPS", 30))
TEACHER = os.path.join(RUN, "init", "teacher")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def score(model_dir):
    tok = load_tokenizer("m", model_dir)
    model = load_model("m", model_dir, torch.float32, torch.device("cpu")).eval()
    examples, _ = load_examples(os.path.join(RUN, "data", "test.jsonl"), tok, 64, 96)
    items = [{"prompt": e.prompt, "references": e.references} for e in examples]
    r = evaluate(model, tok, items, seeds=(20,), max_new_tokens=48, batch_size=64)
    return {"ce": reference_ce(model, tok, examples), "rougeL": r["rougeL"]}


def run(method, student, steps, name, lr=3e-4):
    out = os.path.join(OUT, name)
    if not os.path.isfile(os.path.join(out, "final", "model", "config.json")):
        t0 = time.perf_counter()
        cfg = TrainConfig(method=method, student=student, teacher=TEACHER,
                          train_file=os.path.join(RUN, "data", "train.jsonl"), valid_file="", output_dir=out,
                          max_length=96, max_prompt_length=64, batch_size=8,
                          max_steps=steps, lr=lr, prompt_lr=1e-3, warmup_steps=5, max_new_tokens=48, progress=False,
                          tensorboard=False, dtype="float32", device="cpu", seed=10)
        train(cfg, log=lambda _: None)
        log(f"{name}: {steps} steps in {time.perf_counter() - t0:.0f} s")
    s = score(os.path.join(out, "final", "model"))
    log(name, s)
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps({"name": name, **s}) + "\n")
    return os.path.join(out, "final", "model")


os.makedirs(OUT, exist_ok=True)
init = run("sft", os.path.join(RUN, "init", "student"), STEPS_INIT, f"sft_init{STEPS_INIT}")
for m in (sys.argv[3].split(",") if len(sys.argv) > 3 else ("sft", "kd", "rkl", "promptkd")):
    run(m, init, STEPS, m)

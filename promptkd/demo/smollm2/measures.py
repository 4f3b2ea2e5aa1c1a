"""The experiments' stages but training: the teacher and the task files (:func:`prepare`), the teacher caches,
each stage's config, and the measures of the trained models (scores, the prompt's cost to the teacher, ExAccErr)."""

from __future__ import annotations

import json
import math
import os
import time

from ...train.config import TrainConfig
from .settings import ExperimentSettings, parse_cache, references_seed


def build_caches(out: str, specs: tuple[str, ...], teacher_dir: str, paths: dict, settings: ExperimentSettings,
                 seed: int, log=print, timed=lambda name, fn: fn(), server: str | None = None) -> dict:
    """``caches/SPEC`` for each ``--cache`` spec: the SFT teacher's sparse targets over the training file
    (``promptkd.train.teacher_cache``), or for a ``srv-`` spec the served teacher's at ``server``
    (:func:`promptkd.served.cache_from_server`), kept across resumes (a cache cut short resumes). Returns their
    manifests."""
    from ...served.cache import cache_from_server
    from ...train.teacher_cache import cache_teacher
    from .settings import SERVED

    manifests = {}
    for spec in specs:
        mode, n = parse_cache(spec)
        path = os.path.join(out, "caches", spec)
        manifest = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest):
            started = os.path.isdir(path) and bool(os.listdir(path))
            kwargs = {"top_k" if mode == "top_k" else "samples": n}
            common = dict(max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
                          resume=started, log=lambda _: None, **kwargs)
            if spec.startswith(SERVED):  # the examples are encoded with the student's tokenizer, the teacher's here
                timed(f"cache_{spec}", lambda path=path, common=common: cache_from_server(
                    server, paths["train"], path, tokenizer=teacher_dir, **common))
            else:
                timed(f"cache_{spec}", lambda path=path, common=common: cache_teacher(
                    teacher_dir, paths["train"], path, batch_size=settings.batch_size, seed=seed,
                    device=settings.device, **common))
            log(f"cache {spec}: written to {path}")
        with open(manifest) as f:
            manifests[spec] = json.load(f)
    return manifests

def stage_config(settings: ExperimentSettings, paths: dict, out: str, experiment_seed: int, **changes) -> TrainConfig:
    """A stage's config; ``changes`` may set another training ``seed`` (validation keeps the experiment's)."""
    s = settings
    base = dict(train_file=paths["train"], valid_file=paths["valid"], max_length=s.max_length,
                max_prompt_length=s.max_prompt_length, batch_size=s.batch_size, seed=experiment_seed,
                warmup_steps=s.warmup_steps, weight_decay=0.01, clip_grad_norm=1.0, eval_seeds=(experiment_seed,),
                eval_max_new_tokens=s.max_new_tokens, eval_batch_size=64, max_new_tokens=s.max_new_tokens,
                prompt_length=s.prompt_length, keep_checkpoints=1, progress=False, tensorboard=False,
                output_dir=out, dtype=s.dtype, device=s.device)
    base.update(changes)
    return TrainConfig(**base)

def prepare(out: str, teacher: str, settings: ExperimentSettings, seed: int, log=print) -> dict:
    """The teacher as a float32 Hugging Face directory and the task files; returns their paths. In the ``open``
    regime the references are the teacher's answers (:func:`promptkd.demo.open_tasks.answer_with_teacher`),
    each split written once (a resumed run keeps the splits already answered)."""
    import shutil

    import torch

    from ...files import publish_dir, write_jsonl
    from ...hf.models import load_model, load_tokenizer
    from ..run import compact
    from ..tasks import generate_tasks

    paths = {split: os.path.join(out, "data", f"{split}.jsonl") for split in ("train", "valid", "test", "test_heldout")}
    paths["teacher_init"] = target = os.path.join(out, "init", "teacher")
    if not os.path.isfile(os.path.join(target, "config.json")):
        t0 = time.perf_counter()
        model = load_model("--teacher", teacher, torch.float32, torch.device(settings.device))
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
    from ..open_tasks import answer_with_teacher, generate_open_tasks

    splits = generate_open_tasks(seed, n_train=settings.n_train, n_valid=settings.n_valid, n_test=settings.n_test)
    model = load_model("teacher", target, torch.float32, torch.device(settings.device)).eval()
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

def evaluate_model(model_dir: str, paths: dict, settings: ExperimentSettings) -> dict:
    """Per split: sampled ROUGE-L and exact match over ``eval_seeds`` (:func:`promptkd.train.evaluate.evaluate`)
    and ``ce``, the cross-entropy on the references (:func:`promptkd.train.evaluate.reference_ce`)."""
    import torch

    from ...hf.models import load_model, load_tokenizer
    from ...train.data import load_examples
    from ...train.evaluate import evaluate, reference_ce

    tokenizer = load_tokenizer("model", model_dir)
    model = load_model("model", model_dir, torch.float32, torch.device(settings.device)).eval()
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

    from ...hf.models import LMOutput, linear_cross_entropy, load_model, load_tokenizer
    from ...hf.prompted import ADAPTER_WEIGHTS, PromptedTeacher
    from ...train.data import collate, load_examples

    known = known or {}
    result = {"no_prompt": known.get("no_prompt"), "initial_prompt": known.get("initial_prompt"),
              "learned": {k: v for k, v in known.get("learned", {}).items() if k in prompt_dirs}}
    todo = [k for k in prompt_dirs if k not in result["learned"]]
    if result["no_prompt"] is not None and result["initial_prompt"] is not None and not todo:
        return {**result, "num_examples": known["num_examples"]}
    tokenizer = load_tokenizer("teacher", teacher_dir)
    model = load_model("teacher", teacher_dir, torch.float32, torch.device(settings.device))
    examples, _ = load_examples(paths["test"], tokenizer, settings.max_prompt_length, settings.max_length)
    batches = [collate([e.prompt_ids for e in examples[i:i + 32]], [e.response_ids for e in examples[i:i + 32]],
                       tokenizer.pad_token_id, tokenizer.eos_token_id) for i in range(0, len(examples), 32)]

    def cross_entropy(prompted: PromptedTeacher, use_prompt: bool = True) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(model.device) for k, v in batch.items()}
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

    from ...hf.models import load_model, load_tokenizer
    from ...train.data import load_examples
    from ...train.exposure import exposure_bias, json_ready, plot_exposure, sample_continuations

    options = dict(samples=settings.exposure_samples, max_length=settings.exposure_length, seed=seed, batch_size=40)
    done = {k: v for k, v in (known or {}).get("students", {}).items() if k in students}
    todo = [k for k in students if k not in done]
    if todo:
        tokenizer = load_tokenizer("teacher", teacher_dir)
        examples, _ = load_examples(paths["test"], tokenizer, settings.max_prompt_length, settings.max_length,
                                    limit=settings.exposure_prompts)
        prompts = [e.prompt_ids for e in examples]
        teacher = load_model("teacher", teacher_dir, torch.float32, torch.device(settings.device)).eval()
        teacher_samples = sample_continuations(teacher, tokenizer, prompts, **options)
        for name in todo:
            student = load_model(name, students[name], torch.float32, torch.device(settings.device)).eval()
            done[name] = json_ready(exposure_bias(teacher, student, tokenizer, prompts,
                                                  teacher_samples=teacher_samples, **options))
        known = {"num_prompts": len(prompts)}
    curves = {k: done[k] for k in students}
    drawn = {k: {**v, "exaccerr": [math.nan if x is None else x for x in v["exaccerr"]]} for k, v in curves.items()}
    plot_exposure(drawn, os.path.join(out, "exposure.png"), "Exposure bias (ExAccErr) against the teacher")
    return {"num_prompts": known["num_prompts"], **options, "students": curves}

"""``promptkd demo``: the whole method on an embedded task family, with nothing to download.

1. Generate the bundled instruction tasks (:mod:`promptkd.demo.tasks`), written as compact prompt
   records (:func:`compact`), and train a byte-level BPE tokenizer on them (:mod:`promptkd.demo.tokenizer`).
2. Build a small Llama-style teacher and a smaller student from configs (random weights).
3. Fine-tune the teacher (SFT), give the student an SFT initialisation (``sft_init``).
4. From that initialisation, for the same number of steps each: continue SFT (``sft``, the control)
   and distil with every method (kd, rkl, gkd, distillm, promptkd); model selection by validation
   ROUGE-L.
5. Evaluate the teacher, the SFT student and every distilled student on the test split and on the
   held-out instruction templates (sampled generation, several seeds), print the table, write
   ``results.md`` / ``results.json`` and plots.

The output directory is never overwritten unless asked: one that holds a demo run is an error
without ``resume`` (continue it: finished stages are kept, an interrupted one resumes from its
last checkpoint, with the same settings and seed, recorded in ``demo.json``) or ``overwrite``
(remove it and start again).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from ..train.config import TrainConfig

METHODS = ("kd", "rkl", "gkd", "distillm", "promptkd")
STAGES = ("teacher", "sft_init", "sft", *METHODS)
#: What a demo run writes in its output directory.
ENTRIES = ("demo.json", "data", "init", *STAGES, "results.json", "results.md", "plots")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedules of the demo (the defaults take about 15 minutes on 2 CPU cores)."""

    n_train: int = 6000
    n_valid: int = 60
    n_test: int = 300
    vocab_size: int = 1024
    teacher: tuple = (192, 4, 4, 512)     # hidden, layers, heads, MLP width
    student: tuple = (96, 2, 2, 256)
    teacher_steps: int = 1600
    sft_steps: int = 400
    distill_steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3                      # teacher and SFT student, from scratch
    distill_lr: float = 5e-4
    prompt_lr: float = 3e-3
    eval_seeds: tuple = (10, 20, 30)
    eval_examples: int = 300


QUICK = DemoSettings(n_train=1200, n_valid=24, n_test=48, vocab_size=512, teacher=(96, 2, 2, 256),
                     student=(48, 1, 2, 128), teacher_steps=60, sft_steps=30, distill_steps=8, batch_size=16,
                     eval_seeds=(10,), eval_examples=48)


def _llama(tokenizer, size: tuple, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, mlp = size
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=mlp,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _texts(path: str) -> list[str]:
    from ..train.data import parse_record, read_jsonl

    texts = []
    for number, record in read_jsonl(path):
        prompt, references = parse_record(record, f"{path}:{number}")
        texts.append(prompt + references[0])
    return texts


def compact(record: dict) -> dict:
    """A task record as an untemplated ``prompt`` record: ``instruction [context] Answer:`` (one per line).

    The reference's Alpaca template adds about 30 tokens to prompts of about 15 here, so at the
    demo's model sizes it would be most of the compute; real data (Dolly-style records) gets the
    template.
    """
    parts = [record["instruction"]] + ([record["context"]] if record["context"] else [])
    return {"prompt": "\n".join(parts) + "\nAnswer:\n", "response": record["response"],
            "family": record["family"], "template": record["template"]}


def prepare(out: str, settings: DemoSettings, seed: int, log=print) -> dict:
    """Task files, tokenizer and the two randomly initialised models; returns their paths."""
    import torch

    from ..files import write_jsonl
    from .tasks import generate_tasks
    from .tokenizer import train_tokenizer

    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    splits = generate_tasks(seed, n_train=settings.n_train, n_valid=settings.n_valid, n_test=settings.n_test)
    files = {split: write_jsonl([compact(r) for r in records], os.path.join(data_dir, f"{split}.jsonl"))
             for split, records in splits.items()}
    tokenizer = train_tokenizer(_texts(files["train"]), vocab_size=settings.vocab_size)
    torch.manual_seed(seed)
    paths = dict(files)
    for name, size in (("teacher", settings.teacher), ("student", settings.student)):
        model = _llama(tokenizer, size, max_positions=256)
        path = os.path.join(out, "init", name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[f"{name}_init"] = path
        log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
            f"(hidden {size[0]}, {size[1]} layers), vocabulary {len(tokenizer)}")
    return paths


def _config(settings: DemoSettings, paths: dict, out: str, seed: int, **changes) -> TrainConfig:
    base = dict(train_file=paths["train"], valid_file=paths["valid"], max_length=160, max_prompt_length=128,
                batch_size=settings.batch_size, seed=seed, warmup_steps=30, weight_decay=0.01, clip_grad_norm=1.0,
                eval_seeds=(seed,), eval_max_new_tokens=24, eval_batch_size=64, max_new_tokens=24,
                keep_checkpoints=1, progress=False, tensorboard=False, output_dir=out)
    base.update(changes)
    return TrainConfig(**base)


def _evaluate(model_dir: str, paths: dict, settings: DemoSettings) -> dict:
    import torch

    from ..hf.models import load_model, load_tokenizer
    from ..train.data import load_examples
    from ..train.evaluate import evaluate

    tokenizer = load_tokenizer("model", model_dir)
    model = load_model("model", model_dir, torch.float32, torch.device("cpu"))
    scores = {}
    for split in ("test", "test_heldout"):
        examples, _ = load_examples(paths[split], tokenizer, 128, 160, limit=settings.eval_examples)
        items = [{"prompt": e.prompt, "references": e.references} for e in examples]
        scores[split] = evaluate(model, tokenizer, items, seeds=settings.eval_seeds, max_new_tokens=24, batch_size=100)
        scores[split].pop("generations")
    return scores


def _prepared(out: str) -> dict | None:
    """The paths :func:`prepare` returns, if an earlier (resumed) run finished preparing."""
    paths = {split: os.path.join(out, "data", f"{split}.jsonl") for split in ("train", "valid", "test", "test_heldout")}
    for name in ("teacher", "student"):
        paths[f"{name}_init"] = os.path.join(out, "init", name)
    done = all(os.path.isfile(p) for k, p in paths.items() if not k.endswith("_init")) and all(
        os.path.isfile(os.path.join(paths[k], "model.safetensors")) for k in ("teacher_init", "student_init"))
    return paths if done else None


def run_demo(out: str = "runs/demo", quick: bool = False, seed: int = 10, log=print, resume: bool = False,
             overwrite: bool = False) -> dict:
    """Runs the demo into ``out`` and returns the results table as a dict (see the module docstring).

    ``resume`` continues a demo run in ``out`` (an error if there is none, or if it has other
    settings); ``overwrite`` replaces one. Without either, an ``out`` holding a demo run is an error."""
    from transformers.utils import logging as hf_logging

    from ..files import write_text
    from ..train.plot import bar_chart, plot_comparison
    from .stages import best_model, start, table, train_stage, verdict

    hf_logging.disable_progress_bar()  # loading / saving bars for every stage drown the demo's own lines
    settings = QUICK if quick else DemoSettings()
    started = time.perf_counter()
    continuing = start(out, {"settings": json.loads(json.dumps(asdict(settings))), "seed": seed}, resume, overwrite,
                       manifest_name="demo.json", entries=ENTRIES, what="demo run")
    paths = (_prepared(out) if continuing else None) or prepare(out, settings, seed, log)

    def stage(name: str, **changes) -> str:
        run_dir = os.path.join(out, name)
        return train_stage(run_dir, _config(settings, paths, run_dir, seed, **changes), log)

    runs = {}
    runs["teacher"] = stage("teacher", method="sft", student=paths["teacher_init"], lr=settings.lr,
                            max_steps=settings.teacher_steps, eval_interval=max(1, settings.teacher_steps // 6))
    runs["sft_init"] = stage("sft_init", method="sft", student=paths["student_init"], lr=settings.lr,
                             max_steps=settings.sft_steps, eval_interval=max(1, settings.sft_steps // 6))
    teacher, student = best_model(runs["teacher"]), best_model(runs["sft_init"])
    # "sft" continues the SFT initialisation for as many steps as the distillation runs get: the control
    # that tells distillation apart from more training.
    for method in ("sft", *METHODS):
        runs[method] = stage(method, method=method, student=student, teacher=teacher, lr=settings.distill_lr,
                             prompt_lr=settings.prompt_lr, max_steps=settings.distill_steps,
                             eval_interval=max(1, settings.distill_steps // 5))

    rows = {}
    for name, run_dir in runs.items():
        rows[name] = _evaluate(best_model(run_dir), paths, settings)
    text = table(rows, len(settings.eval_seeds)) + "\n\n" + verdict(rows)
    log(text)
    results = {"settings": asdict(settings), "seed": seed, "scores": rows,
               "seconds": round(time.perf_counter() - started, 1)}
    write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    write_text(os.path.join(out, "results.md"), text + "\n")

    plots = os.path.join(out, "plots")
    bar_chart({k: v["test"]["rougeL"] for k, v in rows.items()}, os.path.join(plots, "test_rougeL.png"),
              "Test ROUGE-L (sampled, mean over seeds)", "ROUGE-L",
              errors={k: v["test"]["rougeL_std"] for k, v in rows.items()})
    distilled = {k: runs[k] for k in ("sft", *METHODS)}  # all start from sft_init
    plot_comparison(distilled, "valid/rougeL", os.path.join(plots, "valid_rougeL.png"), "Validation ROUGE-L")
    plot_comparison({k: runs[k] for k in METHODS}, "train/loss", os.path.join(plots, "train_loss.png"),
                    "Training loss (each method's own objective)")
    log(f"demo finished in {results['seconds']:.0f} s; results in {out}/results.md, plots in {plots}")
    return results

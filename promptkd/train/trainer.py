"""The training loop: config in, run directory out.

    from promptkd.train import TrainConfig, train
    run_dir = train(TrainConfig(method="promptkd", student=..., teacher=..., train_file=...))

What one step of each method computes is in :mod:`promptkd.train.methods`; the run directory, its
checkpoints and the resume rules in :mod:`promptkd.train.checkpoints`; processes (torchrun: data
parallel, or with ``fsdp`` sharded by FSDP2) in :mod:`promptkd.train.distributed`. What is guaranteed:

- nothing is overwritten unless asked: an ``output_dir`` that holds a previous run is an error
  without ``resume`` or ``overwrite``;
- ``resume=True`` continues from the newest checkpoint (an error if there is none) and reaches the
  same weights as an uninterrupted run (bit-identical on the CPU). Only the settings in
  :data:`~promptkd.train.checkpoints.RESUMABLE` may differ from the checkpoint's (run length,
  validation/save/log intervals, device, kernel implementations, recomputation), and they apply from
  the resume on; any other change, or training data whose contents changed, is refused naming it;
- a NaN or infinite loss or gradient stops the run before that step is applied, and no checkpoint,
  ``best/`` or ``final/`` is ever written with non-finite weights (:class:`TrainingDiverged`);
- checkpoint files are read with ``torch.load(weights_only=True)``: a planted file cannot run code;
- ``kd`` with ``teacher_cache`` loads no teacher: the cache is verified (every shard's sha256) and checked
  against this run's tokenizer, training data, lengths and example count before the student loads, and a
  resume must use the cache the checkpoint was trained from (the same manifest);
- ``teacher_server`` loads no teacher either (its output head alone for served hidden states): the server is
  probed (model, tokenizer, payload) before the student loads, and asked at every step
  (:mod:`promptkd.served.online`); a resume may point at another URL.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time

import torch

from ..errors import InputError, TrainingDiverged
from ..hf.fsdp import full_state_dict, is_dtensor
from ..hf.models import check_model_path, check_same_tokens, has_tokenizer, load_tokenizer
from .checkpoints import MetricsLog, RunDirectory, Snapshot, checkpoints, file_digest
from .config import TrainConfig
from .data import DataOrder, load_examples
from .distributed import Processes, clip_gradients, grad_norm, local_optimizer_state, sharded_optimizer_state
from .methods import Distillation, baseline_step, load_models, promptkd_step
from .teacher_cache import TeacherCache

__all__ = ["Trainer", "TrainConfig", "TrainingDiverged", "train"]


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _warmup_then_constant(warmup: int):
    # As transformers' get_constant_schedule_with_warmup, which the reference code uses.
    return lambda step: step / warmup if step < warmup else 1.0


class Trainer:
    """Runs one configuration. Construction checks everything (paths, data, tokenizers, the run
    directory, a resume's settings) and loads the models; :meth:`train` runs the steps and returns
    the run directory.

    ``resume``: continue from the newest checkpoint in ``output_dir`` (an error if there is none);
    settings outside ``RESUMABLE`` must equal the checkpoint's. ``overwrite``: start afresh in an
    ``output_dir`` that holds a previous run, removing that run's files when training starts.
    Without either, an ``output_dir`` holding a previous run is an error: nothing is overwritten
    unless asked."""

    def __init__(self, config: TrainConfig, resume: bool = False, log=print, overwrite: bool = False):
        config.validate()
        config.check_ready()
        if resume and overwrite:
            raise InputError("resume and overwrite exclude each other: continue the run in output_dir, or replace it")
        if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
            raise InputError(f"output_dir {config.output_dir!r} is a file, not a directory")
        self.cfg = config
        self.log_fn = log
        self.procs = Processes(config.device)
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.close()  # an exiting process must not leave its process group behind
            raise

    def _setup(self, resume: bool, overwrite: bool) -> None:
        config = self.cfg
        self.device = self.procs.device
        self.dtype = _dtype(config.dtype, self.device)
        if self.dtype != torch.float32 and self.device.type == "cpu":
            raise InputError(f"dtype={config.dtype} needs a CUDA device; on the CPU use float32")
        if config.fsdp and not self.procs.distributed:
            raise InputError("fsdp: true shards the models over several processes: launch with torchrun "
                             "--nproc_per_node N (N > 1), or turn fsdp off")
        self.run = RunDirectory(config.output_dir, self.procs, resume, overwrite)
        self.run_dir = self.run.path

        # Everything that can be wrong with the inputs is found before any model is loaded.
        check_model_path("student", config.student)
        # kd from a cache, and a served teacher, load no teacher (served hidden states: its output head alone)
        head_only = bool(config.teacher_server) and config.teacher_server_payload == "hidden"
        online = config.method != "sft" and not config.teacher_cache and not config.teacher_server
        if online or head_only:
            check_model_path("teacher", config.teacher)
        tokenizer_path = config.tokenizer or config.student
        self.tokenizer = teacher_tokenizer = load_tokenizer("tokenizer", tokenizer_path)
        if (online or head_only) and has_tokenizer(config.teacher):
            teacher_tokenizer = load_tokenizer("teacher", config.teacher)
            if not config.tokenizer:
                check_same_tokens(self.tokenizer, teacher_tokenizer, tokenizer_path, config.teacher)
        self.train_examples, stats = load_examples(config.train_file, self.tokenizer, config.max_prompt_length,
                                                   config.max_length)
        self.valid_examples = []
        if config.valid_file:
            self.valid_examples, _ = load_examples(config.valid_file, self.tokenizer, config.max_prompt_length,
                                                   config.max_length, limit=config.max_valid_examples)
        self._say(f"data: {stats.kept} training examples from {stats.path} ({stats.dropped_long_prompt} dropped for "
                  f"prompts over {config.max_prompt_length} tokens, {stats.truncated_response} responses cut)")
        self.order = DataOrder(len(self.train_examples), config.batch_size, config.gradient_accumulation,
                               self.procs.world_size, config.seed)
        self.total_steps = config.max_steps or config.epochs * self.order.steps_per_epoch

        self.cache = None
        if config.teacher_cache:
            self.cache = TeacherCache(config.teacher_cache)
            self.cache.check_compatible(self.tokenizer, config.train_file, config.max_length,
                                        config.max_prompt_length, len(self.train_examples))
            self._say(f"teacher cache: {config.teacher_cache} ({self.cache.manifest['mode']}, k={self.cache.k}, "
                      f"T={self.cache.temperature}); the teacher is not loaded")
        self.served = self.head = None
        if self.cache is not None and self.cache.hidden:
            self._cached_head()

        if config.teacher_server:
            self._connect_server(head_only)

        self.train_digest = file_digest(config.train_file)
        self.start_step, self.best, self.changes = 0, {"rougeL": None, "step": None}, {}
        if self.run.resume_from:
            self.changes = self.run.check_resume(config, self.train_digest,
                                                 self.cache.digest if self.cache is not None else None)
            self.start_step, self.best = self.run.resume_state["step"], self.run.resume_state["best"]
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.student, self.teacher, self.prompted = load_models(config, self.dtype, self.device, self.tokenizer,
                                                                self.run.resume_from, teacher_tokenizer)
        self.distill = Distillation(config, self.tokenizer, self.student, self.teacher, self.prompted, self.dtype,
                                    self.device, self.procs.rank, cache=self.cache, served=self.served, head=self.head)
        self._build_optimizers()

    def _cached_head(self) -> None:
        """A cache of hidden states: the teacher's output head, read alone from ``teacher`` and checked to be the
        cached teacher's (its weight files' digest, for a cache written in process; the width, for a served one)."""
        from ..hf.head import load_head
        from .teacher_cache.source import local_teacher, teacher_digest

        c, cached = self.cfg, self.cache.manifest["teacher"]
        where = f"teacher_cache {c.teacher_cache!r}"
        if not c.teacher:
            raise InputError(f"{where} holds the teacher's hidden states: set teacher= the teacher's weights, whose "
                             "output head kd applies to them (it is read alone)")
        if "files" in cached:
            mine = teacher_digest(local_teacher(c.teacher))["sha256"]
            if mine != cached["sha256"]:
                raise InputError(f"{where} holds the hidden states of the teacher at {cached.get('path')!r}, and "
                                 f"teacher={c.teacher!r} has other weights (sha256 {mine[:12]}... against "
                                 f"{cached['sha256'][:12]}...): its head would not be the one they feed")
        self.head = load_head("teacher", c.teacher, self.dtype, self.device)
        if self.head.weight.shape[1] != self.cache.k:
            raise InputError(f"{where} holds hidden states of width {self.cache.k}, and the output head of "
                             f"teacher={c.teacher!r} takes {self.head.weight.shape[1]}")
        self._say(f"teacher cache: the teacher's output head from {c.teacher} ({self.head.source})")

    def _connect_server(self, head_only: bool) -> None:
        """teacher_server: the teacher's output head (served hidden states), then the server's probes."""
        from ..hf.head import load_head
        from ..hf.models import load_config
        from ..served.online import OnlineTeacher

        c = self.cfg
        student_config = load_config("student", c.student).get_text_config()
        vocab = student_config.vocab_size
        if head_only:
            self.head = load_head("teacher", c.teacher, self.dtype, self.device)
            vocab = min(vocab, self.head.weight.shape[0])
        self.served = OnlineTeacher(c.teacher_server, c.teacher_server_api, c.teacher_server_model or None,
                                    c.teacher_server_payload, c.teacher_server_top_k, c.teacher_server_concurrency,
                                    c.teacher_server_timeout)
        line = self.served.connect(self.tokenizer, vocab, None if self.head is None else self.head.weight.shape[1])
        head = f"; the teacher's output head from {c.teacher} ({self.head.source})" if head_only else ""
        self._say(f"{line}{head}; the teacher is not loaded")

    def _say(self, text: str) -> None:
        if self.procs.main:
            self.log_fn(text)

    def close(self) -> None:
        """Releases the models and optimizers, then ends the process group the trainer started (see
        :class:`~promptkd.train.distributed.Processes`). The trainer cannot train after this."""
        for name in ("student", "teacher", "prompted", "distill", "cache", "served", "head", "optimizer",
                     "scheduler", "prompt_optimizer", "prompt_scheduler", "student_params"):
            setattr(self, name, None)
        self.procs.close()

    def _build_optimizers(self) -> None:
        """AdamW for the student and (PromptKD) for the soft prompt, warmup then constant; a resume
        restores their state and the random generators' from the checkpoint."""
        cfg = self.cfg

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)

        schedule = _warmup_then_constant(cfg.warmup_steps)
        self.student_params = [p for p in self.student.parameters() if p.requires_grad]
        # FSDP's sharded parameters and the whole ones (an untied head) in separate groups: AdamW's
        # batched updates take one kind at a time.
        sharded = [p for p in self.student_params if is_dtensor(p)]
        whole = [p for p in self.student_params if not is_dtensor(p)]
        self.optimizer = adamw([{"params": group} for group in (sharded, whole) if group], cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.prompt_optimizer = self.prompt_scheduler = None
        if self.prompted is not None and not cfg.prompt_frozen:
            self.prompt_optimizer = adamw([self.prompted.soft_prompt], cfg.prompt_lr or cfg.lr)
            self.prompt_scheduler = torch.optim.lr_scheduler.LambdaLR(self.prompt_optimizer, schedule)
        if not self.run.resume_from:
            return
        state = self.run.load("optimizer.pt", self.device)
        if cfg.fsdp:
            local = self.run.load(f"optimizer-rank{self.procs.rank}.pt", self.device)
            state["student"] = sharded_optimizer_state(local, self.optimizer)
        self.optimizer.load_state_dict(state["student"])
        self.scheduler.load_state_dict(state["student_scheduler"])
        if self.prompt_optimizer is not None:
            self.prompt_optimizer.load_state_dict(state["prompt"])
            self.prompt_scheduler.load_state_dict(state["prompt_scheduler"])
        rng = self.run.load(f"rng-rank{self.procs.rank}.pt", "cpu")
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # ---- the step ----

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        last = checkpoints(self.run_dir)
        return TrainingDiverged(f"step {step}: {what}; the run stopped without applying this step or saving those "
                                f"weights. Last good checkpoint: {last[-1] if last else 'none'}")

    def _lr(self, which: str) -> float:
        return (self.prompt_scheduler if which == "prompt" else self.scheduler).get_last_lr()[0]

    def _apply(self, step: int, what: str, loss_sum: torch.Tensor) -> tuple[float, float]:
        """Averages, checks, clips and applies the gradients of the ``what`` loss ("prompt": the soft
        prompt's; else the student's); returns (loss, gradient norm before clipping).

        A NaN or infinite loss or gradient stops the run before the step is applied. Both are read
        with one host read, the one per optimizer step that logging and the guard need."""
        if what == "prompt":
            optimizer, scheduler, params = self.prompt_optimizer, self.prompt_scheduler, [self.prompted.soft_prompt]
        else:
            optimizer, scheduler, params = self.optimizer, self.scheduler, self.student_params
        loss = self.procs.mean(loss_sum.detach().float().reshape(1))
        self.procs.average_gradients([p for p in params if not is_dtensor(p)])  # FSDP averaged the others
        norm = grad_norm(params, self.device)
        value, norm_value = torch.cat([loss, norm.reshape(1).to(loss.device)]).tolist()
        if not math.isfinite(value):
            raise self._diverged(step + 1, f"the {what} loss is {value}")
        if not math.isfinite(norm_value):
            raise self._diverged(step + 1, f"the {what} loss is finite ({value:.6g}) but its gradient is not "
                                       f"(norm {norm_value})")
        if self.cfg.clip_grad_norm > 0:
            clip_gradients(params, norm, self.cfg.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return value, norm_value

    def _step(self, step: int) -> dict:
        micro_batches = [[self.train_examples[i] for i in idx]
                         for idx in self.order.micro_batches(step, self.procs.rank)]
        if self.cfg.method == "promptkd":
            return promptkd_step(self.distill, micro_batches, step, self.total_steps, self._apply, self._lr)
        return baseline_step(self.distill, micro_batches, step, self._apply, self._lr)

    # ---- validation, saving ----

    def validate(self) -> dict:
        """Sampled ROUGE-L and exact match on the validation examples and, except under FSDP (whose sharded
        output weight the chunked loss cannot read outside a forward), ``valid/ce``: the student's
        cross-entropy on their first references (teacher forcing, nats per token), which shows where SFT
        stops improving; for ``promptkd`` (not under FSDP) the ``prompt/*`` diagnostics of
        :mod:`promptkd.train.diagnostics`."""
        from .diagnostics import prompt_diagnostics
        from .evaluate import evaluate, reference_ce

        examples = [{"prompt": e.prompt, "references": e.references} for e in self.valid_examples]
        result = evaluate(self.student, self.tokenizer, examples, seeds=self.cfg.eval_seeds,
                          max_new_tokens=self.cfg.eval_max_new_tokens, batch_size=self.cfg.eval_batch_size,
                          synced_gpus=self.cfg.fsdp)
        values = {"valid/rougeL": result["rougeL"], "valid/exact_match": result["exact_match"]}
        if not self.cfg.fsdp:
            was_training = self.student.training
            self.student.eval()
            values["valid/ce"] = reference_ce(self.student, self.tokenizer, self.valid_examples,
                                              self.cfg.eval_batch_size)
            self.student.train(was_training)
            if self.prompted is not None:  # what the soft prompt does to the teacher (promptkd.train.diagnostics)
                values.update(prompt_diagnostics(self.distill, self.valid_examples, self.tokenizer,
                                                 seeds=self.cfg.eval_seeds, max_new_tokens=self.cfg.eval_max_new_tokens,
                                                 batch_size=self.cfg.eval_batch_size))
        return values

    def _snapshot(self, step: int) -> Snapshot:
        """What every save writes; first the weights and the soft prompt must be finite (one host read;
        under FSDP a collective, each process checking its shards, then gathering the whole weights)."""
        tensors = [p.to_local() if is_dtensor(p) else p for p in self.student_params]
        if self.prompted is not None:
            tensors.append(self.prompted.soft_prompt)
        finite = torch.stack([t.detach().isfinite().all() for t in tensors]).all().to(torch.float32)
        if self.cfg.fsdp:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise self._diverged(step, "the weights are not finite")
        state = full_state_dict(self.student, keep=self.procs.main) if self.cfg.fsdp else None
        return Snapshot(self.student, state, self.tokenizer, self.prompted, self.cfg.teacher)

    def save_checkpoint(self, step: int) -> str:
        weights = self._snapshot(step)
        optimizers = {"student": None if self.cfg.fsdp else self.optimizer.state_dict(),  # FSDP: per process
                      "student_scheduler": self.scheduler.state_dict()}
        if self.prompt_optimizer is not None:
            optimizers.update(prompt=self.prompt_optimizer.state_dict(),
                              prompt_scheduler=self.prompt_scheduler.state_dict())
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        local = local_optimizer_state(self.optimizer.state_dict()) if self.cfg.fsdp else None
        epoch, within = divmod(step, self.order.steps_per_epoch)
        state = {"step": step, "epoch": epoch, "step_in_epoch": within,
                 "examples_seen": step * self.order.global_batch, "world_size": self.procs.world_size,
                 "best": self.best, "train_sha256": self.train_digest,
                 "teacher_cache_sha256": self.cache.digest if self.cache is not None else None,
                 "config": self.cfg.to_dict()}
        return self.run.save_checkpoint(step, weights, optimizers if self.procs.main else None, local, rng, state,
                                        self.cfg.keep_checkpoints)

    # ---- the loop ----

    def train(self) -> str:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.procs.main:
            self.run.start(cfg, self.start_step, self.changes, self._say)
        self.procs.barrier()
        metrics = MetricsLog(self.run_dir, self.procs.main, cfg.tensorboard,
                             self.start_step if self.run.resume_from else None)
        if self.run.resume_from:
            changed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items())
            self._say(f"resuming from {self.run.resume_from} (step {self.start_step} of {self.total_steps})"
                      + (f" with changed settings: {changed}" if changed else ""))
        eval_every = cfg.eval_interval or self.order.steps_per_epoch
        save_every = cfg.save_interval or self.order.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=cfg.method, dynamic_ncols=True,
                   disable=not (self.procs.main and cfg.progress), file=sys.stderr)
        try:
            for step in range(self.start_step, self.total_steps):
                started = time.perf_counter()
                values = self._step(step)
                tokens = values.pop("tokens") * self.procs.world_size  # an estimate: rank 0's count
                values["train/step_s"] = seconds = time.perf_counter() - started
                values["train/tokens_per_s"] = tokens / max(seconds, 1e-9)
                done = step + 1
                if self.valid_examples and (done % eval_every == 0 or done == self.total_steps):
                    if self.procs.main or cfg.fsdp:  # a sharded student generates on every process
                        values.update(self.validate())
                        score = values["valid/rougeL"]
                        if self.best["rougeL"] is None or score > self.best["rougeL"]:
                            self.best = {"rougeL": score, "step": done}
                            self.run.save_weights("best", self._snapshot(done), {"step": done, **self.best})
                    self.procs.barrier()
                if done % cfg.log_interval == 0 or "valid/rougeL" in values or done == self.total_steps:
                    metrics.log(done, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['train/tokens_per_s']:.0f}")
                bar.update(1)
                if done % save_every == 0 or done == self.total_steps:
                    self.save_checkpoint(done)
        finally:
            bar.close()
            metrics.close()
        self.run.save_weights("final", self._snapshot(self.total_steps))
        if self.procs.main and self.prompted is not None:
            from .diagnostics import plot_prompt_diagnostics

            plot_prompt_diagnostics(self.run_dir)
        if self.procs.main:
            best = f", best validation ROUGE-L {self.best['rougeL']:.2f} at step {self.best['step']}" \
                if self.best["rougeL"] is not None else ""
            self._say(f"done: {self.total_steps} steps{best}; run directory {self.run_dir}")
        self.procs.barrier()
        return self.run_dir


def train(config: TrainConfig, resume: bool = False, log=print, overwrite: bool = False) -> str:
    """Trains ``config`` and returns its run directory (see the module docstring and :class:`Trainer`)."""
    trainer = Trainer(config, resume=resume, log=log, overwrite=overwrite)
    try:
        return trainer.train()
    finally:
        trainer.close()

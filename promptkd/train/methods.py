"""What each training method computes: one table for the baselines, the PromptKD step, and the
:class:`Distillation` they use (batches, the student's samples, the models' hidden states, the losses).

Every loss is computed from hidden states and output-embedding weights with
:func:`promptkd.fused_linear_kd_loss` (or the chunked :func:`promptkd.hf.models.linear_cross_entropy`):
no [tokens, vocab] logits tensor is made. With p the teacher, q the student and TP the teacher with
the soft prompt, one step of each method (``TrainConfig.method``) is:

- ``sft``      cross-entropy on the ground-truth responses.
- ``kd``       kd_ratio * KL(p || q) + (1 - kd_ratio) * CE on the ground-truth responses. From a teacher
               cache (``teacher_cache``, :mod:`promptkd.train.teacher_cache`) the teacher is not run: its cached
               sparse targets (ids and log-probabilities at each response position) replace p, and the KL is
               :func:`promptkd.fused_linear_sparse_kd_loss`'s at the cache's temperature: for top-k targets the
               exact KL of p and q coarsened to the k ids plus one tail bucket (the full KL when k covers the
               vocabulary), for sampled targets the KL from the renormalised empirical distribution (whose
               gradient is the full KL's in expectation); from a cache of the teacher's hidden states
               (``cache-teacher --hidden``) the exact KL with the teacher's head read alone. From a served
               teacher (``teacher_server``) the same sparse loss on the server's top k plus the label, asked at
               each step; from its hidden states
               (``teacher_server_payload: hidden``) the exact KL with the teacher's head, as for every baseline.
- ``rkl``      KL(q || p) on responses the student samples. From a served teacher's log-probabilities: the
               sampled-token estimator of :func:`promptkd.sampled_reverse_kl_loss` (log q(y) - log p(y) at the
               student's own tokens, score-function gradient), which needs one teacher number per token.
- ``gkd``      JSD(gkd_beta) on student samples with probability gkd_lambda, else on ground truth.
- ``distillm`` skew forward KL(p || a p + (1-a) q) or skew reverse KL(q || (1-a) p + a q), a = distillm_alpha,
               on ground truth (student samples with probability distillm_student_ratio).
- ``promptkd`` (1) the student samples a response per instruction (temperature 1, no truncation);
               (2) prompt step, gradient to the soft prompt only:
                   KL(p_TP || q_S) + prompt_reg * (1 - step / total) * KL(p_TP || p_T);
               (3) student step with the updated prompt (no gradient to it): KL(q_S || p_TP).
               ``prompt_frozen``: no prompt step; the student learns from the teacher with its initial prompt
               (the ablation that isolates what learning the prompt does).

Losses are token means over response tokens, averaged over micro-batches (and processes, by the
trainer). ``num_samples`` K samples K responses per instruction; ``share_prefix`` runs each
instruction once as a prefix shared by its K responses (prefix attention in both models).

To add a baseline, add a row to :data:`BASELINES` (and its name to ``promptkd.train.config.METHODS``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..hf.fsdp import shard
from ..hf.models import (
    LMOutput,
    linear_cross_entropy,
    lm_hidden,
    load_model,
    probe_logits,
)
from ..impls import pick_impl
from ..kd.api import fused_linear_kd_loss
from ..kd.pair import PAIR_IMPLS, fused_linear_kl_pair_loss
from ..sparse.api import SPARSE_IMPLS, fused_linear_sparse_kd_loss
from ..sparse.sampled import sampled_reverse_kl_loss
from .config import TrainConfig
from .data import Example, collate, collate_shared


@dataclass(frozen=True)
class Baseline:
    """How a baseline treats a micro-batch: the probability that it is the student's samples rather
    than the ground truth, and the fused loss's keywords (None: cross-entropy on the labels)."""

    on_policy: Callable[[TrainConfig], float]
    loss: Callable[[TrainConfig], dict] | None


BASELINES = {
    "sft": Baseline(lambda c: 0.0, None),
    "kd": Baseline(lambda c: 0.0, lambda c: dict(divergence="forward_kl", soft_weight=c.kd_ratio,
                                                 hard_weight=1.0 - c.kd_ratio)),
    "rkl": Baseline(lambda c: 1.0, lambda c: dict(divergence="reverse_kl")),
    "gkd": Baseline(lambda c: c.gkd_lambda, lambda c: dict(divergence="jsd", beta=c.gkd_beta)),
    "distillm": Baseline(lambda c: c.distillm_student_ratio,
                         lambda c: dict(divergence=f"skew_{c.distillm_skew}_kl", alpha=c.distillm_alpha)),
}


def load_models(cfg: TrainConfig, dtype: torch.dtype, device: torch.device, tokenizer, resume_from: str | None,
                teacher_tokenizer=None):
    """The models ``cfg.method`` needs: (student, teacher or None, prompted teacher or None). The student
    comes from the checkpoint being resumed when there is one; its weights stay float32 (AdamW's master
    copy; bfloat16 runs compute under autocast). The teacher is frozen; ``share_prefix`` routes both
    models' attention through prefix attention; ``fsdp`` shards both.

    The soft prompt starts as the teacher's own input embeddings of ``prompt_init_text``, tokenized by
    ``teacher_tokenizer`` (the teacher's tokenizer; ``tokenizer`` when it ships none), as the reference does."""
    student = load_model("student", os.path.join(resume_from, "model") if resume_from else cfg.student,
                         torch.float32, device)
    probe_logits("student", student)
    student.train()
    if cfg.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # the newer name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = prompted = None
    if cfg.method != "sft" and not cfg.teacher_cache and not cfg.teacher_server:  # cached or served: no teacher
        teacher = load_model("teacher", cfg.teacher, dtype, device)
        probe_logits("teacher", teacher)
        teacher.requires_grad_(False).eval()
    if cfg.share_prefix:
        _use_prefix_attention(student, teacher)
    if cfg.method == "promptkd":
        from ..hf.attention import check_supported
        from ..hf.prompted import PromptedTeacher

        try:
            check_supported(teacher)
        except ValueError as e:
            raise InputError(f"promptkd: the teacher's {e}") from None
        prompted = PromptedTeacher(teacher, cfg.prompt_length, init="text", init_text=cfg.prompt_init_text,
                                   tokenizer=teacher_tokenizer or tokenizer,
                                   gradient_checkpointing=cfg.gradient_checkpointing, attention_impl=cfg.attention_impl,
                                   allow_logit_transform=True)
        if cfg.prompt_frozen:
            prompted.soft_prompt.requires_grad_(False)
        if resume_from:
            prompted.load_prompt(os.path.join(resume_from, "prompt"))
    if cfg.fsdp:
        shard(student, param_dtype=dtype if dtype != torch.float32 else None)
        if teacher is not None:
            shard(teacher)
    return student, teacher, prompted


def _use_prefix_attention(student, teacher) -> None:
    """share_prefix: the student and the teacher run their attention through prefix_attention."""
    from ..hf.attention import check_supported, register

    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue  # a served teacher: the server runs it
        try:
            check_supported(model)
        except ValueError as e:
            raise InputError(f"share_prefix: the {name}'s {e}") from None
        text = model.config.get_text_config()
        dropout = getattr(text, "attn_pdrop", None) or getattr(text, "attention_dropout", None) or 0.0
        if name == "student" and dropout:
            raise InputError(f"share_prefix: the student has attention dropout {dropout}, which prefix "
                             "attention does not implement; set it to 0 in the student's config.json "
                             "(attn_pdrop / attention_dropout) or turn share_prefix off")
        model.set_attn_implementation(register())


class Distillation:
    """What a step computes with: the models (or a teacher cache), the tokenizer and the settings. Makes batches
    (ground truth or the student's samples), runs the models to hidden states, and computes the losses."""

    def __init__(self, cfg: TrainConfig, tokenizer, student, teacher, prompted, dtype: torch.dtype,
                 device: torch.device, rank: int, cache=None, served=None, head=None):
        self.cfg, self.tokenizer, self.dtype, self.device, self.rank = cfg, tokenizer, dtype, device, rank
        self.student_model, self.teacher_model, self.prompted = student, teacher, prompted
        self.cache, self.served, self.head = cache, served, head  # head: a served teacher's, for its hidden states
        self.vocab_size = None
        vt = (teacher.get_output_embeddings().weight.shape[0] if teacher is not None
              else head.weight.shape[0] if head is not None else None)
        if vt is not None:
            vs = student.get_output_embeddings().weight.shape[0]
            self.vocab_size = None if vs == vt else min(vs, vt)

    # ---- batches ----

    def batch(self, prompts, responses, closed=None, shared: bool = False):
        """A training batch and its token count (prompt + response, every sample counted in full).

        ``shared``: ``prompts`` holds each instruction ``num_samples`` times in a row (as
        :meth:`on_policy` returns them); each instruction becomes one shared prefix for its samples."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        if shared:
            k = self.cfg.num_samples
            batch = collate_shared(prompts[::k], responses, [i // k for i in range(len(responses))], pad, eos, closed)
            tokens = int(batch["attention_mask"].sum()) + sum(len(p) - 1 for p in prompts)
        else:
            batch = collate(prompts, responses, pad, eos, closed)
            tokens = int(batch["attention_mask"].sum())
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, tokens

    @staticmethod
    def ground_truth(examples: list[Example]):
        return [e.prompt_ids for e in examples], [e.response_ids for e in examples], None

    def sample_seed(self, step: int, micro: int, rank: int | None = None) -> int:
        rank = self.rank if rank is None else rank
        return (self.cfg.seed * 1_000_003 + step * 8191 + rank * 131 + micro) % (2**31 - 1)

    def on_policy(self, examples: list[Example], step: int, micro: int):
        """The student's samples for each instruction (num_samples each): prompts, responses, closed."""
        from .evaluate import sample

        cfg = self.cfg
        prompts = [e.prompt_ids for e in examples for _ in range(cfg.num_samples)]
        left = cfg.max_length - max(len(p) for p in prompts)  # >= 1: prompts fit max_prompt_length < max_length
        room = min(cfg.max_new_tokens, left) if cfg.max_new_tokens else left
        responses = sample(self.student_model, prompts, pad_token_id=self.tokenizer.pad_token_id,
                           eos_token_id=self.tokenizer.eos_token_id, max_new_tokens=room,
                           seed=self.sample_seed(step, micro), batch_size=len(prompts),
                           temperature=cfg.sample_temperature, synced_gpus=cfg.fsdp)
        # A response shorter than the room ended with eos (which sample() strips): it is closed by eos again.
        return prompts, responses, [len(r) < room for r in responses]

    def coin(self, step: int, micro: int, probability: float) -> bool:
        """A reproducible draw per (step, micro-batch, rank)."""
        if probability <= 0.0 or probability >= 1.0:
            return probability >= 1.0
        # Sharded models: every process must take the same branch (generate or not), so rank 0's draw.
        seed = self.sample_seed(step, micro, rank=0 if self.cfg.fsdp else None) + 7
        generator = torch.Generator().manual_seed(seed)
        return bool(torch.rand((), generator=generator) < probability)

    # ---- models and losses ----

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @staticmethod
    def _shared(batch):
        if "group_index" not in batch:
            return None
        return batch["prefix_ids"], batch["prefix_mask"], batch["group_index"]

    def student(self, batch) -> LMOutput:
        with self.autocast():
            return lm_hidden(self.student_model, batch["input_ids"], batch["attention_mask"], self._shared(batch),
                             self.cfg.attention_impl)

    def teacher(self, batch, prompted: bool | None = None) -> LMOutput:
        """The teacher's output; ``prompted``: through the prompted teacher, with (True) or without
        (False) the soft prompt."""
        if prompted is None:
            return lm_hidden(self.teacher_model, batch["input_ids"], batch["attention_mask"], self._shared(batch),
                             self.cfg.attention_impl)
        out = self.prompted(batch["input_ids"], batch["attention_mask"], use_prompt=prompted,
                            shared_prefix=self._shared(batch))
        return LMOutput(out.hidden_states, out.output_weight, out.output_bias, out.logit_transform)

    def _cast(self, x):
        return None if x is None else x.to(self.dtype)

    def kd(self, student: LMOutput, teacher: LMOutput, labels, divergence: str, **kwargs) -> torch.Tensor:
        c = self._cast
        return fused_linear_kd_loss(c(student.hidden), c(student.weight), c(teacher.hidden), c(teacher.weight),
                                    labels, divergence=divergence, student_bias=c(student.bias),
                                    teacher_bias=c(teacher.bias), vocab_size=self.vocab_size,
                                    impl=self.cfg.loss_impl, **student.loss_transforms("student"),
                                    **teacher.loss_transforms("teacher"), **kwargs)

    def cached_kd(self, student: LMOutput, examples: list[Example], labels) -> torch.Tensor:
        """``kd`` from the teacher cache: the sparse loss on the batch's cached targets (see the module docstring),
        or, from a cache of hidden states, the exact loss with the teacher's head."""
        cfg, cache, c = self.cfg, self.cache, self._cast
        if cache.hidden:  # the teacher's final hidden states: its head applied here, the exact loss
            hidden = cache.batch_hidden([e.index for e in examples], labels, self.dtype)
            teacher = LMOutput(hidden, self.head.weight, self.head.bias, self.head.transform)
            return self.kd(student, teacher, labels, **BASELINES["kd"].loss(cfg))
        ids, logprobs = cache.batch_targets([e.index for e in examples], labels)
        # In the stored dtype (float16 values are exact in it): the loss's check of the targets' probability sum
        # then allows for their rounding.
        logprobs = logprobs.to(cache.logprob_dtype)
        return fused_linear_sparse_kd_loss(c(student.hidden), c(student.weight), ids, logprobs, labels, tail=cache.tail,
                                           temperature=cache.temperature, soft_weight=cfg.kd_ratio,
                                           hard_weight=1.0 - cfg.kd_ratio, student_bias=c(student.bias),
                                           vocab_size=min(student.weight.shape[0], cache.vocab_size),
                                           **student.loss_transforms("student"),
                                           impl=cfg.loss_impl if cfg.loss_impl in SPARSE_IMPLS else "auto")

    def served_loss(self, student: LMOutput, batch, labels, method: Baseline) -> torch.Tensor:
        """A baseline's loss with a served teacher (:mod:`promptkd.served.online`): from its hidden states and the
        teacher's head, the method's own fused loss, exactly; from its log-probabilities, the sparse forward KL on
        the top k plus the label (``kd``) or the sampled-token reverse KL on the student's samples (``rkl``)."""
        cfg, c, served = self.cfg, self._cast, self.served
        if cfg.teacher_server_payload == "hidden":
            head = self.head
            teacher = LMOutput(served.hidden(batch, self.dtype), head.weight, head.bias, head.transform)
            return self.kd(student, teacher, labels, **method.loss(cfg))
        impl = cfg.loss_impl if cfg.loss_impl in SPARSE_IMPLS else "auto"
        vocab = student.weight.shape[0]
        if cfg.method == "rkl":
            return sampled_reverse_kl_loss(c(student.hidden), c(student.weight), labels,
                                           served.label_logprobs(batch, labels), student_bias=c(student.bias),
                                           **student.loss_transforms("student"), impl=impl)
        ids, logprobs = served.targets(batch, labels)
        return fused_linear_sparse_kd_loss(c(student.hidden), c(student.weight), ids, logprobs, labels, tail=True,
                                           soft_weight=cfg.kd_ratio, hard_weight=1.0 - cfg.kd_ratio,
                                           student_bias=c(student.bias), vocab_size=vocab,
                                           **student.loss_transforms("student"), impl=impl)

    # ---- the methods ----

    def micro_loss(self, examples: list[Example], step: int, micro: int):
        """A baseline's loss on one micro-batch and its token count (:data:`BASELINES`; ``kd`` from the teacher
        cache when there is one)."""
        cfg = self.cfg
        method = BASELINES[cfg.method]
        if self.coin(step, micro, method.on_policy(cfg)):
            batch, tokens = self.batch(*self.on_policy(examples, step, micro), shared=cfg.share_prefix)
        else:
            batch, tokens = self.batch(*self.ground_truth(examples))
        labels = batch["labels"]
        student = self.student(batch)
        if method.loss is None:
            return linear_cross_entropy(student, labels), tokens
        if self.cache is not None:
            return self.cached_kd(student, examples, labels), tokens
        if self.served is not None:
            return self.served_loss(student, batch, labels, method), tokens
        with torch.no_grad():
            teacher = self.teacher(batch)
        return self.kd(student, teacher, labels, **method.loss(cfg)), tokens

    def prompt_loss(self, batch, reg: float) -> torch.Tensor:
        """PromptKD's prompt phase: KL(p_TP || q_S) + reg * KL(p_TP || p_T), gradient to the soft prompt.

        The prompted teacher sits on the teacher side: its gradient is the fused loss's teacher gradient.
        With the chunked loss (the CPU default) both terms are one ``fused_linear_kl_pair_loss`` call, which
        computes the prompted teacher's logits once and contracts its gradient once; the fused GPU kernels
        take the two terms as two calls."""
        labels = batch["labels"]
        with torch.no_grad():
            student = self.student(batch).detach()
            plain = self.teacher(batch, prompted=False) if reg > 0 else None
        prompted = self.teacher(batch, prompted=True)
        if plain is None:
            return self.kd(student, prompted, labels, "forward_kl")
        impl = pick_impl(self.cfg.loss_impl, self.device, self.dtype)
        if impl in PAIR_IMPLS:
            c = self._cast
            return fused_linear_kl_pair_loss(c(prompted.hidden), c(prompted.weight), c(student.hidden),
                                             c(student.weight), c(plain.hidden), c(plain.weight), labels,
                                             anchor_scale=reg, bias=c(prompted.bias), student_bias=c(student.bias),
                                             anchor_bias=c(plain.bias), vocab_size=self.vocab_size, impl=impl,
                                             **student.loss_transforms("student"),
                                             **prompted.loss_transforms("teacher"))
        return self.kd(student, prompted, labels, "forward_kl") + reg * self.kd(plain, prompted, labels, "forward_kl")

    def student_loss(self, batch) -> torch.Tensor:
        """PromptKD's student phase: KL(q_S || p_TP) with the updated prompt, gradient to the student."""
        with torch.no_grad():
            prompted = self.teacher(batch, prompted=True)
        return self.kd(self.student(batch), prompted, batch["labels"], "reverse_kl")


def accumulate(losses, scale: float, device) -> torch.Tensor:
    """Runs backward on each loss of the iterable ``losses`` times ``scale``; returns their scaled sum, detached."""
    total = torch.zeros((), device=device)
    for loss in losses:
        (loss * scale).backward()
        total += loss.detach() * scale
    return total


def baseline_step(d: Distillation, micro_batches, step: int, apply, lr) -> dict:
    """One optimizer step of a baseline. ``apply(step, what, total)`` averages, checks and applies the
    gradients of the ``what`` loss ("training", "prompt" or "student"; ``total`` its value) and returns
    (loss, gradient norm); ``lr(which)`` is the learning rate of the "student" or "prompt" optimizer."""
    scale, total, tokens = 1.0 / len(micro_batches), torch.zeros((), device=d.device), 0
    for m, examples in enumerate(micro_batches):
        loss, n = d.micro_loss(examples, step, m)
        (loss * scale).backward()
        total += loss.detach() * scale
        tokens += n
    student_lr = lr("student")
    value, norm = apply(step, "training", total)
    return {"train/loss": value, "train/grad_norm": norm, "train/lr": student_lr, "tokens": tokens}


def promptkd_step(d: Distillation, micro_batches, step: int, total_steps: int, apply, lr) -> dict:
    """One PromptKD step over the same micro-batches: (1) the student samples, (2) the prompt step,
    (3) the student step with the updated prompt (``apply``, ``lr``: as for :func:`baseline_step`)."""
    cfg, tokens, samples = d.cfg, 0, []
    for m, examples in enumerate(micro_batches):
        batch, n = d.batch(*d.on_policy(examples, step, m), shared=cfg.share_prefix)
        samples.append(batch)
        tokens += n
    scale, out = 1.0 / len(micro_batches), {}
    if not cfg.prompt_frozen:
        reg = cfg.prompt_reg * (1.0 - step / total_steps)
        prompt_total = accumulate((d.prompt_loss(batch, reg) for batch in samples), scale, d.device)
        prompt_lr = lr("prompt")
        prompt_value, prompt_norm = apply(step, "prompt", prompt_total)
        out = {"prompt/loss": prompt_value, "prompt/grad_norm": prompt_norm, "prompt/lr": prompt_lr}
    student_total = accumulate((d.student_loss(batch) for batch in samples), scale, d.device)
    student_lr = lr("student")
    value, norm = apply(step, "student", student_total)
    return {"train/loss": value, "train/grad_norm": norm, "train/lr": student_lr, **out, "tokens": tokens}

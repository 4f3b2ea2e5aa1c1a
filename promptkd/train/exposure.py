"""Exposure bias of a distilled student: the excess accumulated error ExAccErr(l) over generation length.

The measure of Arora et al. (2022, "Why Exposure Bias Matters: An Imitation Learning Perspective of
Error Accumulation in Language Generation": the accumulated regret R(l), the per-step error eps(l) and
the percentage of excess accumulated error), as MiniLLM (Gu et al., ICLR 2024, its exposure-bias
analysis) applies it to distillation with the teacher p as the oracle, and PromptKD (Kim et al., EMNLP
Findings 2024; ``evaluate_exposure_bias.py`` of its code) reports it, following MiniLLM and DistiLLM.
For a prompt x and a prefix y_<t, the student q's error at step t is

    eps_t(y_<t) = E_{y_t ~ p(.|y_<t, x)} [log p(y_t|y_<t, x) - log q(y_t|y_<t, x)] = KL(p || q) at step t,

over the full vocabulary, and for l = 1..L

    R(l)        = sum_{t=1..l} E_{y_<t ~ q} [eps_t(y_<t)]         the student's own prefixes (free running)
    l * eps(l)  = sum_{t=1..l} E_{y_<t ~ p} [eps_t(y_<t)]         the oracle's (teacher's) prefixes
    ExAccErr(l) = 100 * (R(l) - l * eps(l)) / (l * eps(l))        in percent

Choices made here (the papers leave them open):

- Prefixes are sampled at temperature 1, no top-k / top-p (``evaluate.sample``), ``samples`` K
  responses per prompt, L new tokens at most. The expectations are means over all prompts x K samples,
  each prompt weighted equally.
- A response ends at its eos. Its eos step is counted (the error of predicting it); a response that
  ended at step T contributes eps_t = 0 for t > T: the generation has stopped and makes no further
  error. So R(l) is the expected error a sampled response accumulates in its first l steps, and the
  means are over every sampled sequence, ended or not (``*_counts`` say how many were still generating
  at step t). A response that reaches L tokens without eos is cut there. PromptKD's reference code
  instead averages each prompt's step-t error over its samples still running (with one sample per
  prompt the two agree) and starts at the second response token; here step 1 (the first response
  token, predicted from the prompt alone) is included.
- The student's and the teacher's responses are drawn with the same seed (common random numbers: the
  same uniform draws, each model's own distribution), which lowers the variance of R(l) - l * eps(l)
  without biasing either term; a student identical to the teacher samples the teacher's responses.
- Where l * eps(l) = 0 (the student equals the teacher on every oracle prefix) the ratio is undefined:
  ExAccErr(l) is 0 if R(l) = 0 too (no error, so no excess) and NaN otherwise. No division by zero
  is attempted, so no warning is raised. KL is >= 0; a value below 0 from rounding is taken as 0.

Each KL is computed from the models' final hidden states and output embeddings with
:func:`promptkd.fused_linear_kd_loss` (``forward_kl``, ``reduction="none"``): no [tokens, vocab] logits
tensor is made. The per-step sums of a set of samples are accumulated on the device and read once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..files import write_atomic
from ..hf.models import lm_hidden, logit_transform, output_head
from ..kd.api import fused_linear_kd_loss
from ..kd.settings import IGNORE_INDEX
from .data import collate
from .evaluate import sample


@dataclass(frozen=True)
class Continuations:
    """Sampled responses: ``prompts[i]`` (token ids; each prompt repeated K times in a row),
    ``responses[i]`` (the new tokens, eos excluded), ``closed[i]`` (it ended with eos within
    ``max_length`` new tokens; its eos step then counts)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    closed: list[bool]
    max_length: int

    def steps(self) -> list[int]:
        """How many sampled sequences were still generating at step t, for t = 1..max_length."""
        counts = [0] * self.max_length
        for response, closed in zip(self.responses, self.closed, strict=True):
            counts[len(response) + closed - 1] += 1  # the last step of this sequence (0-based)
        alive, out = 0, [0] * self.max_length
        for t in range(self.max_length, 0, -1):
            alive += counts[t - 1]
            out[t - 1] = alive
        return out


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _prompt_ids(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt: a str is encoded as evaluation encodes it (``tokenizer(text)``, with the
    tokenizer's specials); a list of ids is taken as it is."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of str (templated prompts) or of token id lists")
    ids = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            prompt = list(tokenizer(prompt)["input_ids"])
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
            raise TypeError(f"prompts[{i}] must be a str or a list of int token ids")
        if not prompt:
            raise ValueError(f"prompts[{i}] has no tokens")
        ids.append(list(prompt))
    return ids


def _special_ids(tokenizer) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; responses need one to end")
    return (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos), eos


def sample_continuations(model, tokenizer, prompts, *, samples: int, max_length: int, seed: int,
                         batch_size: int = 16) -> Continuations:
    """``samples`` responses per prompt from ``model`` (temperature 1, no top-k / top-p, at most
    ``max_length`` new tokens, ending at eos), deterministic given ``seed`` (see ``evaluate.sample``:
    the samples are a function of the seed, the prompts, ``batch_size`` and the model)."""
    _check_int("samples", samples, 1)
    _check_int("max_length", max_length, 1)
    _check_int("seed", seed, 0)
    _check_int("batch_size", batch_size, 1)
    pad, eos = _special_ids(tokenizer)
    repeated = [p for p in _prompt_ids(tokenizer, prompts) for _ in range(samples)]
    responses = sample(model, repeated, pad_token_id=pad, eos_token_id=eos, max_new_tokens=max_length, seed=seed,
                       batch_size=batch_size)
    # sample() stops before the first eos: a response shorter than max_length ended with one.
    return Continuations(repeated, responses, [len(r) < max_length for r in responses], max_length)


def _loss_dtype(*models) -> torch.dtype:
    """float64 if a model is float64, else float32 (16-bit models' states are widened for the KL)."""
    dtypes = {next(m.parameters()).dtype for m in models}
    return torch.float64 if torch.float64 in dtypes else torch.float32


@torch.no_grad()
def step_errors(teacher, student, tokenizer, continuations: Continuations, *, batch_size: int = 16,
                impl: str = "auto") -> list[float]:
    """sum over the sampled sequences of KL(p || q) at step t, for t = 1..max_length (0 for the steps after
    a sequence's eos). Both models run on each batch of sequences (prompt + response + eos where closed,
    right-padded: ``collate``); the per-token KL comes from ``fused_linear_kd_loss`` with
    ``reduction="none"``, the response steps are the positions whose label is a response token."""
    _check_int("batch_size", batch_size, 1)
    pad, eos = _special_ids(tokenizer)
    device = next(student.parameters()).device
    dtype = _loss_dtype(teacher, student)
    teacher_was, student_was = teacher.training, student.training
    teacher.eval(), student.eval()
    L = continuations.max_length
    sums = torch.zeros(L + 1, dtype=torch.float64, device=device)  # slot L takes the positions that are no step

    def cast(x):
        return None if x is None else x.to(dtype)

    (ws, bs), (wt, bt) = ([cast(x) for x in output_head(m)] for m in (student, teacher))  # cast once
    (s_scale, s_cap), (t_scale, t_cap) = (logit_transform(name, m.config) for name, m in (("student", student),
                                                                                          ("teacher", teacher)))
    vs, vt = ws.shape[0], wt.shape[0]
    try:
        c = continuations
        for start in range(0, len(c.responses), batch_size):
            rows = slice(start, start + batch_size)
            batch = collate(c.prompts[rows], c.responses[rows], pad, eos, c.closed[rows])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            hs = lm_hidden(student, batch["input_ids"], batch["attention_mask"]).hidden  # [B, N, Ds]
            ht = lm_hidden(teacher, batch["input_ids"], batch["attention_mask"]).hidden  # [B, N, Dt]
            counted = batch["labels"] != IGNORE_INDEX  # [B, N]: the positions that predict a response step
            mask = torch.where(counted, 0, IGNORE_INDEX)  # labels as a mask only (no hard loss, no range check)
            kl = fused_linear_kd_loss(cast(hs), ws, cast(ht), wt, mask, divergence="forward_kl", reduction="none",
                                      student_bias=bs, teacher_bias=bt, vocab_size=min(vs, vt), impl=impl,
                                      student_logit_scale=s_scale, student_softcap=s_cap, teacher_logit_scale=t_scale,
                                      teacher_softcap=t_cap)  # [B, N]
            step = torch.where(counted, counted.cumsum(1) - 1, L)  # 0-based response step of each position
            sums.index_add_(0, step.reshape(-1), kl.clamp_min(0).reshape(-1).to(torch.float64))
    finally:
        teacher.train(teacher_was), student.train(student_was)
    return sums[:L].tolist()


def _cumulative_mean(sums: list[float], n: int) -> list[float]:
    out, total = [], 0.0
    for value in sums:
        total += value
        out.append(total / n)
    return out


def excess_accumulated_error(R: list[float], accumulated_eps: list[float]) -> list[float]:
    """100 * (R(l) - l eps(l)) / (l eps(l)) per length; 0 where both are 0, NaN where only l eps(l) is."""
    out = []
    for r, e in zip(R, accumulated_eps, strict=True):
        if e > 0:
            out.append(100.0 * (r - e) / e)
        else:
            out.append(0.0 if r == 0 else math.nan)
    return out


def exposure_bias(teacher, student, tokenizer, prompts, *, samples: int = 1, max_length: int = 50, seed: int = 0,
                  batch_size: int = 16, teacher_samples: Continuations | None = None, impl: str = "auto") -> dict:
    """ExAccErr(l) of ``student`` against ``teacher`` (the oracle) for l = 1..max_length (module docstring).

    prompts: templated prompt strings (encoded as evaluation encodes them) or token id lists, e.g. the
    ``prompt_ids`` of ``data.load_examples``. ``samples`` responses per prompt are drawn from each model
    with ``seed`` (``sample_continuations``); ``teacher_samples`` reuses the teacher's (the same prompts,
    samples and max_length: what comparing several students needs). Both models share the tokenizer's ids.
    ``impl``: the implementation of ``fused_linear_kd_loss`` (``auto``: Triton on CUDA, chunked elsewhere).

    Returns lists indexed by l - 1: ``length`` (1..L), ``R`` (R(l)), ``eps`` (eps(l)), ``accumulated_eps``
    (l eps(l)), ``exaccerr`` (percent; 0 or NaN where l eps(l) = 0, see above), ``student_counts`` /
    ``teacher_counts`` (sequences still generating at step l), and ``num_sequences`` (prompts x samples).
    """
    student_samples = sample_continuations(student, tokenizer, prompts, samples=samples, max_length=max_length,
                                           seed=seed, batch_size=batch_size)
    if teacher_samples is None:
        teacher_samples = sample_continuations(teacher, tokenizer, prompts, samples=samples, max_length=max_length,
                                               seed=seed, batch_size=batch_size)
    elif teacher_samples.prompts != student_samples.prompts or teacher_samples.max_length != max_length:
        raise ValueError("teacher_samples were drawn for other prompts, samples or max_length than these")
    n = len(student_samples.responses)
    R = _cumulative_mean(step_errors(teacher, student, tokenizer, student_samples, batch_size=batch_size,
                                     impl=impl), n)
    acc = _cumulative_mean(step_errors(teacher, student, tokenizer, teacher_samples, batch_size=batch_size,
                                       impl=impl), n)
    return {"length": list(range(1, max_length + 1)), "R": R, "eps": [e / (i + 1) for i, e in enumerate(acc)],
            "accumulated_eps": acc, "exaccerr": excess_accumulated_error(R, acc),
            "student_counts": student_samples.steps(), "teacher_counts": teacher_samples.steps(),
            "num_sequences": n}


def plot_exposure(curves: dict[str, dict], path: str, title: str = "Exposure bias") -> str:
    """A PNG of ExAccErr (%) against generation length, one line per student (``curves``: name ->
    :func:`exposure_bias`'s dict), drawn like ``plot.py``'s figures (matplotlib's object API on the Agg
    canvas) and written atomically; NaN points are left out of a line. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .plot import legend, legend_width, line_style

    if not curves:
        raise ValueError("curves must name at least one student")
    fig = Figure(figsize=(legend_width(len(curves)), 4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("generation length l (tokens)")
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.grid(True, alpha=0.3)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for index, (name, curve) in enumerate(curves.items()):
        ax.plot(curve["length"], curve["exaccerr"], label=str(name), marker="o" if len(curve["length"]) <= 50
                else None, markersize=3, **line_style(index))
    legend(ax, len(curves))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), suffix=".png")


def json_ready(curve: dict) -> dict:
    """``curve`` with NaN written as None (JSON has no NaN)."""
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in curve.items()}


__all__ = ["Continuations", "sample_continuations", "step_errors", "excess_accumulated_error", "exposure_bias",
           "plot_exposure", "json_ready"]

"""What PromptKD's soft prompt does to the teacher, measured at each validation (``prompt/*`` in ``metrics.jsonl``).

On the validation examples' first references (teacher forcing; the same tokens at every validation, so the curves
move with the models and not with samples), token means over the response tokens:

- ``prompt/kl_student_prompted``: KL(q_S || p_TP), the student's distance from the prompted teacher (its loss);
- ``prompt/kl_student_plain``: KL(q_S || p_T), from the teacher without the prompt: the prompt should make the
  first smaller than this one;
- ``prompt/kl_prompted_plain``: KL(p_TP || p_T), the regulariser's view: how far the prompt moved the teacher;
- ``prompt/teacher_ce``: the prompted teacher's cross-entropy on the references (nats per token);
- ``prompt/teacher_rougeL``: the prompted teacher's own task score, sampled ROUGE-L on the validation prompts at
  the run's ``eval_seeds`` (it must not collapse);
- ``prompt/distance``: ||P - P0|| / ||P0||, the soft prompt's relative distance from its initialisation.

The prompt's gradient norm is logged at every step (``prompt/grad_norm``, :func:`promptkd.train.methods.promptkd_step`).
:func:`plot_prompt_diagnostics` draws them from a run's metrics.
"""

from __future__ import annotations

import os

import torch

from .data import collate

#: The metrics :func:`prompt_diagnostics` returns, in plotting order.
KEYS = ("prompt/kl_student_prompted", "prompt/kl_student_plain", "prompt/kl_prompted_plain", "prompt/teacher_ce",
        "prompt/teacher_rougeL", "prompt/distance")


def prompt_diagnostics(distill, examples, tokenizer, *, seeds, max_new_tokens: int, batch_size: int) -> dict:
    """The ``prompt/*`` values (module docstring) for the validation ``examples``
    (:class:`promptkd.train.data.Example`), from ``distill`` (a :class:`promptkd.train.methods.Distillation` with a
    prompted teacher). Leaves the models' training modes as they were."""
    from ..hf.models import linear_cross_entropy
    from .evaluate import evaluate

    prompted, student = distill.prompted, distill.student_model
    was_training = student.training
    student.eval()
    sums, count = dict.fromkeys(KEYS[:4], 0.0), 0
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                batch = collate([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], tokenizer.pad_token_id,
                                tokenizer.eos_token_id)
                batch = {k: v.to(distill.device) for k, v in batch.items()}
                labels = batch["labels"]
                n = int((labels != -100).sum())
                if n == 0:
                    continue
                q = distill.student(batch)
                tp = distill.teacher(batch, prompted=True)
                t = distill.teacher(batch, prompted=False)
                values = {"prompt/kl_student_prompted": distill.kd(q, tp, labels, "reverse_kl"),
                          "prompt/kl_student_plain": distill.kd(q, t, labels, "reverse_kl"),
                          "prompt/kl_prompted_plain": distill.kd(t, tp, labels, "forward_kl"),  # KL(p_TP || p_T)
                          "prompt/teacher_ce": linear_cross_entropy(tp, labels)}
                for key, value in values.items():
                    sums[key] += float(value) * n
                count += n
            p, p0 = prompted.soft_prompt.detach().float(), prompted.initial_prompt.float()
            distance = float((p - p0).norm() / p0.norm().clamp_min(1e-30))
        items = [{"prompt": e.prompt, "references": e.references} for e in examples]
        score = evaluate(prompted, tokenizer, items, seeds=seeds, max_new_tokens=max_new_tokens, batch_size=batch_size)
    finally:
        student.train(was_training)
    out = {key: value / max(count, 1) for key, value in sums.items()}
    out.update({"prompt/teacher_rougeL": score["rougeL"], "prompt/distance": distance})
    return out


def plot_prompt_diagnostics(run_dir: str, path: str | None = None) -> str | None:
    """One PNG of a PromptKD run's ``prompt/*`` curves (the three KLs; the prompted teacher's CE and ROUGE-L; the
    prompt's distance from its initialisation and its gradient norm) at ``path`` (default
    ``run_dir/plots/prompt_diagnostics.png``); None when the run logged none."""
    from matplotlib.figure import Figure

    from .plot import _save, line_style, run_series

    series = run_series(run_dir)
    if not any(key in series for key in KEYS):
        return None
    fig = Figure(figsize=(15, 4), layout="constrained")
    # One panel per view; a second measure of another scale on the panel's right axis.
    panels = (("KL on the validation references", KEYS[:3], ()),
              ("the prompted teacher", ("prompt/teacher_ce",), ("prompt/teacher_rougeL",)),
              ("the soft prompt", ("prompt/distance",), ("prompt/grad_norm",)))
    for index, (title, left, right) in enumerate(panels):
        ax = fig.add_subplot(1, 3, index + 1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        axes = [(ax, key) for key in left] + [(ax.twinx() if right else None, key) for key in right]
        lines = []
        for j, (target, key) in enumerate(axes):
            if key not in series:
                continue
            steps, values = series[key]
            lines += target.plot(steps, values, label=key, marker="o" if len(steps) <= 50 else None, markersize=3,
                                 **line_style(j))
            target.set_ylabel("nats per token" if index == 0 else key)
        if lines:
            ax.legend(lines, [line.get_label() for line in lines], fontsize="small")
    return _save(fig, path or os.path.join(run_dir, "plots", "prompt_diagnostics.png"))

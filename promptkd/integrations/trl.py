"""TRL's ``DistillationTrainer`` with promptkd's fused loss: ``pip install 'promptkd[trl]'``.

    from promptkd.integrations.trl import DistillationTrainer      # instead of trl.DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                  train_dataset=prompts, divergence="skew_forward_kl", alpha=0.1)
    trainer.train()

Everything TRL's trainer does (on-policy generation, batching, DDP/FSDP routing, logging, checkpoints)
stays TRL's; only the loss of a batch (``DistillationTrainer._compute_loss``, the one hook TRL has for
it) is :func:`promptkd.fused_linear_kd_loss` on the two models' final hidden states and output heads:

- ``divergence=None`` (the default) follows TRL's ``beta``: 0 is ``forward_kl``, 1 ``reverse_kl``,
  anything between ``jsd`` with that beta (TRL's generalized JSD, mixture beta * p + (1 - beta) * q);
  ``divergence=`` picks any promptkd divergence instead, the skew KLs of DistiLLM included (``alpha``);
- TRL's ``temperature`` (no T^2 factor, as in TRL), each model's logit scale and final softcap read
  from its config (:func:`promptkd.hf.models.logit_transform`; the same fields TRL reads);
- the loss is the sum over completion tokens divided by TRL's token count (gradient accumulation and
  processes as TRL reduces them), with no host synchronisation (the completion mask becomes the
  loss's ignore labels);
- ``loss_impl``: the fused loss's ``impl`` (``auto``: Triton on CUDA, ``chunked`` on the CPU).

TRL logs the student's entropy from its own kernel; promptkd's loss does not compute it, so the logged
``entropy`` is NaN under this trainer (never a made-up number). Supported TRL versions:
:data:`TRL_VERSIONS`; another version is an ImportError naming it, since the hook is TRL's internal
method. Training from a promptkd teacher cache is not offered here: TRL's trainer generates its
completions on policy, which a cache of fixed targets cannot serve (``promptkd train`` with
``teacher_cache`` does off-policy ``kd`` from one).
"""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version

import torch

from ..hf.models import logit_transform
from ..kd.api import fused_linear_kd_loss
from ..kd.settings import DIVERGENCES, IGNORE_INDEX

#: The TRL versions this trainer is tested with: [lowest, first unsupported).
TRL_VERSIONS = ("1.16.0", "1.17.0")


def _check_trl() -> None:
    try:
        found = version("trl")
    except PackageNotFoundError:
        raise ImportError("promptkd.integrations.trl needs TRL: pip install 'promptkd[trl]'") from None
    parts = tuple(int(p) for p in found.split("+")[0].split(".")[:3] if p.isdigit())
    low, high = (tuple(int(p) for p in v.split(".")) for v in TRL_VERSIONS)
    if not low <= parts < high:
        raise ImportError(f"promptkd.integrations.trl supports TRL >= {TRL_VERSIONS[0]}, < {TRL_VERSIONS[1]} (it "
                          f"overrides DistillationTrainer._compute_loss, an internal method); found TRL {found}")


_check_trl()

import trl  # noqa: E402

_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
               "token_type_ids", "mm_token_type_ids", "image_position_ids")


class DistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is :func:`promptkd.fused_linear_kd_loss` (see the module docstring).

    ``divergence``: None (from TRL's ``beta``) or one of :data:`promptkd.DIVERGENCES`; ``alpha``: the skew KLs'
    mixture weight; ``loss_impl``: the fused loss's ``impl``. The other arguments are TRL's."""

    def __init__(self, *args, divergence: str | None = None, alpha: float = 0.1, loss_impl: str = "auto", **kwargs):
        if divergence is not None and divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be None (from TRL's beta) or one of {DIVERGENCES}, got {divergence!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}")
        self.promptkd_divergence, self.promptkd_alpha, self.promptkd_impl = divergence, float(alpha), loss_impl
        super().__init__(*args, **kwargs)

    def promptkd_loss_settings(self) -> dict:
        """The fused loss's divergence keywords for this trainer's ``beta`` and ``divergence``."""
        if self.promptkd_divergence is not None:
            return dict(divergence=self.promptkd_divergence, beta=self.beta if 0.0 < self.beta < 1.0 else 0.5,
                        alpha=self.promptkd_alpha)
        if self.beta == 0.0:
            return dict(divergence="forward_kl")
        if self.beta == 1.0:
            return dict(divergence="reverse_kl")
        return dict(divergence="jsd", beta=self.beta)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        extra = {k: inputs[k] for k in _MULTIMODAL if k in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep, **extra)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, keep, **extra)
        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        device, dtype = student_head.weight.device, student_hidden.dtype
        if teacher_head.weight.device != device:
            raise ValueError(f"the student's output head is on {device}, the teacher's on "
                             f"{teacher_head.weight.device}: place both on one device")

        def head(module):  # FSDP2 shards a head as a DTensor: gathered once, as TRL does; in the loss's dtype
            weight, bias = module.weight, module.bias
            if isinstance(weight, torch.distributed.tensor.DTensor):
                weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
            return weight.to(dtype), None if bias is None else bias.to(dtype)

        (ws, bs), (wt, bt) = head(student_head), head(teacher_head)
        (s_scale, s_cap), (t_scale, t_cap) = (logit_transform(name, m.config) for name, m in
                                              (("student", unwrapped_student), ("teacher", unwrapped_teacher)))
        valid = loss_mask.to(device) != 0
        labels = torch.where(valid, 0, IGNORE_INDEX)  # a mask only: no hard loss
        total = fused_linear_kd_loss(
            student_hidden.to(device), ws, teacher_hidden.to(device, dtype), wt, labels, temperature=self.temperature,
            reduction="sum", student_bias=bs, teacher_bias=bt, student_logit_scale=s_scale, student_softcap=s_cap,
            teacher_logit_scale=t_scale, teacher_softcap=t_cap, impl=self.promptkd_impl,
            **self.promptkd_loss_settings())
        n_valid = valid.sum()
        if num_items_in_batch is None:
            loss = total / n_valid.clamp(min=1)
        else:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(total.device)
            loss = total / num_items_in_batch
        return loss, torch.full((), math.nan, device=total.device), n_valid


__all__ = ["DistillationTrainer", "TRL_VERSIONS"]

"""Offline distillation: a teacher's sparse targets without its logits (``fused_linear_topk``) and the student's
loss on them (``fused_linear_sparse_kd_loss``, ``sparse_kd_loss``), and the on-policy reverse KL from sampled
tokens (``sampled_reverse_kl_loss``). Layers: ``promptkd/sparse/`` in DESIGN.md."""

from .api import fused_linear_sparse_kd_loss, sparse_kd_loss
from .modules import FusedLinearSparseKDLoss, SparseKDLoss
from .sampled import sampled_reverse_kl_loss
from .settings import SparseKDSettings
from .targets import SparseTargets, fused_linear_topk

__all__ = ["fused_linear_topk", "SparseTargets", "fused_linear_sparse_kd_loss", "sparse_kd_loss",
           "FusedLinearSparseKDLoss", "SparseKDLoss", "SparseKDSettings", "sampled_reverse_kl_loss"]

"""promptkd: fused knowledge-distillation losses that never materialize logits, and prefix-shared attention."""

from .attention import prefix_attention
from .hf.prompted import PromptedTeacher, TeacherOutput
from .kd.api import fused_linear_kd_loss, kd_loss
from .kd.modules import FusedLinearKDLoss, KDLoss
from .kd.pair import fused_linear_kl_pair_loss
from .kd.settings import DIVERGENCES, REDUCTIONS, KDSettings
from .sparse import (
    FusedLinearSparseKDLoss,
    SparseKDLoss,
    SparseKDSettings,
    SparseTargets,
    fused_linear_sparse_kd_loss,
    fused_linear_topk,
    sampled_reverse_kl_loss,
    sparse_kd_loss,
)

__version__ = "0.2.0"

__all__ = ["fused_linear_kd_loss", "kd_loss", "fused_linear_kl_pair_loss", "prefix_attention",
           "FusedLinearKDLoss", "KDLoss", "KDSettings",
           "fused_linear_topk", "SparseTargets", "fused_linear_sparse_kd_loss", "sparse_kd_loss",
           "FusedLinearSparseKDLoss", "SparseKDLoss", "SparseKDSettings", "sampled_reverse_kl_loss",
           "PromptedTeacher", "TeacherOutput",
           "DIVERGENCES", "REDUCTIONS", "__version__"]

"""promptkd: fused knowledge-distillation losses that never materialize logits, and prefix-shared attention."""

from .api import fused_linear_kd_loss, kd_loss
from .attention import prefix_attention
from .modules import FusedLinearKDLoss, KDLoss
from .prompted import PromptedTeacher, TeacherOutput
from .settings import DIVERGENCES, REDUCTIONS, KDSettings

__version__ = "0.1.0"

__all__ = ["fused_linear_kd_loss", "kd_loss", "prefix_attention", "FusedLinearKDLoss", "KDLoss", "KDSettings",
           "PromptedTeacher", "TeacherOutput",
           "DIVERGENCES", "REDUCTIONS", "__version__"]

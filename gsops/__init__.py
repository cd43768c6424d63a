"""gsops: Group-and-Shuffle structured orthogonal matrices (Gorbunov et al., NeurIPS 2024)."""
__version__ = "0.1.0"

from .perm import perm, permute, paired_perm
from .ops import block_diag_mm, gs_chain, gs_apply, gs_dense, skew, unskew, cayley, gs_project
from .ops.dispatch import use_backend
from . import backends
from .backends import BackendUnavailable
from .checks import set_check_finite, set_check_inputs

__all__ = [
    "perm", "permute", "paired_perm",
    "block_diag_mm", "gs_chain", "gs_apply", "gs_dense", "skew", "unskew", "cayley", "gs_project",
    "use_backend", "BackendUnavailable", "set_check_finite", "set_check_inputs",
]

# --- adapters (issue 4) ---
from .adapters import (
    AdapterConfig, apply_, merge_, unmerge_, revert_, trainable_parameters, save_adapter, load_adapter,
    sorsa_regularizer, adapter_summary, merge_and_unload, disable_adapters, print_trainable_parameters,
    load_peft_adapter, save_peft_adapter,
)

__all__ += [
    "AdapterConfig", "apply_", "merge_", "unmerge_", "revert_", "trainable_parameters", "save_adapter",
    "load_adapter", "sorsa_regularizer", "adapter_summary", "merge_and_unload", "disable_adapters",
    "print_trainable_parameters", "load_peft_adapter", "save_peft_adapter",
]
# --- GS-SOC (issue 7) ---
from .nn.soc import SOCConv2d, ChShuffle, GSSOC, MaxMinPermuted
from . import models
from .models.lipconvnet import certified_accuracy
from .ops.conv_exp import conv_exp

__all__ += ["SOCConv2d", "ChShuffle", "GSSOC", "MaxMinPermuted", "models", "certified_accuracy", "conv_exp"]

# --- training: checkpoint / resume (issue 9) ---
from .training import save_checkpoint, load_checkpoint

__all__ += ["save_checkpoint", "load_checkpoint"]

# The reference backend registers its kernels now, not on the first call: a first gsops call
# made while torch.compile traces would otherwise hit a lazy import and break the graph.
backends.load("torch")

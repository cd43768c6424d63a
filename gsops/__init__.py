"""gsops: Group-and-Shuffle structured orthogonal matrices (Gorbunov et al., NeurIPS 2024)."""
from ._version import __version__


def _bind_triton_kernels() -> None:
    """Make the repository's ``triton_kernels/`` folder importable as ``gsops.triton_kernels``.

    An installed gsops has it there already (``package_dir`` in setup.py), so no top-level
    ``triton_kernels`` package of ours ever shadows another project's; a source checkout on
    ``sys.path`` (no install) gets the same name bound here.
    """
    import importlib.util
    import os
    import sys

    name = __name__ + ".triton_kernels"
    here = os.path.dirname(os.path.abspath(__file__))
    if name in sys.modules or os.path.isdir(os.path.join(here, "triton_kernels")):
        return  # an installed gsops: the kernels are a subpackage
    root = os.path.dirname(here)
    folder = os.path.join(root, "triton_kernels")
    init = os.path.join(folder, "__init__.py")
    # A source checkout (this gsops/ beside setup.py and triton_kernels/) binds its own folder, even when
    # an editable install of another checkout maps the name elsewhere; anything else (an editable
    # install imported from outside its checkout) is left to the import system.
    if not (os.path.isfile(init) and os.path.isfile(os.path.join(root, "setup.py"))):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_bind_triton_kernels()

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
from .nn.soc import SOCConv2d, ChShuffle, GSSOC, MaxMinPermuted
from . import models
from .models.lipconvnet import certified_accuracy
from .ops.conv_exp import conv_exp

__all__ += ["SOCConv2d", "ChShuffle", "GSSOC", "MaxMinPermuted", "models", "certified_accuracy", "conv_exp"]

from .training import save_checkpoint, load_checkpoint

__all__ += ["save_checkpoint", "load_checkpoint"]

# The reference backend registers its kernels now, not on the first call: a first gsops call
# made while torch.compile traces would otherwise hit a lazy import and break the graph.
backends.load("torch")

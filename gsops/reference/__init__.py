"""Pure-PyTorch definitions of every GS operation.

This is the CPU product path and the oracle every kernel is compared with.
Functions here assume validated arguments (see ``gsops.ops`` for the checked
public entry points) and never import a kernel.
"""
from .gs import block_diag_mm, gs_chain, gs_apply, gs_dense
from .cayley import skew, unskew, cayley_exact, cayley_neumann, neumann_error_bound
from .projection import gs_project, block_ranks

__all__ = [
    "block_diag_mm", "gs_chain", "gs_apply", "gs_dense",
    "skew", "unskew", "cayley_exact", "cayley_neumann", "neumann_error_bound",
    "gs_project", "block_ranks",
]

"""The oracle namespace: the pure-PyTorch definition of every GS operation.

This is the CPU product path and the oracle every kernel is compared with. The
definitions live in their op modules (:mod:`gsops.ops`, the first section of
each); this package names them. Functions here assume validated arguments
(see ``gsops.ops`` for the checked public entry points) and never import a kernel.
"""
from .gs import block_diag_mm, gs_chain, gs_apply, gs_dense
from .cayley import skew, unskew, cayley_exact, cayley_neumann, neumann_error_bound, spectral_norm
from .projection import gs_project, block_ranks

__all__ = [
    "block_diag_mm", "gs_chain", "gs_apply", "gs_dense",
    "skew", "unskew", "cayley_exact", "cayley_neumann", "neumann_error_bound", "spectral_norm",
    "gs_project", "block_ranks",
]

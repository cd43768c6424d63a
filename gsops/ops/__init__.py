"""The GS operations, one module per op, each read in order: reference -> custom op -> dispatch.

==============================  ============================================================
``block_diag_mm.py``            ``diag(B) x``
``gs_chain.py``                 ``B_m P ... P B_1 x``
``gs_apply.py``                 GSOFT's ``P^T L P R x`` and the dense ``Q`` (``gs_dense``)
``cayley.py``                   ``skew``/``unskew``, Cayley exact and Neumann
``conv_exp.py``                 GS-SOC's grouped convolution exponential and SOC helpers
``rotated_linear.py``           ``s * (W (Q x)) + c`` in one node (the torch path of adapted Linears)
``gs_project.py``               projection onto the GS class (Algorithm 1; not dispatched)
``library.py``                  the one helper that builds every op's ``torch.library`` custom ops
``dispatch.py``                 the one backend decision (``GSOPS_BACKEND``)
==============================  ============================================================

Conventions are those of SPEC.md: every op acts on the last dimension of ``x``
as on a column vector, with any leading batch shape. The checked public
functions validate their arguments, choose the backend and run the
``gsops::<op>`` custom op (so they trace under ``torch.compile``); the backward
runs on the same backend. The ``*_unchecked`` functions are for callers that
build their inputs correctly by construction (the adapter layers): no argument
or value check, no host read, so a training step has no device sync; in eager
mode their reference backend runs under plain autograd with the same formulas
(the ``torch.library`` layer costs more than the op itself on small layers).
"""
from __future__ import annotations

from ..tolerances import NEUMANN_NORM_MARGIN, NEUMANN_REFUSE_ERROR, NEUMANN_WARN_ERROR, SKEW_TOL  # noqa: F401
from . import dispatch, library
from .block_diag_mm import block_diag_mm, block_diag_mm_unchecked
from .gs_chain import gs_chain
from .gs_apply import gs_apply, gs_apply_unchecked, gs_dense
from .cayley import skew, unskew, cayley, cayley_unchecked, neumann_error_bound, spectral_norm  # noqa: F401
from .gs_project import gs_project
from .rotated_linear import rotated_linear, rotated_linear_unchecked
from . import conv_exp  # noqa: F401  (the submodule: gsops.ops.conv_exp.*)

__all__ = [
    "block_diag_mm", "gs_chain", "gs_apply", "gs_dense", "skew", "unskew", "cayley", "gs_project",
    "rotated_linear",
    "block_diag_mm_unchecked", "gs_apply_unchecked", "cayley_unchecked", "rotated_linear_unchecked",
]

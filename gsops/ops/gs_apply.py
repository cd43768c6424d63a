"""GSOFT's ``y = Q x`` with ``Q = P^T L P R``, ``P = perm(r, d)`` (SPEC "GSOFT"), and the dense ``Q``.

Reading order: the reference (definition and backward formula), its custom ops
``gsops::gs_apply`` / ``gsops::gs_apply_backward``, then the checked public
functions and the unchecked one the layers call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_blocks, check_same_device
from ..perm import _permute_unchecked
from . import dispatch, library
from .gs_chain import check_chain, gs_chain_backward_reference, gs_chain_reference

# ----------------------------------------------------------------------------- reference


def gs_apply_reference(x: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """``P^T L P R x``."""
    r = R.shape[0]
    y = gs_chain_reference(x, [R, L])
    return _permute_unchecked(y, r, inverse=True)


def gs_apply_backward_reference(grad: Tensor, x: Tensor, L: Tensor, R: Tensor):
    """``(dx, dL, dR)``: ``y = P^T z`` gives ``dz = P dy``, then the chain ``[R, L]``'s backward."""
    r = R.shape[0]
    g = _permute_unchecked(grad, r, inverse=False)
    dx, (dR, dL) = gs_chain_backward_reference(g, x, [R, L])
    return dx, dL, dR


def gs_dense_reference(L: Tensor, R: Tensor) -> Tensor:
    """The dense ``d x d`` matrix ``Q = P^T L P R``."""
    r, b, _ = R.shape
    eye = torch.eye(r * b, dtype=R.dtype, device=R.device)
    # gs_apply on the rows of I gives (Q e_i) as row i, i.e. Q^T.
    return gs_apply_reference(eye, L, R).transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------- custom ops

# y = P^T L P R x; the backward reads x, L and R and returns (dx, dL, dR)
SPEC = library.define(library.OpSpec("gs_apply", "Tensor x, Tensor L, Tensor R", "Tensor", "(Tensor, Tensor, Tensor)",
                                     gs_apply_reference, gs_apply_backward_reference))

# ----------------------------------------------------------------------------- dispatch


def gs_apply(x: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """GSOFT's ``Q x`` with ``Q = P^T L P R``, ``P = perm(r, d)``, L and R of shape (r, b, b)."""
    check_chain(x, [R, L], ["R", "L"])
    return library.call(SPEC, dispatch.for_call("gs_apply", x, L, R), x, L, R)


def gs_apply_unchecked(x: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """:func:`gs_apply` without argument or value checks (inputs valid by construction)."""
    return library.call_unchecked(SPEC, dispatch.for_call("gs_apply", x, L, R), x, L, R)


def gs_dense(L: Tensor, R: Tensor) -> Tensor:
    """The dense ``d x d`` matrix ``Q = P^T L P R``."""
    check_blocks("R", R)
    check_blocks("L", L, r=R.shape[0], b=R.shape[1])
    check_same_device(L=L, R=R)
    return gs_dense_reference(L, R)

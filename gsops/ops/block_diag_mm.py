"""``y = diag(B_1..B_r) x``: the block-diagonal product (SPEC "GS matrices").

Reading order: the reference (definition and backward formula), its custom ops
``gsops::block_diag_mm`` / ``gsops::block_diag_mm_backward``, then the checked
public function and the unchecked one the layers call.

``x`` has any leading batch shape and ``r*b`` features (its last dimension, a
column vector); ``B`` is (r, b, b). Half-precision inputs are computed in
float32 and cast back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import accumulate_dtype, check_blocks, check_features, check_same_device, check_tensor
from . import dispatch, library

# ----------------------------------------------------------------------------- reference


def block_diag_mm_reference(x: Tensor, B: Tensor) -> Tensor:
    """``diag(B_1..B_r) x``: block i of x (entries i*b..(i+1)*b-1) is multiplied by B_i."""
    r, b, _ = B.shape
    acc = accumulate_dtype(x.dtype)
    xb = x.reshape(*x.shape[:-1], r, b).to(acc)
    y = torch.einsum("...rj,rij->...ri", xb, B.to(acc))
    return y.reshape(x.shape).to(x.dtype)


def block_diag_mm_bmm(x: Tensor, B: Tensor) -> Tensor:
    """:func:`block_diag_mm_reference` as one ``torch.bmm`` over the blocks (no einsum parsing:
    cheaper on small layers; its autograd saves x and B, as the custom op does)."""
    r, b, _ = B.shape
    acc = accumulate_dtype(x.dtype)
    xb = x.reshape(-1, r, b).to(acc).transpose(0, 1)  # (r, N, b)
    y = torch.bmm(xb, B.to(acc).transpose(1, 2))      # y_i = x_i B_i^T, i.e. (B_i x_i) per token
    return y.transpose(0, 1).reshape(x.shape).to(x.dtype)


def block_grad_reference(grad: Tensor, x: Tensor, B: Tensor) -> Tensor:
    """``dB_p = sum_n g_{n,p} x_{n,p}^T`` for ``y = diag(B) x``."""
    r, b, _ = B.shape
    acc = torch.promote_types(accumulate_dtype(grad.dtype), accumulate_dtype(x.dtype))
    g = grad.reshape(-1, r, b).to(acc)
    xx = x.reshape(-1, r, b).to(acc)
    return torch.einsum("nri,nrq->riq", g, xx).to(B.dtype)


def block_diag_mm_backward_reference(grad: Tensor, x: Tensor, B: Tensor):
    """``dx = diag(B)^T g``, ``dB`` by :func:`block_grad_reference`."""
    dx = block_diag_mm_reference(grad, B.transpose(1, 2))
    return dx, block_grad_reference(grad, x, B)


# ----------------------------------------------------------------------------- custom ops

# y = diag(B) x; the backward reads x and B and returns (dx, dB)
SPEC = library.define(library.OpSpec("block_diag_mm", "Tensor x, Tensor B", "Tensor", "(Tensor, Tensor)",
                                     block_diag_mm_reference, block_diag_mm_backward_reference,
                                     eager=block_diag_mm_bmm))

# ----------------------------------------------------------------------------- dispatch


def block_diag_mm(x: Tensor, B: Tensor) -> Tensor:
    """``diag(B_1..B_r) x`` for ``B`` of shape (r, b, b), ``r*b == x.shape[-1]``."""
    check_tensor("x", x)
    check_blocks("B", B)
    check_same_device(x=x, B=B)
    check_features("x", x, B.shape[0] * B.shape[1], "r*b of B")
    return library.call(SPEC, dispatch.for_call("block_diag_mm", x, B), x, B)


def block_diag_mm_unchecked(x: Tensor, B: Tensor) -> Tensor:
    """:func:`block_diag_mm` without argument or value checks (inputs valid by construction)."""
    return library.call_unchecked(SPEC, dispatch.for_call("block_diag_mm", x, B), x, B)

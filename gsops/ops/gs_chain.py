"""``y = B_m P ... B_2 P B_1 x``: a chain of block-diagonal factors, ``P = perm(r, r*b)`` between them
(SPEC "GS matrices").

Reading order: the reference (definition and backward formula), its custom ops
``gsops::gs_chain`` / ``gsops::gs_chain_backward``, then the checked public function.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ..checks import check_blocks, check_features, check_same_device, check_tensor
from ..perm import _permute_unchecked
from . import dispatch, library
from .block_diag_mm import block_diag_mm_reference, block_grad_reference

# ----------------------------------------------------------------------------- reference


def gs_chain_reference(x: Tensor, blocks) -> Tensor:
    """``B_m P ... B_2 P B_1 x`` with ``P = perm(r, r*b)`` between consecutive factors."""
    r = blocks[0].shape[0]
    y = x
    for j, B in enumerate(blocks):
        if j:
            y = _permute_unchecked(y, r, inverse=False)
        y = block_diag_mm_reference(y, B)
    return y


def gs_chain_backward_reference(grad: Tensor, x: Tensor, blocks):
    """``(dx, [dB_1, ..., dB_m])``: the factors' inputs recomputed, then the chain rule backwards
    (each factor's input gradient is its transposed blocks, each ``P`` becomes ``P^T``)."""
    blocks = list(blocks)
    r = blocks[0].shape[0]
    inputs = []  # input of each block-diagonal product (after the permutation)
    y = x
    for j, B in enumerate(blocks):
        if j:
            y = _permute_unchecked(y, r, inverse=False)
        inputs.append(y)
        y = block_diag_mm_reference(y, B)
    grads = [None] * len(blocks)
    g = grad
    for j in range(len(blocks) - 1, -1, -1):
        grads[j] = block_grad_reference(g, inputs[j], blocks[j])
        g = block_diag_mm_reference(g, blocks[j].transpose(1, 2))
        if j:
            g = _permute_unchecked(g, r, inverse=True)
    return g, grads


# ----------------------------------------------------------------------------- custom ops

# y = B_m P ... P B_1 x; the backward reads x and the blocks and returns [dx, dB_1, ..., dB_m]
SPEC = library.define(library.OpSpec("gs_chain", "Tensor x, Tensor[] blocks", "Tensor", "Tensor[]",
                                     lambda x, blocks: gs_chain_reference(x, list(blocks)),
                                     gs_chain_backward_reference,
                                     save=lambda args, out: (args[0], list(args[1]))))

# ----------------------------------------------------------------------------- dispatch


def check_chain(x: Tensor, blocks, names=None) -> List[Tensor]:
    """The rules for ``x`` and a list of (r, b, b) factors of one shape; returns the list."""
    check_tensor("x", x)
    if isinstance(blocks, torch.Tensor):
        raise TypeError("blocks must be a list of (r, b, b) tensors, got a single tensor")
    blocks = list(blocks)
    names = names or [f"blocks[{i}]" for i in range(len(blocks))]
    if not blocks:
        raise ValueError("blocks must contain at least one (r, b, b) factor")
    check_blocks(names[0], blocks[0])
    r, b = blocks[0].shape[0], blocks[0].shape[1]
    for name, B in zip(names[1:], blocks[1:]):
        check_blocks(name, B, r=r, b=b)
    check_same_device(x=x, **dict(zip(names, blocks)))
    check_features("x", x, r * b, "r*b of the blocks")
    return blocks


def gs_chain(x: Tensor, blocks) -> Tensor:
    """``B_m P ... B_2 P B_1 x`` for a list of (r, b, b) factors, ``P = perm(r, r*b)``."""
    blocks = check_chain(x, blocks)
    return library.call(SPEC, dispatch.for_call("gs_chain", x, *blocks), x, blocks)

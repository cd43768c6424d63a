"""``torch.library`` custom ops over the dispatch, so the GS ops work under ``torch.compile``.

Each op takes the backend name chosen by the public op (``gsops.ops``) as its
last argument and calls that backend's implementation; its autograd formula
calls the matching ``*_backward`` op on the *same* backend.  Fake (meta)
implementations give shapes and dtypes for tracing.  The ops, in namespace
``gsops`` (all return fresh contiguous tensors, mutate nothing):

=================================================  =====================================
``block_diag_mm(x, B, backend) -> y``              ``diag(B_1..B_r) x``
``block_diag_mm_backward(g, x, B, backend)``       ``-> (dx, dB)``
``gs_chain(x, blocks[], backend) -> y``            ``B_m P ... P B_1 x``
``gs_chain_backward(g, x, blocks[], backend)``     ``-> [dx, dB_1, ..., dB_m]``
``gs_apply(x, L, R, backend) -> y``                ``P^T L P R x``
``gs_apply_backward(g, x, L, R, backend)``         ``-> (dx, dL, dR)``
``cayley_exact(K, backend) -> Q``                  ``K`` float32/64; ``Q = 2(I-K)^{-1} - I``
``cayley_exact_backward(g, Q, backend) -> dK``     ``2 M^T g M^T`` with ``M = (Q + I)/2``
``cayley_neumann(K, terms, backend) -> Q``         ``2(I + K + ... + K^terms) - I``
``cayley_neumann_backward(g, K, terms, backend)``  ``-> dK``
=================================================  =====================================

A backend provides the same names through ``dispatch.register(backend, name, fn)``
with the signatures above minus ``backend``.  The reference backend registers
the forward ops (``gsops/backends/torch_backend.py``); its backward ops are the
explicit formulas below (SPEC "GS matrices", "Orthogonal blocks"), registered here.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import reference as ref
from ..checks import accumulate_dtype
from ..perm import _permute_unchecked
from . import dispatch

def _fresh(t: Tensor) -> Tensor:
    return t.contiguous()


# ----------------------------------------------------------------------------- reference backward formulas

def _block_grad_torch(grad: Tensor, x: Tensor, B: Tensor) -> Tensor:
    """``dB_p = sum_n g_{n,p} x_{n,p}^T`` for ``y = diag(B) x``."""
    r, b, _ = B.shape
    acc = torch.promote_types(accumulate_dtype(grad.dtype), accumulate_dtype(x.dtype))
    g = grad.reshape(-1, r, b).to(acc)
    xx = x.reshape(-1, r, b).to(acc)
    return torch.einsum("nri,nrq->riq", g, xx).to(B.dtype)


def block_diag_mm_backward_torch(grad: Tensor, x: Tensor, B: Tensor):
    dx = ref.block_diag_mm(grad, B.transpose(1, 2))
    return dx, _block_grad_torch(grad, x, B)


def gs_chain_backward_torch(grad: Tensor, x: Tensor, blocks):
    blocks = list(blocks)
    r = blocks[0].shape[0]
    inputs = []  # input of each block-diagonal product (after the permutation)
    y = x
    for j, B in enumerate(blocks):
        if j:
            y = _permute_unchecked(y, r, inverse=False)
        inputs.append(y)
        y = ref.block_diag_mm(y, B)
    grads = [None] * len(blocks)
    g = grad
    for j in range(len(blocks) - 1, -1, -1):
        grads[j] = _block_grad_torch(g, inputs[j], blocks[j])
        g = ref.block_diag_mm(g, blocks[j].transpose(1, 2))
        if j:
            g = _permute_unchecked(g, r, inverse=True)
    return g, grads


def gs_apply_backward_torch(grad: Tensor, x: Tensor, L: Tensor, R: Tensor):
    r = R.shape[0]
    g = _permute_unchecked(grad, r, inverse=False)  # y = P^T z  =>  dz = P dy
    dx, (dR, dL) = gs_chain_backward_torch(g, x, [R, L])
    return dx, dL, dR


def cayley_exact_backward_torch(grad: Tensor, Q: Tensor) -> Tensor:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    Mt = ((Q + eye) / 2).transpose(-1, -2)
    return 2 * Mt @ grad.to(Q.dtype) @ Mt


def cayley_neumann_backward_torch(grad: Tensor, K: Tensor, terms: int) -> Tensor:
    """``dK = 2 sum_{j=1..t} sum_{a<j} (K^T)^a G (K^T)^(j-1-a)`` for ``Q = 2 sum_j K^j - I``."""
    Kt = K.transpose(-1, -2)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device).expand_as(K)
    powers = [eye]
    for _ in range(terms - 1):
        powers.append(powers[-1] @ Kt)
    G = grad.to(K.dtype)
    dK = torch.zeros_like(K)
    for j in range(1, terms + 1):
        for a in range(j):
            dK = dK + powers[a] @ G @ powers[j - 1 - a]
    return 2 * dK


dispatch.register("torch", "block_diag_mm_backward", block_diag_mm_backward_torch)
dispatch.register("torch", "gs_chain_backward", gs_chain_backward_torch)
dispatch.register("torch", "gs_apply_backward", gs_apply_backward_torch)
dispatch.register("torch", "cayley_exact_backward", cayley_exact_backward_torch)
dispatch.register("torch", "cayley_neumann_backward", cayley_neumann_backward_torch)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("gsops::block_diag_mm", mutates_args=())
def block_diag_mm(x: Tensor, B: Tensor, backend: str) -> Tensor:
    return _fresh(dispatch.impl("block_diag_mm", backend)(x, B))


@block_diag_mm.register_fake
def _(x, B, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("gsops::block_diag_mm_backward", mutates_args=())
def block_diag_mm_backward(grad: Tensor, x: Tensor, B: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    dx, dB = dispatch.impl("block_diag_mm_backward", backend)(grad, x, B)
    return _fresh(dx.to(x.dtype)), _fresh(dB.to(B.dtype))


@block_diag_mm_backward.register_fake
def _(grad, x, B, backend):
    return x.new_empty(x.shape), B.new_empty(B.shape)


def _bdm_setup(ctx, inputs, output):
    x, B, backend = inputs
    ctx.save_for_backward(x, B)
    ctx.backend = backend


def _bdm_backward(ctx, grad):
    x, B = ctx.saved_tensors
    dx, dB = block_diag_mm_backward(grad, x, B, ctx.backend)
    return dx, dB, None


block_diag_mm.register_autograd(_bdm_backward, setup_context=_bdm_setup)


@torch.library.custom_op("gsops::gs_chain", mutates_args=())
def gs_chain(x: Tensor, blocks: List[Tensor], backend: str) -> Tensor:
    return _fresh(dispatch.impl("gs_chain", backend)(x, list(blocks)))


@gs_chain.register_fake
def _(x, blocks, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("gsops::gs_chain_backward", mutates_args=())
def gs_chain_backward(grad: Tensor, x: Tensor, blocks: List[Tensor], backend: str) -> List[Tensor]:
    dx, dBs = dispatch.impl("gs_chain_backward", backend)(grad, x, list(blocks))
    return [_fresh(dx.to(x.dtype))] + [_fresh(dB.to(B.dtype)) for dB, B in zip(dBs, blocks)]


@gs_chain_backward.register_fake
def _(grad, x, blocks, backend):
    return [x.new_empty(x.shape)] + [B.new_empty(B.shape) for B in blocks]


def _chain_setup(ctx, inputs, output):
    x, blocks, backend = inputs
    ctx.save_for_backward(x, *blocks)
    ctx.backend = backend


def _chain_backward(ctx, grad):
    x, *blocks = ctx.saved_tensors
    dx, *dBs = gs_chain_backward(grad, x, blocks, ctx.backend)
    return dx, dBs, None


gs_chain.register_autograd(_chain_backward, setup_context=_chain_setup)


@torch.library.custom_op("gsops::gs_apply", mutates_args=())
def gs_apply(x: Tensor, L: Tensor, R: Tensor, backend: str) -> Tensor:
    return _fresh(dispatch.impl("gs_apply", backend)(x, L, R))


@gs_apply.register_fake
def _(x, L, R, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("gsops::gs_apply_backward", mutates_args=())
def gs_apply_backward(grad: Tensor, x: Tensor, L: Tensor, R: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dL, dR = dispatch.impl("gs_apply_backward", backend)(grad, x, L, R)
    return _fresh(dx.to(x.dtype)), _fresh(dL.to(L.dtype)), _fresh(dR.to(R.dtype))


@gs_apply_backward.register_fake
def _(grad, x, L, R, backend):
    return x.new_empty(x.shape), L.new_empty(L.shape), R.new_empty(R.shape)


def _apply_setup(ctx, inputs, output):
    x, L, R, backend = inputs
    ctx.save_for_backward(x, L, R)
    ctx.backend = backend


def _apply_backward(ctx, grad):
    x, L, R = ctx.saved_tensors
    dx, dL, dR = gs_apply_backward(grad, x, L, R, ctx.backend)
    return dx, dL, dR, None


gs_apply.register_autograd(_apply_backward, setup_context=_apply_setup)


@torch.library.custom_op("gsops::cayley_exact", mutates_args=())
def cayley_exact(K: Tensor, backend: str) -> Tensor:
    return _fresh(dispatch.impl("cayley_exact", backend)(K))


@cayley_exact.register_fake
def _(K, backend):
    return K.new_empty(K.shape)


@torch.library.custom_op("gsops::cayley_exact_backward", mutates_args=())
def cayley_exact_backward(grad: Tensor, Q: Tensor, backend: str) -> Tensor:
    return _fresh(dispatch.impl("cayley_exact_backward", backend)(grad, Q).to(Q.dtype))


@cayley_exact_backward.register_fake
def _(grad, Q, backend):
    return Q.new_empty(Q.shape)


def _cayley_setup(ctx, inputs, output):
    ctx.save_for_backward(output)  # Q = 2M - I: the backward reads M from it
    ctx.backend = inputs[1]


def _cayley_backward(ctx, grad):
    (Q,) = ctx.saved_tensors
    return cayley_exact_backward(grad, Q, ctx.backend), None


cayley_exact.register_autograd(_cayley_backward, setup_context=_cayley_setup)


@torch.library.custom_op("gsops::cayley_neumann", mutates_args=())
def cayley_neumann(K: Tensor, terms: int, backend: str) -> Tensor:
    return _fresh(dispatch.impl("cayley_neumann", backend)(K, terms))


@cayley_neumann.register_fake
def _(K, terms, backend):
    return K.new_empty(K.shape)


@torch.library.custom_op("gsops::cayley_neumann_backward", mutates_args=())
def cayley_neumann_backward(grad: Tensor, K: Tensor, terms: int, backend: str) -> Tensor:
    return _fresh(dispatch.impl("cayley_neumann_backward", backend)(grad, K, terms).to(K.dtype))


@cayley_neumann_backward.register_fake
def _(grad, K, terms, backend):
    return K.new_empty(K.shape)


def _neumann_setup(ctx, inputs, output):
    K, terms, backend = inputs
    ctx.save_for_backward(K)
    ctx.terms = terms
    ctx.backend = backend


def _neumann_backward(ctx, grad):
    (K,) = ctx.saved_tensors
    return cayley_neumann_backward(grad, K, ctx.terms, ctx.backend), None, None


cayley_neumann.register_autograd(_neumann_backward, setup_context=_neumann_setup)

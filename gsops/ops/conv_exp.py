"""Checked public ops for GS-SOC: skew kernels and the grouped convolution exponential.

``conv_exp`` dispatches (``GSOPS_BACKEND``): the torch path (the reference
series :func:`gsops.reference.conv_exp.conv_exp` with a fused hand-written
backward) is registered here at import; the
Triton kernel (``triton_kernels/conv_exp.py``) is registered lazily, imported
on its first call, and runs wherever the dispatch lets the Triton backend run
(CUDA tensors, or the interpreter with ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_int, check_same_device, check_tensor
from ..reference import conv_exp as ref
from . import dispatch

__all__ = ["skew_kernel", "conv_transpose_kernel", "conv_exp", "conv_exp_1x1"]

# Unchecked helpers the layers use on their own (already valid) parameters: SOC's
# power-iteration spectral bound and space-to-depth. Re-exported so that nn/ only
# talks to ops/.
power_iteration_vectors = ref.power_iteration_vectors
power_iterate = ref.power_iterate
spectral_bound = ref.spectral_bound
normalise_per_group = ref.normalise_per_group
space_to_depth = ref.space_to_depth


def _check_kernel(name: str, K, groups: int) -> torch.Tensor:
    check_tensor(name, K, dim=4)
    C, c, kh, kw = K.shape
    if kh != kw:
        raise ValueError(f"{name} must have a square spatial size (C, C/groups, k, k), got {tuple(K.shape)}")
    if kh % 2 == 0:
        raise ValueError(f"{name} kernel size k={kh} must be odd (a 'same' convolution needs an odd k)")
    if c * groups != C:
        raise ValueError(
            f"{name} must have shape (C, C/groups, k, k) with groups={groups}: "
            f"got {tuple(K.shape)}, so {name}.shape[1]*groups={c * groups} != C={C}"
        )
    return K


def conv_transpose_kernel(M: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``ConvTranspose(M)[i,j,k,l] = M[j,i,h-k-1,w-l-1]`` within each group; M is (C, C/groups, k, k)."""
    groups = check_int("groups", groups)
    _check_kernel("M", M, groups)
    return ref.conv_transpose_kernel(M, groups)


def skew_kernel(M: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``L = M - ConvTranspose(M)`` (SOC): the convolution with L has a skew-symmetric Jacobian."""
    groups = check_int("groups", groups)
    _check_kernel("M", M, groups)
    return ref.skew_kernel(M, groups)


def _check_x(x, L, groups):
    check_tensor("x", x, dim=4)
    check_same_device(x=x, L=L)
    if x.dtype != L.dtype:
        raise TypeError(f"x and L must have the same dtype, got x {x.dtype} and L {L.dtype}")
    if x.shape[1] != L.shape[0]:
        raise ValueError(f"x.shape[1]={x.shape[1]} must equal the channels of L, L.shape[0]={L.shape[0]}")


def conv_exp(x: torch.Tensor, L: torch.Tensor, terms: int, groups: int = 1) -> torch.Tensor:
    """Grouped convolution exponential ``sum_{i=0}^{terms} L^{*i} x / i!`` (Definition 6.1, GS paper).

    ``x`` is (N, C, H, W); ``L`` is a grouped kernel (C, C/groups, k, k) with odd
    k, applied with "same" zero padding. For a skew kernel (:func:`skew_kernel`)
    the limit ``terms -> inf`` has an orthogonal Jacobian.
    """
    groups = check_int("groups", groups)
    terms = check_int("terms", terms, minimum=0)
    _check_kernel("L", L, groups)
    _check_x(x, L, groups)
    return dispatch.get("conv_exp", x.device)(x, L, terms, groups)


def conv_exp_1x1(x: torch.Tensor, L: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Exact ``exp(L) * x`` for a 1x1 grouped kernel: ``torch.linalg.matrix_exp`` of each channel block."""
    groups = check_int("groups", groups)
    _check_kernel("L", L, groups)
    if L.shape[-1] != 1:
        raise ValueError(f"L must be a 1x1 kernel (C, C/groups, 1, 1), got {tuple(L.shape)}")
    _check_x(x, L, groups)
    return ref.conv_exp_1x1(x, L, groups)


class _ConvExpTorch(torch.autograd.Function):
    """The reference series with a hand-written backward (torch ops only).

    Reverse mode of ``z_i = (L * z_{i-1}) / i``, ``y = sum_i z_i``: with
    ``a_T = g`` and ``a_{i-1} = g + (L^T * a_i) / i`` (``L^T *`` is the adjoint,
    ``conv_transpose2d``), ``dx = a_0`` and ``dL = sum_i corr(z_{i-1}, a_i / i)``,
    the sum computed as ONE weight-gradient convolution over the terms stacked
    along the batch (about 2x faster than autograd's per-term weight gradients).
    Each term is one grouped convolution (all groups in one call). The forward
    writes ``z_0 .. z_{T-1}`` straight into that stacked buffer (the division by
    ``i`` and the copy are one pass) and the backward writes ``a_i / i`` into a
    second one, so no term is concatenated; the saved ``L`` (already normalised)
    is reused by every backward step.
    """

    @staticmethod
    def forward(ctx, x, L, terms, groups):
        pad = (L.shape[-2] // 2, L.shape[-1] // 2)
        n = x.shape[0]
        zs = x.new_empty((terms * n,) + tuple(x.shape[1:]))  # z_0 .. z_{T-1} stacked along the batch
        zs[:n].copy_(x)
        z, y = x, None
        for i in range(1, terms + 1):
            c = F.conv2d(z, L, padding=pad, groups=groups)
            z = torch.div(c, i, out=zs[i * n:(i + 1) * n]) if i < terms else c.div_(i)
            y = x + z if y is None else y.add_(z)
        ctx.save_for_backward(L, zs)
        ctx.terms, ctx.groups, ctx.pad = terms, groups, pad
        return y

    @staticmethod
    def backward(ctx, g):
        L, zs = ctx.saved_tensors
        terms, groups, pad = ctx.terms, ctx.groups, ctx.pad
        n = g.shape[0]
        scaled = g.new_empty(zs.shape)  # a_i / i, stacked like zs
        a = g
        for i in range(terms, 0, -1):
            s = torch.div(a, i, out=scaled[(i - 1) * n:i * n])  # gradient at the output of conv step i
            a = F.conv_transpose2d(s, L, padding=pad, groups=groups).add_(g)
        dL = None
        if ctx.needs_input_grad[1]:
            dL = torch.nn.grad.conv2d_weight(zs, L.shape, scaled, padding=pad, groups=groups)
        return (a if ctx.needs_input_grad[0] else None), dL, None, None


def _conv_exp_torch(x, L, terms, groups):
    if terms == 0:
        return x
    return _ConvExpTorch.apply(x, L, terms, groups)


_triton_impl = []


def _conv_exp_triton(x, L, terms, groups):
    # Imported on first call so that importing gsops never imports Triton.
    if not _triton_impl:
        from gsops.triton_kernels.conv_exp import conv_exp_triton

        from ..backends.triton_backend import on_tensor_device

        _triton_impl.append(on_tensor_device(conv_exp_triton, "conv_exp"))
    return _triton_impl[0](x, L, terms, groups)


dispatch.register("torch", "conv_exp", _conv_exp_torch)
dispatch.register("triton", "conv_exp", _conv_exp_triton)

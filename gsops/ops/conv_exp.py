"""GS-SOC's grouped convolution exponential (Section 6 of Gorbunov et al., 2024) and its helpers.

Definitions (SPEC "GS orthogonal convolutions"):

* ``ConvTranspose(M)[i, j, k, l] = M[j, i, h-k-1, w-l-1]`` (per group for a
  grouped kernel), so the "same"-padded convolution with ``ConvTranspose(M)``
  is the adjoint of the convolution with ``M`` (odd kernel size, stride 1).
* The skew kernel ``L = M - ConvTranspose(M)`` has a skew-symmetric Jacobian.
* The convolution exponential (Definition 6.1 of the GS paper, after Singla and
  Feizi 2021): ``L *_e X = X + L*X/1! + L*(L*X)/2! + ...``, truncated after
  ``terms`` convolutions.
* A 1x1 skew kernel is a block-diagonal skew channel matrix; its exponential
  is exact with ``torch.linalg.matrix_exp``.
* Spectral normalisation as in SOC (Singla and Feizi 2021, after "Fantastic
  Four", Singla and Feizi 2019): the minimum of the spectral norms of four
  reshapings of the kernel, each estimated by power iteration; each group of a
  grouped kernel is normalised by its own bound (the GS paper's grouped SOC).

Reading order: the references (the naive series, the series as the torch
backend runs it with its backward formula, the SOC helpers), the custom ops
``gsops::conv_exp`` / ``gsops::conv_exp_backward``, then the checked public
functions. ``conv_exp`` dispatches (``GSOPS_BACKEND``); the triton and cuda
backends register forward and backward kernels with the contract of
:func:`conv_exp_forward_reference` and :func:`conv_exp_backward_reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ..checks import check_int, check_same_device, check_tensor
from . import dispatch, library

__all__ = ["skew_kernel", "conv_transpose_kernel", "conv_exp", "conv_exp_1x1"]

# ----------------------------------------------------------------------------- reference


def conv_transpose_kernel_reference(M: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``ConvTranspose(M)`` of a grouped kernel ``M`` of shape (C, C/groups, k, k), per group."""
    C, c, kh, kw = M.shape
    Mg = M.reshape(groups, c, c, kh, kw)
    return Mg.transpose(1, 2).flip(-2, -1).reshape(C, c, kh, kw)


def skew_kernel_reference(M: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``L = M - ConvTranspose(M)``: a grouped kernel whose convolution Jacobian is skew-symmetric."""
    return M - conv_transpose_kernel_reference(M, groups)


def conv_exp_reference(x: torch.Tensor, L: torch.Tensor, terms: int, groups: int = 1) -> torch.Tensor:
    """``sum_{i=0}^{terms} L^{*i} x / i!`` with "same" zero padding and grouped convolution (the definition)."""
    pad = (L.shape[-2] // 2, L.shape[-1] // 2)
    y = x
    z = x
    for i in range(1, terms + 1):
        z = F.conv2d(z, L, padding=pad, groups=groups) / i
        y = y + z
    return y


def conv_exp_forward_reference(x: torch.Tensor, L: torch.Tensor, terms: int, groups: int):
    """``(y, zs)``: the series of :func:`conv_exp_reference` and its terms ``z_0 .. z_{T-1}``
    (``z_i = (L * z_{i-1}) / i``, ``z_0 = x``) stacked along the batch for the backward.

    Each term is one grouped convolution (all groups in one call); the division by ``i``
    writes the term straight into the stacked buffer, so nothing is concatenated.
    """
    pad = (L.shape[-2] // 2, L.shape[-1] // 2)
    n = x.shape[0]
    zs = x.new_empty((terms * n,) + tuple(x.shape[1:]))
    if terms == 0:
        return x.clone(), zs
    zs[:n].copy_(x)
    z, y = x, None
    for i in range(1, terms + 1):
        c = F.conv2d(z, L, padding=pad, groups=groups)
        z = torch.div(c, i, out=zs[i * n:(i + 1) * n]) if i < terms else c.div_(i)
        y = x + z if y is None else y.add_(z)
    return y, zs


def conv_exp_backward_reference(grad: torch.Tensor, x: torch.Tensor, L: torch.Tensor, zs: torch.Tensor,
                                terms: int, groups: int):
    """``(dx, dL)`` by reverse mode of ``z_i = (L * z_{i-1}) / i``, ``y = sum_i z_i``.

    With ``a_T = g`` and ``a_{i-1} = g + (L^T * a_i) / i`` (``L^T *`` is the adjoint,
    ``conv_transpose2d``): ``dx = a_0`` and ``dL = sum_i corr(z_{i-1}, a_i / i)``, the sum
    computed as ONE weight-gradient convolution over the terms ``zs`` stacked along the
    batch (about 2x faster than a weight gradient per term); ``a_i / i`` is written into a
    second stacked buffer.
    """
    if terms == 0:
        return grad.clone(), torch.zeros_like(L)
    pad = (L.shape[-2] // 2, L.shape[-1] // 2)
    n = grad.shape[0]
    scaled = grad.new_empty(zs.shape)  # a_i / i, stacked like zs
    a = grad
    for i in range(terms, 0, -1):
        s = torch.div(a, i, out=scaled[(i - 1) * n:i * n])  # gradient at the output of conv step i
        a = F.conv_transpose2d(s, L, padding=pad, groups=groups).add_(grad)
    dL = torch.nn.grad.conv2d_weight(zs, L.shape, scaled, padding=pad, groups=groups)
    return a, dL


def block_diag_skew_exp(L: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The exact exponential of a 1x1 grouped kernel (C, C/groups, 1, 1) as a grouped 1x1 kernel."""
    C, c = L.shape[0], L.shape[1]
    blocks = L.reshape(groups, c, c)
    return torch.linalg.matrix_exp(blocks).reshape(C, c, 1, 1)


def conv_exp_1x1_reference(x: torch.Tensor, L: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``exp(L) * x`` for a 1x1 grouped kernel, exact (matrix exponential, no series)."""
    return F.conv2d(x, block_diag_skew_exp(L, groups), groups=groups)


def _reshapings(L: torch.Tensor, groups: int):
    """The four (groups, rows, cols) matrices of the "Fantastic Four" bound for a grouped kernel."""
    C, c, kh, kw = L.shape
    K = L.reshape(groups, c, c, kh, kw)  # (g, out, in, h, w)
    return [
        K.permute(0, 1, 3, 2, 4).reshape(groups, c * kh, c * kw),  # rows (out, h), cols (in, w)
        K.permute(0, 1, 4, 2, 3).reshape(groups, c * kw, c * kh),  # rows (out, w), cols (in, h)
        K.reshape(groups, c, c * kh * kw),                         # rows out, cols (in, h, w)
        K.permute(0, 2, 1, 3, 4).reshape(groups, c, c * kh * kw),  # rows in, cols (out, h, w)
    ]


def power_iteration_vectors(L: torch.Tensor, groups: int, generator=None):
    """Random unit start vectors ``(u_i, v_i)``, one pair per reshaping, each (groups, cols)/(groups, rows)."""
    us, vs = [], []
    for A in _reshapings(L.detach(), groups):
        u = torch.randn(A.shape[0], A.shape[2], dtype=L.dtype, device=L.device, generator=generator)
        v = torch.randn(A.shape[0], A.shape[1], dtype=L.dtype, device=L.device, generator=generator)
        us.append(F.normalize(u, dim=-1))
        vs.append(F.normalize(v, dim=-1))
    return us, vs


@torch.no_grad()
def power_iterate(L: torch.Tensor, groups: int, us, vs, iters: int) -> None:
    """``iters`` power-iteration steps on the four reshapings, updating ``us``/``vs`` in place."""
    if iters <= 0 or L.is_meta:  # nothing to compute on the meta device (parameter counting)
        return
    for A, u, v in zip(_reshapings(L.detach(), groups), us, vs):
        for g in range(groups):  # one mv per group: a batched gemv (bmm) is ~100x slower on CPU
            Ag, uu, vv = A[g], u[g], v[g]
            for _ in range(iters):
                vv = F.normalize(torch.mv(Ag, uu), dim=0)
                uu = F.normalize(torch.mv(Ag.T, vv), dim=0)
            u[g].copy_(uu)
            v[g].copy_(vv)


def spectral_bound(L: torch.Tensor, groups: int, us, vs) -> torch.Tensor:
    """SOC's normaliser per group: ``min_i v_i^T R_i(L_g) u_i`` for each group ``g``, shape (groups,).

    Each ``v^T R u`` is the power-iteration estimate of ``||R_i||_2`` (differentiable
    in ``L``; u, v fixed). Each group of a grouped convolution is an independent
    block, normalised by its own bound (the GS paper's grouped SOC).
    """
    sig = torch.stack([
        torch.stack([torch.dot(v[g], torch.mv(A[g], u[g])) for g in range(groups)])
        for A, u, v in zip(_reshapings(L, groups), us, vs)
    ])  # (4, groups); per-group mv as in power_iterate
    return sig.amin(0)


def normalise_per_group(L: torch.Tensor, groups: int, scale: torch.Tensor) -> torch.Tensor:
    """``L`` with group ``g`` (output channels ``g*C/groups ...``) multiplied by ``scale[g]``."""
    C, c, kh, kw = L.shape
    return (L.reshape(groups, c, c, kh, kw) * scale.reshape(groups, 1, 1, 1, 1)).reshape(C, c, kh, kw)


def space_to_depth(x: torch.Tensor, s: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C*s*s, H/s, W/s); channel ``c*s*s + a*s + b`` holds pixel ``(s*i+a, s*j+b)``."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // s, s, W // s, s).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(N, C * s * s, H // s, W // s)


# ----------------------------------------------------------------------------- custom ops


def _fake(x, L, terms, groups, backend):
    # a backend whose backward recomputes the terms (CONV_EXP_KEEPS_TERMS = False) returns no zs
    keeps = getattr(backends.module(backend), "CONV_EXP_KEEPS_TERMS", True)
    return x.new_empty(x.shape), x.new_empty(((terms if keeps else 0) * x.shape[0],) + tuple(x.shape[1:]))


SPEC = library.define(library.OpSpec(
    name="conv_exp",
    inputs="Tensor x, Tensor L, int terms, int groups", returns="(Tensor, Tensor)",
    saved="Tensor x, Tensor L, Tensor zs, int terms, int groups", grads="(Tensor, Tensor)",
    save=lambda args, out: (args[0], args[1], out[1], args[2], args[3]),
    reference=conv_exp_forward_reference,
    reference_backward=conv_exp_backward_reference,
    fake=_fake,
    grad_like=lambda x, L, zs, terms, groups: (x, L),
))

# ----------------------------------------------------------------------------- dispatch


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
    return conv_transpose_kernel_reference(M, groups)


def skew_kernel(M: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``L = M - ConvTranspose(M)`` (SOC): the convolution with L has a skew-symmetric Jacobian."""
    groups = check_int("groups", groups)
    _check_kernel("M", M, groups)
    return skew_kernel_reference(M, groups)


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
    the limit ``terms -> inf`` has an orthogonal Jacobian. ``terms=0`` returns ``x``.
    In eager mode the reference backend runs under plain autograd with the formulas of
    its custom op.
    """
    groups = check_int("groups", groups)
    terms = check_int("terms", terms, minimum=0)
    _check_kernel("L", L, groups)
    _check_x(x, L, groups)
    backend = dispatch.for_call("conv_exp", x, L)
    if terms == 0:
        return x
    return library.call_unchecked(SPEC, backend, x, L, terms, groups)[0]


def conv_exp_1x1(x: torch.Tensor, L: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Exact ``exp(L) * x`` for a 1x1 grouped kernel: ``torch.linalg.matrix_exp`` of each channel block."""
    groups = check_int("groups", groups)
    _check_kernel("L", L, groups)
    if L.shape[-1] != 1:
        raise ValueError(f"L must be a 1x1 kernel (C, C/groups, 1, 1), got {tuple(L.shape)}")
    _check_x(x, L, groups)
    return conv_exp_1x1_reference(x, L, groups)

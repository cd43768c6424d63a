"""Pure-torch grouped convolution exponential (GS-SOC, Section 6 of Gorbunov et al., 2024).

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

Functions here assume validated arguments (see :mod:`gsops.ops.conv_exp`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_transpose_kernel(M: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``ConvTranspose(M)`` of a grouped kernel ``M`` of shape (C, C/groups, k, k), per group."""
    C, c, kh, kw = M.shape
    Mg = M.reshape(groups, c, c, kh, kw)
    return Mg.transpose(1, 2).flip(-2, -1).reshape(C, c, kh, kw)


def skew_kernel(M: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``L = M - ConvTranspose(M)``: a grouped kernel whose convolution Jacobian is skew-symmetric."""
    return M - conv_transpose_kernel(M, groups)


def conv_exp(x: torch.Tensor, L: torch.Tensor, terms: int, groups: int = 1) -> torch.Tensor:
    """``sum_{i=0}^{terms} L^{*i} x / i!`` with "same" zero padding and grouped convolution."""
    pad = (L.shape[-2] // 2, L.shape[-1] // 2)
    y = x
    z = x
    for i in range(1, terms + 1):
        z = F.conv2d(z, L, padding=pad, groups=groups) / i
        y = y + z
    return y


def block_diag_skew_exp(L: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The exact exponential of a 1x1 grouped kernel (C, C/groups, 1, 1) as a grouped 1x1 kernel."""
    C, c = L.shape[0], L.shape[1]
    blocks = L.reshape(groups, c, c)
    return torch.linalg.matrix_exp(blocks).reshape(C, c, 1, 1)


def conv_exp_1x1(x: torch.Tensor, L: torch.Tensor, groups: int = 1) -> torch.Tensor:
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

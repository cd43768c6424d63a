"""Block-diagonal products and GS matrices (SPEC "GS matrices").

All functions act on the last dimension of ``x`` as on a column vector, with
any leading batch shape. Half-precision inputs are computed in float32 and
cast back (float32 accumulation).
"""
from __future__ import annotations

import torch

from ..checks import accumulate_dtype
from ..perm import _permute_unchecked

def block_diag_mm(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``diag(B_1..B_r) x``: block i of x (entries i*b..(i+1)*b-1) is multiplied by B_i."""
    r, b, _ = B.shape
    acc = accumulate_dtype(x.dtype)
    xb = x.reshape(*x.shape[:-1], r, b).to(acc)
    y = torch.einsum("...rj,rij->...ri", xb, B.to(acc))
    return y.reshape(x.shape).to(x.dtype)


def block_diag_mm_bmm(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """:func:`block_diag_mm` as one ``torch.bmm`` over the blocks (no einsum parsing: cheaper on small layers)."""
    r, b, _ = B.shape
    acc = accumulate_dtype(x.dtype)
    xb = x.reshape(-1, r, b).to(acc).transpose(0, 1)  # (r, N, b)
    y = torch.bmm(xb, B.to(acc).transpose(1, 2))      # y_i = x_i B_i^T, i.e. (B_i x_i) per token
    return y.transpose(0, 1).reshape(x.shape).to(x.dtype)


def gs_chain(x: torch.Tensor, blocks) -> torch.Tensor:
    """``B_m P ... B_2 P B_1 x`` with ``P = perm(r, r*b)`` between consecutive factors."""
    r = blocks[0].shape[0]
    y = x
    for j, B in enumerate(blocks):
        if j:
            y = _permute_unchecked(y, r, inverse=False)
        y = block_diag_mm(y, B)
    return y


def gs_apply(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """GSOFT's ``Q x`` with ``Q = P^T L P R``, ``P = perm(r, d)`` (SPEC "GSOFT")."""
    r = R.shape[0]
    y = gs_chain(x, [R, L])
    return _permute_unchecked(y, r, inverse=True)


def gs_dense(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The dense ``d x d`` matrix ``Q = P^T L P R``."""
    r, b, _ = R.shape
    eye = torch.eye(r * b, dtype=R.dtype, device=R.device)
    # gs_apply on the rows of I gives (Q e_i) as row i, i.e. Q^T.
    return gs_apply(eye, L, R).transpose(0, 1).contiguous()

"""Projection onto the GS class (Algorithm 1 of Gorbunov et al., 2024).

For GSOFT's ``Q = P^T L P R`` with ``P = perm(r, d)``: ``P W = L P R`` is in
``GS(I, P, I)``, whose ``b x b`` blocks are low rank (Proposition 1):
block ``(k1, k2)`` of ``L P R`` is ``sum_i L[:, sigma(i)] R[i, :]`` over the
indices ``i`` with ``i // b == k2`` and ``sigma(i) // b == k1``. The
Frobenius-optimal member is therefore the truncated SVD of each block of
``P W`` at that rank, split as ``U S^{1/2}`` into L and ``S^{1/2} V^T`` into R.

Pure PyTorch on every device (not dispatched): the reference, then the checked function.
"""
from __future__ import annotations

import torch

from ..checks import accumulate_dtype, check_divides, check_finite, check_int, check_tensor
from ..perm import gather_index
def _slots(r: int, b: int):
    """For every index i of the middle vector: (k1, k2, j) = its L block, R block and rank slot."""
    d = r * b
    sigma = gather_index(r, d, inverse=True)  # sigma = perm(r, d)
    i = torch.arange(d, device="cpu")
    k2 = i // b
    k1 = sigma // b
    slot = torch.zeros(d, dtype=torch.long, device="cpu")
    seen = {}
    for idx in range(d):
        key = (int(k1[idx]), int(k2[idx]))
        slot[idx] = seen.get(key, 0)
        seen[key] = int(slot[idx]) + 1
    return sigma, k1, k2, slot


def block_ranks(r: int, b: int) -> torch.Tensor:
    """(r, r) ranks of the blocks of ``L P R`` that ``P = perm(r, r*b)`` allows."""
    _, k1, k2, _ = _slots(r, b)
    ranks = torch.zeros(r, r, dtype=torch.long, device="cpu")
    ranks.index_put_((k1, k2), torch.ones_like(k1), accumulate=True)
    return ranks


def gs_project_reference(W: torch.Tensor, block_size: int):
    """Blocks ``(L, R)``, each (r, b, b), with ``P^T L P R`` closest to ``W`` in Frobenius norm."""
    d = W.shape[0]
    b = block_size
    r = d // b
    acc = accumulate_dtype(W.dtype)
    A = W.to(acc)[gather_index(r, d).to(W.device)]  # rows of P W
    blocks = A.reshape(r, b, r, b).permute(0, 2, 1, 3)  # blocks[k1, k2] = A_{k1 k2}
    U, S, Vh = torch.linalg.svd(blocks)
    sigma, k1, k2, slot = (t.to(W.device) for t in _slots(r, b))
    sq = S[k1, k2, slot].sqrt()  # (d,)
    # column sigma(i) of L (block k1, local column sigma(i) % b) = U[k1, k2][:, slot] * sqrt(s)
    L = torch.zeros(r, b, b, dtype=acc, device=W.device)
    R = torch.zeros(r, b, b, dtype=acc, device=W.device)
    L[k1, :, sigma % b] = U[k1, k2, :, slot] * sq[:, None]
    R[k2, torch.arange(d, device=W.device) % b, :] = Vh[k1, k2, slot, :] * sq[:, None]
    return L.to(W.dtype), R.to(W.dtype)


def gs_project(W: torch.Tensor, block_size: int):
    """Algorithm 1 of the GS paper for ``Q = P^T L P R``: the Frobenius-closest ``(L, R)`` to ``W``."""
    check_tensor("W", W, dim=2)
    if W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be square (d, d), got {tuple(W.shape)}")
    block_size = check_int("block_size", block_size)
    check_divides("block_size", block_size, "W.shape[0]", W.shape[0])
    check_finite("W", W)
    return gs_project_reference(W, block_size)

"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper decomposition (Shi et al., 2024).

For a frozen weight ``W`` (flattened to ``m x n`` for Conv2d), LU with partial
pivoting gives ``W = P L U``; ``D = diag(U)`` and ``U <- D^{-1} U`` (Algorithm 1,
steps 2-4), so ``W = P L diag(z) U``. The first ``rank`` components give
``DSM = sigma * P L_r diag(z_r) U_r`` (eq. 6) and the frozen residual
``RSM = W - DSM`` (eq. 7), stored in the base layer's weight. Only ``z_r``
(``rank`` numbers) and the scalar ``sigma`` are trained; the layer computes
``RSM x + sigma * P L_r diag(z_r) U_r x`` (eq. 9).

Choices made here (the paper lists several): ``z_r`` starts at the true LDU
diagonal ("Regular LDU" initialisation) and ``sigma`` at 1.0, so the layer
equals the base layer at initialisation up to float rounding. A zero pivot
leaves its row of ``U`` unnormalised (its ``z`` is 0).

The row order ``perm`` of ``P`` is chosen by partial pivoting and changes with
tiny changes of ``W`` (a bfloat16-rounded copy of a layer can pivot on other
rows). The layer's output depends on it, so ``perm`` is a persistent buffer,
saved with the adapter: ``P L_r`` and ``U_r`` are rebuilt from the base weight
by ``rank`` steps of Gaussian elimination in that fixed row order
(:func:`ldu_factors`), and a saved adapter (``perm``, ``z_r``, ``sigma``) loaded
into a base that differs only by rounding gives the trained function up to
that rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from .lowrank import LowRankAdapter


def lu_row_order(W64: torch.Tensor) -> torch.Tensor:
    """The row order of LU with partial pivoting, ``W = P L U``: ``(P^T W)[i] = W[perm[i]]`` (int64)."""
    P, _, _ = torch.linalg.lu(W64)
    return P.argmax(0).to(torch.int64)


def ldu_factors(W64: torch.Tensor, rank: int, perm: torch.Tensor):
    """``(P L_r, U_r normalised, D_r)`` of ``W = P L diag(D) U`` for a given row order, in float64.

    ``rank`` steps of Gaussian elimination on ``W[perm]`` without further
    pivoting. A zero pivot leaves its column of ``L`` as ``e_k`` and its row of
    ``U`` unnormalised (``D_k = 0``).
    """
    m, n = W64.shape
    A = W64[perm].clone()
    L = torch.zeros(m, rank, dtype=W64.dtype, device=W64.device)
    U = torch.zeros(rank, n, dtype=W64.dtype, device=W64.device)
    for k in range(rank):
        U[k, k:] = A[k, k:]
        piv = A[k, k]
        L[k, k] = 1.0
        if piv != 0:
            L[k + 1:, k] = A[k + 1:, k] / piv
            A[k + 1:, k:] -= L[k + 1:, k, None] * A[k, None, k:]
    D = torch.diagonal(U[:, :rank]).clone()
    safe = torch.where(D == 0, torch.ones_like(D), D)
    left = torch.empty_like(L)
    left[perm] = L
    return left, U / safe[:, None], D


def check_row_order(name: str, perm, m: int) -> torch.Tensor:
    """``perm`` must be an int64 permutation of ``range(m)``; else ValueError naming the layer."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (m,):
        got = f"{perm.dtype} {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"{name}: perm must be an int64 tensor of shape ({m},), got {got}")
    if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(m)):
        raise ValueError(f"{name}: perm must be a permutation of range({m})")
    return perm


class LoLDUAdapter(LowRankAdapter):
    """LoLDU on a base layer; ``perm``: the LU row order to use (None: partial pivoting on the base weight)."""

    method = "loldu"

    def __init__(self, base: nn.Module, rank: int, name: str = "layer", adapter_dtype: torch.dtype | None = None,
                 perm: torch.Tensor | None = None):
        super().__init__()
        W64 = self._init_low_rank(base, rank, name, adapter_dtype)
        pdt = self.param_dtype
        perm = lu_row_order(W64) if perm is None else check_row_order(name, perm, W64.shape[0]).to(W64.device)
        left, right, D = ldu_factors(W64, self.rank, perm)
        self.register_buffer("perm", perm.clone())      # LU row order (m), saved with the adapter
        self.register_buffer("left", left.to(pdt))      # P L_r (m x r), frozen
        self.register_buffer("right", right.to(pdt))    # U_r (r x n), frozen
        self.z = nn.Parameter(D.to(pdt).clone())
        self.sigma = nn.Parameter(torch.ones((), dtype=pdt, device=base.weight.device))
        self.register_buffer("z0", self.z.detach().clone(), persistent=False)
        self._store_residual(W64, name)

    saved_buffers = ("perm",)

    def set_row_order(self, perm: torch.Tensor) -> None:
        """Rebuild the factors for LU row order ``perm`` (the base weight is restored, then split again)."""
        if self.merged:
            raise ValueError(f"{self.name}: cannot change the LU row order of a merged layer; unmerge first")
        perm = check_row_order(self.name, perm, self.d_out).to(self.perm.device)
        if torch.equal(perm, self.perm):
            return
        with torch.no_grad():
            W64 = self._flat_weight(torch.float64) + self._delta(torch.float64, initial=True)
            left, right, D = ldu_factors(W64, self.rank, perm)
            self.perm.copy_(perm)
            self.left.copy_(left)
            self.right.copy_(right)
            self.z0.copy_(D)
            self.z.copy_(D)
            self.sigma.fill_(1.0)
            self._store_residual(W64, self.name)

    def _dsm(self, dtype=None, z=None, sigma=None) -> torch.Tensor:
        z = self.z if z is None else z
        sigma = self.sigma if sigma is None else sigma
        left, right = self.left, self.right
        if dtype is not None:
            left, right, z, sigma = left.to(dtype), right.to(dtype), z.to(dtype), sigma.to(dtype)
        return sigma * (left * z) @ right

    def _delta(self, dtype=None, initial: bool = False) -> torch.Tensor:
        if initial:  # DSM at initialisation: z0 and sigma = 1
            one = torch.ones((), dtype=torch.float64, device=self.base_layer.weight.device)
            return self._dsm(dtype, z=self.z0, sigma=one)
        return self._dsm(dtype)

    def _linear_delta(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        F = torch.nn.functional
        cd = self._compute_dtype(x)
        y = F.linear(F.linear(x, self.right.to(cd)) * self.z.to(cd), self.left.to(cd))
        return (self.sigma.to(cd) * y).to(dtype)


__all__ = ["LoLDUAdapter", "ldu_factors", "lu_row_order", "check_row_order"]

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
leaves its row of ``U`` unnormalised (its ``z`` is 0). ``P L_r`` and ``U_r`` are
frozen buffers recomputed from the base weight when the adapter is applied
(LU is deterministic), so a saved adapter holds only ``z_r`` and ``sigma``.
"""
from __future__ import annotations

import torch
from torch import nn

from ._lowrank import LowRankAdapter


class LoLDUAdapter(LowRankAdapter):
    def __init__(self, base: nn.Module, rank: int, name: str = "layer"):
        super().__init__()
        W64 = self._init_low_rank(base, rank, name)
        rank = self.rank
        W = base.weight
        P, L, U = torch.linalg.lu(W64)
        D = torch.diagonal(U).clone()
        safe = torch.where(D == 0, torch.ones_like(D), D)
        U = U / safe[:, None]
        left = (P @ L[:, :rank]).to(W.dtype)
        right = U[:rank].to(W.dtype)
        self.register_buffer("left", left)    # P L_r (m x r), frozen
        self.register_buffer("right", right)  # U_r (r x n), frozen
        self.z = nn.Parameter(D[:rank].to(W.dtype).clone())
        self.sigma = nn.Parameter(torch.ones((), dtype=W.dtype, device=W.device))
        self.register_buffer("z0", self.z.detach().clone(), persistent=False)
        self._store_residual(W64, name)

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

    def _linear_delta(self, x: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        return self.sigma * F.linear(F.linear(x, self.right) * self.z, self.left)


__all__ = ["LoLDUAdapter"]

"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation (Cao, 2024).

For a frozen weight ``W`` (flattened to ``m x n`` for Conv2d) with SVD
``W = U S V^T``, SORSA splits ``W = W_r + W_p`` with the principal part
``W_p = U_p S_p V_p^T`` (the first ``rank`` singular triplets, eq. 5) and the
residual ``W_r`` (eq. 6). ``W_r`` is frozen and stored in the base layer's
weight; ``U_p`` (m x r), ``S_p`` (r) and ``V_p^T`` (r x n) are trained, and the
layer computes ``SORSA(x) = W_r x + W_p x`` (eq. 7), which equals the base
layer at initialisation up to float rounding. The orthonormal regulariser
(eq. 8) ``||U_p^T U_p - I||_F + ||V_p^T V_p - I||_F`` is
:func:`sorsa_regularizer`; add ``gamma * sorsa_regularizer(model)`` to the loss.

The SVD runs in float64. ``revert()`` rebuilds ``W = W_r + W_p(init)`` in float64
from factors kept at initialisation (non-persistent buffers), so it restores the
original weight up to one rounding of the residual.
"""
from __future__ import annotations

import torch
from torch import nn

from .lowrank import LowRankAdapter


class SORSAAdapter(LowRankAdapter):
    """SORSA on a base layer: trained ``U_p``, ``S_p``, ``V_p^T`` of rank ``rank`` plus the frozen residual."""

    method = "sorsa"

    def __init__(self, base: nn.Module, rank: int, name: str = "layer", adapter_dtype: torch.dtype | None = None):
        super().__init__()
        W64 = self._init_low_rank(base, rank, name, adapter_dtype)
        rank = self.rank
        pdt = self.param_dtype
        U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
        Up, Sp, Vhp = U[:, :rank], S[:rank], Vh[:rank]
        self.U = nn.Parameter(Up.to(pdt).clone())
        self.S = nn.Parameter(Sp.to(pdt).clone())
        self.Vh = nn.Parameter(Vhp.to(pdt).clone())
        for key, t in (("U0", self.U), ("S0", self.S), ("Vh0", self.Vh)):
            self.register_buffer(key, t.detach().clone(), persistent=False)
        self._store_residual(W64, name)  # W_r = W - W_p from the stored (rounded) factors

    def _principal(self, dtype=None, factors=None) -> torch.Tensor:
        U, S, Vh = factors or (self.U, self.S, self.Vh)
        if dtype is not None:
            U, S, Vh = U.to(dtype), S.to(dtype), Vh.to(dtype)
        return (U * S) @ Vh

    def _delta(self, dtype=None, initial: bool = False) -> torch.Tensor:
        return self._principal(dtype, (self.U0, self.S0, self.Vh0) if initial else None)

    def _linear_delta(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        F = torch.nn.functional
        cd = self._compute_dtype(x)
        return F.linear(F.linear(x, self.Vh.to(cd)) * self.S.to(cd), self.U.to(cd)).to(dtype)

    def regularizer(self) -> torch.Tensor:
        """``||U_p^T U_p - I||_F + ||V_p^T V_p - I||_F`` (SORSA eq. 8; ``V_p^T`` is stored as ``Vh``)."""
        eye = torch.eye(self.rank, dtype=self.U.dtype, device=self.U.device)
        gu = self.U.transpose(0, 1) @ self.U - eye
        gv = self.Vh @ self.Vh.transpose(0, 1) - eye
        return torch.linalg.matrix_norm(gu) + torch.linalg.matrix_norm(gv)


def sorsa_regularizer(model: nn.Module) -> torch.Tensor:
    """Sum of SORSA's orthonormal regulariser (eq. 8) over every SORSA layer of ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    terms = [m.regularizer() for m in model.modules() if isinstance(m, SORSAAdapter)]
    if not terms:
        raise ValueError("model has no SORSA layer; apply gsops.AdapterConfig(method='sorsa', rank=...) first")
    return torch.stack(terms).sum()


__all__ = ["SORSAAdapter", "sorsa_regularizer"]

"""The frame shared by the additive low-rank baselines (SORSA, LoLDU).

Both split a frozen weight ``W`` (flattened to ``m x n`` for Conv2d) into a
frozen residual, stored in the base layer's weight, plus a trained term of rank
at most ``rank``; the layer computes ``residual x + delta x``. A subclass says
what ``delta`` is (:meth:`_delta`, in float64 from its initial factors for
:meth:`revert`) and how to apply it to a Linear input in factored form
(:meth:`_linear_delta`); the checks, merge rules and revert live here once.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int
from ..nn.adapters import MergeableAdapter, check_base_layer, layer_dims


def check_low_rank_layer(name: str, base: nn.Module, rank: int) -> int:
    """Raise, naming the layer and the numbers, when a rank-``rank`` low-rank adapter cannot wrap ``base``."""
    check_base_layer(base, name)
    rank = check_int("rank", rank)
    n, m = layer_dims(base)
    if rank > min(m, n):
        raise ValueError(f"{name}: rank={rank} must be <= min(out, in)={min(m, n)} (weight is {m} x {n})")
    return rank


class LowRankAdapter(MergeableAdapter):
    def _init_low_rank(self, base: nn.Module, rank: int, name: str) -> torch.Tensor:
        """Check ``base`` and ``rank`` (naming the layer), record them; the weight as ``m x n`` float64."""
        rank = check_low_rank_layer(name, base, rank)
        n, m = layer_dims(base)
        self.base_layer = base
        self.rank = rank
        self.d_in, self.d_out = n, m
        return base.weight.detach().reshape(m, n).to(torch.float64)

    def _store_residual(self, W64: torch.Tensor, name: str) -> None:
        """Write the frozen residual ``W - delta`` (delta from the stored, rounded factors) into the base weight."""
        W = self.base_layer.weight
        with torch.no_grad():
            W.copy_((W64 - self._delta(torch.float64)).reshape(W.shape).to(W.dtype))
        self.merged = False
        self.name = name
        self._guard_key()

    def _delta(self, dtype=None, initial: bool = False) -> torch.Tensor:
        """The ``m x n`` low-rank term (from the factors kept at initialisation when ``initial``)."""
        raise NotImplementedError

    def _linear_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``delta x`` for a Linear input, applied factor by factor (never forming ``delta``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.merged:
            return self.base_layer(x)
        self.check_parameters_finite()
        if isinstance(self.base_layer, nn.Linear):
            return self.base_layer(x) + self._linear_delta(x)
        return self._base_forward(x, self._flat_weight() + self._delta())

    def _merged_weight(self):
        return self._flat_weight(torch.float64) + self._delta(torch.float64)

    def _unmerged_weight(self):
        return self._flat_weight(torch.float64) - self._delta(torch.float64)

    def revert(self) -> nn.Module:
        """The original base module, its weight rebuilt in float64 as residual + initial low-rank term."""
        if self.merged:
            self.unmerge()
        with torch.no_grad():
            W = self.base_layer.weight
            W0 = self._flat_weight(torch.float64) + self._delta(torch.float64, initial=True)
            W.copy_(W0.reshape(W.shape).to(W.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, d_in={self.d_in}, d_out={self.d_out}"

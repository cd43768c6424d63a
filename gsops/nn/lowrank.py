"""The frame shared by the additive low-rank adapters (SORSA, LoLDU).

Both split a frozen weight ``W`` (flattened to ``m x n`` for Conv2d) into a
frozen residual, stored in the base layer's weight, plus a trained term of rank
at most ``rank``; the layer computes ``residual x + delta x``. A subclass says
what ``delta`` is (:meth:`_delta`, in float64 from its initial factors for
:meth:`revert`) and how to apply it to a Linear input in factored form
(:meth:`_linear_delta`); the checks, merge rules and revert live here once. Which ranks fit which layer
is the method's registry entry (:mod:`gsops.methods`).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import adapter_param_dtype, is_linear_like, layer_dims
from .mergeable import MergeableAdapter, method_registry


class LowRankAdapter(MergeableAdapter):
    """``residual x + delta x``: the base weight holds the residual while wrapped (:attr:`stores_residual`)."""

    method: str  # the registry entry whose rules check the layer and the rank
    stores_residual = True

    def _init_low_rank(self, base: nn.Module, rank: int, name: str, adapter_dtype=None) -> torch.Tensor:
        """Check ``base`` and ``rank`` (naming the layer), record them; the weight as ``m x n`` float64.

        Sets ``self.param_dtype``: ``adapter_dtype``, else float32 on a half-precision base.
        """
        rank = method_registry().get(self.method).check_layer(name, base, rank)
        n, m = layer_dims(base)
        self.base_layer = base
        self.rank = rank
        self.d_in, self.d_out = n, m
        self.param_dtype = adapter_param_dtype(base.weight.dtype, adapter_dtype)
        return self._flat_weight(torch.float64).detach().clone()

    def _store_residual(self, W64: torch.Tensor, name: str) -> None:
        """Write the frozen residual ``W - delta`` (delta from the stored, rounded factors) into the base weight."""
        W = self.base_layer.weight
        with torch.no_grad():
            W.copy_(self._to_base_layout(W64 - self._delta(torch.float64)).to(W.dtype))
        self.merged = False
        self.name = name
        self._guard_key()

    def _delta(self, dtype=None, initial: bool = False) -> torch.Tensor:
        """The ``m x n`` low-rank term (from the factors kept at initialisation when ``initial``)."""
        raise NotImplementedError

    def _linear_delta(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``delta x`` for a Linear input in ``dtype`` (the base output's), factor by factor (never forming ``delta``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.merged:
            return self.base_layer(x)
        self.check_parameters_finite()
        if is_linear_like(self.base_layer):
            y = self.base_layer(x)
            return y + self._linear_delta(x, y.dtype)
        W = self.base_layer.weight
        dt = torch.promote_types(W.dtype, self.param_dtype)
        return self._base_forward(x, (self._flat_weight(dt) + self._delta(dt)).to(W.dtype))

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
            W.copy_(self._to_base_layout(W0).to(W.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, d_in={self.d_in}, d_out={self.d_out}"

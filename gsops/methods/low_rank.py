"""The rules and construction the additive low-rank methods share (SORSA, LoLDU).

A low-rank method reads ``rank`` (required) and wraps a layer in its
:class:`gsops.nn.lowrank.LowRankAdapter` subclass; the rank must not exceed the
smaller side of the (flattened) weight.
"""
from __future__ import annotations

from torch import nn

from ..checks import check_int
from ..nn.layers import check_base_layer, layer_dims
from .spec import MethodSpec


class LowRankMethod(MethodSpec):
    family = "low_rank"
    params = ("rank",)

    def check_config(self, config) -> None:
        if config.rank is None:
            raise ValueError(f"method={self.name!r} needs rank=<int>, got rank=None")

    def check_layer(self, name: str, base: nn.Module, rank: int) -> int:
        """Raise, naming the layer and the numbers, when a rank-``rank`` adapter cannot wrap ``base``; the rank."""
        check_base_layer(base, name)
        rank = check_int("rank", rank)
        n, m = layer_dims(base)
        if rank > min(m, n):
            raise ValueError(f"{name}: rank={rank} must be <= min(out, in)={min(m, n)} (weight is {m} x {n})")
        return rank

    def layer_settings(self, name, layer, config, overrides=None) -> dict:
        self.check_layer(name, layer, config.rank)
        return dict(overrides or {})

    def build(self, name, layer, config, settings):
        return self.adapter_type(layer, config.rank, name=name, adapter_dtype=config.adapter_torch_dtype)


__all__ = ["LowRankMethod"]

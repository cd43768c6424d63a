"""LoLDU (Shi et al., 2024): a trained diagonal ``z_r`` and scalar ``sigma`` of an LDU split, plus a frozen residual.

The layer is :class:`gsops.nn.loldu.LoLDUAdapter`. Its LU row order ``perm``
is a per-layer setting saved with the adapter (a tensor, ``<layer>.perm``): a
loaded layer is rebuilt with the file's row order, which must be a permutation
of the output rows.
"""
from __future__ import annotations

from ..nn.layers import layer_dims
from ..nn.loldu import LoLDUAdapter, check_row_order
from .low_rank import LowRankMethod


class LoLDU(LowRankMethod):
    name = "loldu"
    title = "LoLDU"
    adapter_type = LoLDUAdapter

    def layer_settings(self, name, layer, config, overrides=None) -> dict:
        settings = super().layer_settings(name, layer, config, overrides)
        if "perm" in settings:
            check_row_order(name, settings["perm"], layer_dims(layer)[1])
        return settings

    def build(self, name, layer, config, settings):
        return LoLDUAdapter(layer, config.rank, name=name, adapter_dtype=config.adapter_torch_dtype,
                            perm=settings.get("perm"))

    def file_overrides(self, name, layer_meta, config, tensors) -> dict:
        return {"perm": tensors[f"{name}.perm"]} if f"{name}.perm" in tensors else {}

    def check_file_tensors(self, name, adapter, tensors) -> None:
        if f"{name}.perm" in tensors:
            check_row_order(name, tensors[f"{name}.perm"], adapter.d_out)


SPEC = LoLDU()

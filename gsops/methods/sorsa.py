"""SORSA (Cao, 2024): trained principal singular triplets of rank ``rank`` plus a frozen residual.

The layer is :class:`gsops.nn.sorsa.SORSAAdapter`; its orthonormal regulariser is
:func:`gsops.nn.sorsa.sorsa_regularizer`.
"""
from __future__ import annotations

from ..nn.sorsa import SORSAAdapter
from .low_rank import LowRankMethod


class SORSA(LowRankMethod):
    name = "sorsa"
    title = "SORSA"
    adapter_type = SORSAAdapter


SPEC = SORSA()

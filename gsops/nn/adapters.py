"""The adapter layers, by one import: orthogonal (GSOFT, Double GSOFT, OFT, BOFT) and low-rank (SORSA, LoLDU).

Where each piece lives:

* :mod:`gsops.nn.cayley_param`: packed skew parameters -> orthogonal Cayley blocks,
  the exact / Neumann policy and its device-side guard (:class:`CayleyBlocks`).
* :mod:`gsops.nn.rotations`: the structured orthogonal matrices built from those
  blocks (:class:`GSRotation`, :class:`BlockDiagRotation`, :class:`ButterflyRotation`).
* :mod:`gsops.nn.orthogonal`: :class:`OrthogonalAdapter`, a base layer times a rotation.
* :mod:`gsops.nn.sorsa`, :mod:`gsops.nn.loldu` (frame: :mod:`gsops.nn.lowrank`): the
  additive low-rank adapters.
* :mod:`gsops.nn.mergeable`: :class:`MergeableAdapter`, merge bookkeeping and the
  input / non-finite checks every adapter shares.
* :mod:`gsops.nn.layers`: which base layers are wrapped and how they are seen.
* :mod:`gsops.perm`: the permutations, BOFT's :func:`butterfly_index` among them.
* :mod:`gsops.methods`: one registry entry per method: its rules (which block
  sizes and ranks fit which layer, with the messages), parameters and construction.
"""
from __future__ import annotations

from .. import ops  # noqa: F401  (the layers call gsops.ops; tests watch it here)
from ..perm import butterfly_index
from .cayley_param import CAYLEY_METHODS, CayleyBlocks
from .layers import (
    SUPPORTED_LAYERS, adapter_param_dtype, check_base_layer, conv1d_type, is_conv1d, is_linear_like, layer_dims,
    supported_layer,
)
from .loldu import LoLDUAdapter
from .lowrank import LowRankAdapter
from .mergeable import MergeableAdapter
from .orthogonal import OrthogonalAdapter
from .rotations import BlockDiagRotation, ButterflyRotation, GSRotation, Rotation
from .sorsa import SORSAAdapter

__all__ = [
    "CayleyBlocks", "CAYLEY_METHODS", "Rotation", "GSRotation", "BlockDiagRotation", "ButterflyRotation",
    "butterfly_index", "OrthogonalAdapter", "MergeableAdapter", "LowRankAdapter", "SORSAAdapter", "LoLDUAdapter",
    "layer_dims", "check_base_layer", "adapter_param_dtype", "conv1d_type", "is_conv1d", "is_linear_like",
    "supported_layer", "SUPPORTED_LAYERS",
]

"""OFT (Qiu et al., 2023): ``Q = diag(C_1..C_r)``, one block-diagonal factor of Cayley blocks.

OFT also takes ``cayley="peft_neumann"``, PEFT OFT's own Cayley–Neumann series
(:mod:`gsops.reference.peft_cayley`), which :func:`gsops.load_peft_adapter` sets
for PEFT OFT adapters trained with ``use_cayley_neumann=True``.
"""
from __future__ import annotations

from ..nn.rotations import BlockDiagRotation
from .orthogonal import OrthogonalMethod


class OFT(OrthogonalMethod):
    name = "oft"
    title = "OFT"
    params = ("block_size", "scale", "packed", "cayley", "neumann_terms")
    cayley_methods = ("exact", "neumann", "peft_neumann")

    def rotation(self, d, block_size, n_factors, **cayley_kw):
        return BlockDiagRotation(d, block_size, **cayley_kw)

    def factor_count(self, n_factors):
        return 1


SPEC = OFT()

"""BOFT (Liu et al., ICLR 2024): ``Q = F_0^T ... F_{m-1}^T``, ``m = n_factors`` butterfly factors.

Factor ``l`` couples half-blocks ``2^l`` apart (:func:`gsops.perm.butterfly_index`),
so ``m > 1`` needs an even ``block_size`` and ``block_size * 2**(m-1)`` dividing
the dimension ``Q`` acts on.
"""
from __future__ import annotations

from ..nn.layers import in_dim_name, layer_dims
from ..nn.rotations import ButterflyRotation
from .orthogonal import OrthogonalMethod


class BOFT(OrthogonalMethod):
    name = "boft"
    title = "BOFT"

    def rotation(self, d, block_size, n_factors, **cayley_kw):
        return ButterflyRotation(d, block_size, n_factors, **cayley_kw)

    def block_problem(self, base, block_size, n_factors):
        why = super().block_problem(base, block_size, n_factors)
        if why is not None or n_factors == 1:
            return why
        if block_size % 2:
            return f"block_size={block_size} must be even for boft with n_factors={n_factors} > 1"
        if base is not None:
            d_in = layer_dims(base)[0]
            span = block_size * 2 ** (n_factors - 1)
            if d_in % span:
                return (f"boft with n_factors={n_factors} needs block_size*2**(n_factors-1)={span} to divide "
                        f"{in_dim_name(base)}={d_in}")
        return None


SPEC = BOFT()

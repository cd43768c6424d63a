"""GSOFT (Gorbunov et al., 2024, Sec. 6): ``Q = P^T L P R``, two block-diagonal factors and a shuffle.

``L`` and ``R`` each hold ``r = d / block_size`` Cayley blocks; ``P = perm(r, d)``
(:class:`gsops.nn.rotations.GSRotation`). The method has exactly two factors.
"""
from __future__ import annotations

from ..nn.rotations import GSRotation
from .orthogonal import OrthogonalMethod


class GSOFT(OrthogonalMethod):
    name = "gsoft"
    title = "GSOFT"

    def rotation(self, d, block_size, n_factors, **cayley_kw):
        return GSRotation(d, block_size, **cayley_kw)

    def factor_count(self, n_factors):
        return 2

    def fixed_problem(self, base, n_factors, cayley):
        if n_factors != 2:
            return (f"n_factors={n_factors}: method={self.name!r} has exactly 2 factors (L and R); "
                    "use method='boft' for more factors")
        return super().fixed_problem(base, n_factors, cayley)


SPEC = GSOFT()

"""Double GSOFT (Gorbunov et al., 2024): ``y = Q_out (W (Q_in x)) + c`` with two independent GS rotations.

``Q_out`` is a GSOFT rotation of the output dimension, so ``block_size`` must
divide it too, and a grouped Conv2d (whose output channels of different groups
``Q_out`` would mix) is refused.
"""
from __future__ import annotations

from torch import nn

from ..nn.layers import layer_dims, out_dim_name
from ..nn.rotations import GSRotation
from .gsoft import GSOFT


class DoubleGSOFT(GSOFT):
    name = "double_gsoft"
    title = "Double GSOFT"

    def output_rotation(self, d_out, block_size, n_factors, **cayley_kw):
        return GSRotation(d_out, block_size, **cayley_kw)

    def fixed_problem(self, base, n_factors, cayley):
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            return (f"double_gsoft cannot wrap a Conv2d with groups={base.groups}: its output rotation mixes "
                    "output channels of different groups, which a grouped convolution cannot hold")
        return super().fixed_problem(base, n_factors, cayley)

    def block_problem(self, base, block_size, n_factors):
        why = super().block_problem(base, block_size, n_factors)
        if why is None and base is not None:
            d_out = layer_dims(base)[1]
            if d_out % block_size:
                return f"block_size={block_size} must divide {out_dim_name(base)}={d_out} (double_gsoft rotates outputs)"
        return why


SPEC = DoubleGSOFT()

"""Pure-torch grouped convolution exponential and SOC helpers (GS-SOC, Section 6 of Gorbunov et al.,
2024): the references of :mod:`gsops.ops.conv_exp` (definitions there).

``conv_exp`` is the naive series; ``conv_exp_forward`` / ``conv_exp_backward`` are the
same series as the torch backend runs it and its backward formula.
"""
from ..ops.conv_exp import (  # noqa: F401
    block_diag_skew_exp, conv_exp_1x1_reference as conv_exp_1x1, conv_exp_backward_reference as conv_exp_backward,
    conv_exp_forward_reference as conv_exp_forward, conv_exp_reference as conv_exp,
    conv_transpose_kernel_reference as conv_transpose_kernel, normalise_per_group, power_iterate,
    power_iteration_vectors, skew_kernel_reference as skew_kernel, space_to_depth, spectral_bound,
)

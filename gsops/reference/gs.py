"""Block-diagonal products and GS matrices (SPEC "GS matrices"): the references of
:mod:`gsops.ops.block_diag_mm`, :mod:`gsops.ops.gs_chain` and :mod:`gsops.ops.gs_apply`.

All functions act on the last dimension of ``x`` as on a column vector, with
any leading batch shape. Half-precision inputs are computed in float32 and
cast back (float32 accumulation).
"""
from ..ops.block_diag_mm import (  # noqa: F401
    block_diag_mm_backward_reference as block_diag_mm_backward, block_diag_mm_bmm,
    block_diag_mm_reference as block_diag_mm, block_grad_reference as block_grad,
)
from ..ops.gs_apply import (  # noqa: F401
    gs_apply_backward_reference as gs_apply_backward, gs_apply_reference as gs_apply, gs_dense_reference as gs_dense,
)
from ..ops.gs_chain import gs_chain_backward_reference as gs_chain_backward, gs_chain_reference as gs_chain  # noqa: F401

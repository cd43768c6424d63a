"""Cayley transforms of batched skew-symmetric blocks (SPEC "Orthogonal blocks"): the references of
:mod:`gsops.ops.cayley`.

``Q = (I + K)(I - K)^{-1} = 2M - I`` with ``M = (I - K)^{-1}``; backward
``dL/dK = 2 M^T G M^T`` for ``G = dL/dQ``.
"""
from ..ops.cayley import (  # noqa: F401
    cayley_exact_backward_reference as cayley_exact_backward, cayley_exact_reference as cayley_exact,
    cayley_neumann_backward_reference as cayley_neumann_backward, cayley_neumann_reference as cayley_neumann,
    lapack_single_thread, neumann_error_bound, skew_reference as skew, spectral_norm,
    unskew_reference as unskew,
)

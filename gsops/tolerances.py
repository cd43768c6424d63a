"""Per-dtype tolerances, the one place every test and check takes them from.

``TOL[dtype] = (rtol, atol)`` for comparing a result computed in ``dtype``
(with float32 accumulation) against a float64 or float32 reference.
"""
from __future__ import annotations

import torch

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}

# Bound on ||Q^T Q - I||_max for an orthogonal Q materialised in each dtype.
ORTHO_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def tol(dtype: torch.dtype) -> dict:
    """``dict(rtol=..., atol=...)`` for ``torch.testing.assert_close``."""
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}

# Bound on the drift of a base weight after 100 merge/unmerge cycles, as
# max|W_100 - W_0| / max|W_0| (a few units of the dtype's rounding: merging
# and unmerging are computed in float64 and rounded once each; the drift
# saturates instead of growing with the number of cycles).
MERGE_DRIFT_TOL = {
    torch.float64: 1e-13,
    torch.float32: 1e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

# Largest |K + K^T| accepted as rounding by gsops.cayley, relative to max(1, max|K|).
SKEW_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}

# Cayley-Neumann (OFTv2's truncated series, SPEC "Orthogonal blocks"): with ||K||_2 = n < 1 and t
# terms, ||Q_t - Q||_2 <= 2 n^(t+1) / (1 - n). gsops.cayley(method="neumann") warns once above
# NEUMANN_WARN_ERROR and refuses above NEUMANN_REFUSE_ERROR (Q visibly non-orthogonal: ||Q^T Q - I||
# can reach 2e + e^2); adapters switch to the exact Cayley above NEUMANN_WARN_ERROR. The norm is
# taken NEUMANN_NORM_MARGIN (relative) above the eigen-solver's value, so no decision hinges on the
# last bits of a LAPACK result.
NEUMANN_WARN_ERROR = 1e-3
NEUMANN_REFUSE_ERROR = 1e-2
NEUMANN_NORM_MARGIN = 1e-9

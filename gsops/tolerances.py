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

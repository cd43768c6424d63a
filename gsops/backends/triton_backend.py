"""The Triton backend: kernels from ``triton_kernels/`` registered with the dispatch.

Forward ops keep the dispatch contract of the reference (``x, ... -> y``).
Backward ops (names ``<op>_backward``, contract in :mod:`gsops.ops.custom`)
let the custom ops run the whole training step on this backend.  Runs on CUDA
tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
set before this module is first imported).
"""
from __future__ import annotations

import torch

from . import BackendUnavailable

try:
    import triton  # noqa: F401
except ImportError as e:
    raise BackendUnavailable(f"the triton package is not importable ({e})") from None

from triton_kernels import cayley as _cayley
from triton_kernels import gs_apply as _gs

from ..ops import dispatch

DESCRIPTION = f"Triton {triton.__version__} kernels (triton_kernels/)"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cayley_exact(K: torch.Tensor) -> torch.Tensor:
    """Q in K's dtype, computed in float32 (float64 for float64 K)."""
    return _cayley.cayley_exact(K.to(_acc(K.dtype))).to(K.dtype)


def cayley_exact_backward(grad: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return _cayley.cayley_exact_backward(grad.to(_acc(Q.dtype)), Q.to(_acc(Q.dtype))).to(Q.dtype)


dispatch.register("triton", "block_diag_mm", _gs.block_diag_mm)
dispatch.register("triton", "block_diag_mm_backward", _gs.block_diag_mm_backward)
dispatch.register("triton", "gs_chain", _gs.gs_chain)
dispatch.register("triton", "gs_chain_backward", _gs.gs_chain_backward)
dispatch.register("triton", "gs_apply", _gs.gs_apply)
dispatch.register("triton", "gs_apply_backward", _gs.gs_apply_backward)
dispatch.register("triton", "cayley_exact", cayley_exact)
dispatch.register("triton", "cayley_exact_backward", cayley_exact_backward)
dispatch.register("triton", "cayley_neumann", _cayley.cayley_neumann)
dispatch.register("triton", "cayley_neumann_backward", _cayley.cayley_neumann_backward)

# --- conv_exp (GS-SOC issue): registration of triton_kernels.conv_exp goes here ---
# (the GS-SOC engineer registers it lazily from gsops/ops/conv_exp.py)

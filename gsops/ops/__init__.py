"""The checked public GS operations. Each validates its arguments, then dispatches.

Conventions are those of SPEC.md: every op acts on the last dimension of ``x``
as on a column vector, with any leading batch shape.

The dispatched ops run as ``torch.library`` custom ops (:mod:`gsops.ops.custom`),
so they trace under ``torch.compile``; the backend is chosen here, before the
op runs, and the backward runs on the same backend.
"""
from __future__ import annotations

import warnings

import torch

from .. import reference as ref
from ..checks import (
    accumulate_dtype, check_blocks, check_divides, check_features, check_finite, check_int, check_same_device, check_tensor,
    has_values,
)
from ..reference.cayley import neumann_error_bound, spectral_norm
from ..tolerances import NEUMANN_NORM_MARGIN, NEUMANN_REFUSE_ERROR, NEUMANN_WARN_ERROR, SKEW_TOL
from . import custom, dispatch


def _backend(op: str, device: torch.device, *tensors: torch.Tensor) -> str:
    """The backend for ``op``; when a gradient will flow, it must also have ``op``'s backward."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return dispatch.choose(op, device, (op + "_backward",) if needs_grad else ())


def block_diag_mm(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``diag(B_1..B_r) x`` for ``B`` of shape (r, b, b), ``r*b == x.shape[-1]``."""
    check_tensor("x", x)
    check_blocks("B", B)
    check_same_device(x=x, B=B)
    check_features("x", x, B.shape[0] * B.shape[1], "r*b of B")
    return custom.block_diag_mm(x, B, _backend("block_diag_mm", x.device, x, B))


def _check_chain(x, blocks, names=None):
    check_tensor("x", x)
    if isinstance(blocks, torch.Tensor):
        raise TypeError("blocks must be a list of (r, b, b) tensors, got a single tensor")
    blocks = list(blocks)
    names = names or [f"blocks[{i}]" for i in range(len(blocks))]
    if not blocks:
        raise ValueError("blocks must contain at least one (r, b, b) factor")
    check_blocks(names[0], blocks[0])
    r, b = blocks[0].shape[0], blocks[0].shape[1]
    for name, B in zip(names[1:], blocks[1:]):
        check_blocks(name, B, r=r, b=b)
    check_same_device(x=x, **dict(zip(names, blocks)))
    check_features("x", x, r * b, "r*b of the blocks")
    return blocks


def gs_chain(x: torch.Tensor, blocks) -> torch.Tensor:
    """``B_m P ... B_2 P B_1 x`` for a list of (r, b, b) factors, ``P = perm(r, r*b)``."""
    blocks = _check_chain(x, blocks)
    return custom.gs_chain(x, blocks, _backend("gs_chain", x.device, x, *blocks))


def gs_apply(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """GSOFT's ``Q x`` with ``Q = P^T L P R``, ``P = perm(r, d)``, L and R of shape (r, b, b)."""
    _check_chain(x, [R, L], ["R", "L"])
    return custom.gs_apply(x, L, R, _backend("gs_apply", x.device, x, L, R))


def gs_dense(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The dense ``d x d`` matrix ``Q = P^T L P R``."""
    check_blocks("R", R)
    check_blocks("L", L, r=R.shape[0], b=R.shape[1])
    check_same_device(L=L, R=R)
    return ref.gs_dense(L, R)


def skew(params: torch.Tensor, b: int) -> torch.Tensor:
    """Packed ``b(b-1)/2`` numbers (upper triangle, row major) -> skew ``K`` of shape (..., b, b)."""
    check_tensor("params", params)
    b = check_int("b", b)
    need = b * (b - 1) // 2
    if params.shape[-1] != need:
        raise ValueError(f"params.shape[-1]={params.shape[-1]} must equal b*(b-1)/2={need} for b={b}")
    return ref.skew(params, b)


def _check_square(name, K):
    check_tensor(name, K, min_dim=2)
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"{name} must have square trailing dimensions (..., b, b), got {tuple(K.shape)}")


def unskew(K: torch.Tensor) -> torch.Tensor:
    """The packed strict upper triangle of skew ``K`` (..., b, b); inverse of :func:`skew`."""
    _check_square("K", K)
    return ref.unskew(K)


_neumann_warned = [False]


def cayley(K: torch.Tensor, method: str = "exact", terms: int = 5) -> torch.Tensor:
    """Batched Cayley transform ``(I + K)(I - K)^{-1}`` of skew ``K`` (..., b, b).

    ``method="exact"`` inverts ``I - K`` (always valid for skew K) with the
    SPEC's exact backward. ``method="neumann"`` is OFTv2's truncated series
    ``M ~ I + K + ... + K^terms``. With ``n = max ||K||_2`` (taken a relative
    ``NEUMANN_NORM_MARGIN`` above the eigen-solver's value) it raises when
    ``n >= 1`` (the series diverges) or when the error bound
    ``2 n^(terms+1) / (1 - n)`` exceeds ``NEUMANN_REFUSE_ERROR`` (1e-2: Q would be
    visibly non-orthogonal), and warns once when the bound exceeds
    ``NEUMANN_WARN_ERROR`` (1e-3).
    """
    _check_square("K", K)
    check_finite("K", K)
    if method not in ("exact", "neumann"):
        raise ValueError(f"method={method!r} must be 'exact' or 'neumann'")
    # A value check: skipped for meta tensors and while torch.compile traces (there are no values,
    # and reading one would break the graph); eager calls always check.
    if K.numel() and has_values(K):
        Kd = K.detach()
        asym = float((Kd + Kd.transpose(-1, -2)).abs().amax())
        if asym > SKEW_TOL[K.dtype] * max(1.0, float(Kd.abs().amax())):
            raise ValueError(f"K must be skew-symmetric (K = -K^T); max |K + K^T| = {asym:.3g}")
    if method == "exact":
        # the op works in float32 (float64 for float64 K) and saves Q = 2M - I for its backward
        acc = accumulate_dtype(K.dtype)
        return custom.cayley_exact(K.to(acc), _backend("cayley_exact", K.device, K)).to(K.dtype)
    terms = check_int("terms", terms, minimum=1)
    if K.numel() and has_values(K):
        norm = float(spectral_norm(K).max()) * (1 + NEUMANN_NORM_MARGIN)
        if not norm < 1:
            raise ValueError(
                f"method='neumann' needs ||K||_2 < 1 for every block, got max ||K||_2 = {norm:.4g}: "
                "the series diverges and Q would not be orthogonal; use method='exact'"
            )
        err = float(neumann_error_bound(torch.tensor(norm, dtype=torch.float64), terms))
        if err > NEUMANN_REFUSE_ERROR:
            raise ValueError(
                f"method='neumann' with terms={terms}: max ||K||_2 = {norm:.4g} gives an orthogonality error "
                f"bound {err:.3g} > NEUMANN_REFUSE_ERROR = {NEUMANN_REFUSE_ERROR} (needs a smaller ||K||_2 < 1); "
                "use method='exact' or more terms"
            )
        if err > NEUMANN_WARN_ERROR and not _neumann_warned[0]:
            _neumann_warned[0] = True
            warnings.warn(
                f"cayley(method='neumann', terms={terms}): max ||K||_2 = {norm:.3g} gives an orthogonality "
                f"error up to {err:.3g}; use more terms or method='exact'"
            )
    return custom.cayley_neumann(K, terms, _backend("cayley_neumann", K.device, K))


def gs_project(W: torch.Tensor, block_size: int):
    """Algorithm 1 of the GS paper for ``Q = P^T L P R``: the Frobenius-closest ``(L, R)`` to ``W``."""
    check_tensor("W", W, dim=2)
    if W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be square (d, d), got {tuple(W.shape)}")
    block_size = check_int("block_size", block_size)
    check_divides("block_size", block_size, "W.shape[0]", W.shape[0])
    check_finite("W", W)
    return ref.gs_project(W, block_size)


# ----------------------------------------------------------------------------- unchecked internal ops
# For callers that build their inputs correctly by construction (the adapter layers: skew K from
# packed parameters, blocks from the Cayley transform, x already checked by the layer). They run no
# value check and never read a tensor's value on the host, so a training step has no device sync.
# The backend is chosen as for the public ops; in eager mode the reference backend runs through
# plain autograd Functions with the same formulas as its custom ops (the torch.library layer costs
# more than the op itself on small layers), and through the custom ops under torch.compile.

def _eager_reference(backend: str) -> bool:
    return backend == "torch" and not torch.compiler.is_compiling()


class _TorchGSApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, L, R):
        ctx.save_for_backward(x, L, R)
        return ref.gs_apply(x, L, R)

    @staticmethod
    def backward(ctx, grad):
        x, L, R = ctx.saved_tensors
        dx, dL, dR = custom.gs_apply_backward_torch(grad, x, L, R)
        return dx.to(x.dtype), dL.to(L.dtype), dR.to(R.dtype)


def block_diag_mm_unchecked(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """:func:`block_diag_mm` without argument or value checks (inputs valid by construction)."""
    backend = _backend("block_diag_mm", x.device, x, B)
    if _eager_reference(backend):
        return ref.gs.block_diag_mm_bmm(x, B)  # autograd of one bmm: saves x and B, as the custom op does
    return custom.block_diag_mm(x, B, backend)


def gs_apply_unchecked(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """:func:`gs_apply` without argument or value checks (inputs valid by construction)."""
    backend = _backend("gs_apply", x.device, x, L, R)
    if _eager_reference(backend):
        return _TorchGSApply.apply(x, L, R)
    return custom.gs_apply(x, L, R, backend)


def cayley_unchecked(K: torch.Tensor, method: str = "exact", terms: int = 5) -> torch.Tensor:
    """:func:`cayley` for a K that is skew by construction: no checks, no refusal, no host sync.

    ``method="neumann"`` returns the series whatever ``||K||_2``: the caller owns the policy
    (the adapters measure ``||Q^T Q - I||`` on the device, see :mod:`gsops.nn.adapters`).
    """
    if method == "exact":
        acc = accumulate_dtype(K.dtype)
        Kc = K.to(acc)
        backend = _backend("cayley_exact", K.device, Kc)
        Q = ref.cayley_exact(Kc) if _eager_reference(backend) else custom.cayley_exact(Kc, backend)
        return Q.to(K.dtype)
    backend = _backend("cayley_neumann", K.device, K)
    if _eager_reference(backend):
        return ref.cayley_neumann(K, terms)
    return custom.cayley_neumann(K, terms, backend)

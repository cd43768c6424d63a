"""Orthogonal blocks from skew ones (SPEC "Orthogonal blocks"): ``skew``/``unskew`` and the Cayley
transform, exact or by OFTv2's truncated Neumann series.

``Q = (I + K)(I - K)^{-1} = 2M - I`` with ``M = (I - K)^{-1}``; backward
``dL/dK = 2 M^T G M^T`` for ``G = dL/dQ``. The series is ``Q_t = 2 M_t - I``
with ``M_t = I + K + ... + K^t``.

Reading order: the references (definitions and backward formulas), the custom
ops ``gsops::cayley_exact`` / ``gsops::cayley_neumann`` and their ``_backward``
ops, then the checked public functions and the unchecked one the layers call.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..checks import accumulate_dtype, check_finite, check_int, check_tensor, has_values
from ..tolerances import NEUMANN_NORM_MARGIN, NEUMANN_REFUSE_ERROR, NEUMANN_WARN_ERROR, SKEW_TOL
from . import dispatch, library

# ----------------------------------------------------------------------------- reference


def _triu_index(b: int, device=None):
    return torch.triu_indices(b, b, offset=1, device=device)


def skew_reference(params: Tensor, b: int) -> Tensor:
    """Packed ``b(b-1)/2`` numbers (strict upper triangle, row major) -> skew ``K`` of shape (..., b, b)."""
    iu = _triu_index(b, params.device)
    K = params.new_zeros(*params.shape[:-1], b, b)
    K[..., iu[0], iu[1]] = params
    return K - K.transpose(-1, -2)


def unskew_reference(K: Tensor) -> Tensor:
    """The packed strict upper triangle (row major) of ``K``; inverse of :func:`skew_reference`."""
    b = K.shape[-1]
    iu = _triu_index(b, K.device)
    return K[..., iu[0], iu[1]]


@contextlib.contextmanager
def lapack_single_thread(device: torch.device):
    """Run the enclosed CPU LAPACK call on one thread.

    Batched small-matrix factorisations gain nothing from a second thread, and their parallel
    region stalls whenever a thread is descheduled: 64 inverses of 32x32 took ~1 ms quiet but
    85-420 ms at the 95th percentile beside one busy process with 2 threads, ~13 ms with one
    (``python -m perf.cayley_load``). The thread count is restored on exit.
    """
    n = torch.get_num_threads() if device.type == "cpu" else 1
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cayley_m(K: Tensor) -> tuple[Tensor, Tensor]:
    """``M = (I - K)^{-1}`` in float32 (float64 for float64 K), and the identity it used."""
    acc = accumulate_dtype(K.dtype)
    eye = torch.eye(K.shape[-1], dtype=acc, device=K.device)
    # I - K has singular values >= 1 (its symmetric part is I), so the explicit inverse is as
    # accurate as a solve; batched inv is also far faster than batched solve on a busy CPU
    # (measured: 38 ms vs 837 ms for 64 blocks of 32x32 with 2 threads under load), and it runs
    # on one thread (see lapack_single_thread).
    with lapack_single_thread(K.device):
        M = torch.linalg.inv_ex(eye - K.to(acc)).inverse  # no error check: I - K is never singular, and
        # the check would read the info flags on the host (a device sync on CUDA)
    return M, eye


def cayley_exact_reference(K: Tensor) -> Tensor:
    """``(I + K)(I - K)^{-1} = 2M - I`` for a batch of skew ``K`` (..., b, b), computed in float32
    (float64 for float64 K) and returned in K's dtype; differentiable by torch autograd."""
    M, eye = _cayley_m(K)
    return (2 * M - eye).to(K.dtype)


class _CayleyExactEager(torch.autograd.Function):
    """The reference with the formula of :func:`cayley_exact_backward_reference`, reading the M it
    kept (eager unchecked calls: fewer small ops than rebuilding M from Q)."""

    @staticmethod
    def forward(ctx, K):
        M, eye = _cayley_m(K)
        ctx.save_for_backward(M)
        ctx.in_dtype = K.dtype
        return (2 * M - eye).to(K.dtype)

    @staticmethod
    def backward(ctx, G):
        (M,) = ctx.saved_tensors
        Mt = M.transpose(-1, -2)
        return (2 * Mt @ G.to(M.dtype) @ Mt).to(ctx.in_dtype)


def skew_gathered(p: Tensor, b: int, index: Tensor, sign: Tensor) -> Tensor:
    """:func:`skew` of packed ``p`` (..., b(b-1)/2) from a gather layout (``K_flat = p[..., index] * sign``):
    two ops; ``gsops.nn.cayley_param`` builds the layout once per block size."""
    if b == 1:
        return p.new_zeros(*p.shape[:-1], 1, 1) + p.sum(-1, keepdim=True)[..., None]  # keeps the graph
    # a 2-D gather along dim 1 is ~10x cheaper on CPU than index_select on the last dim of a 3-D tensor
    flat = p.reshape(-1, p.shape[-1]).index_select(1, index)
    return (flat * sign.to(p.dtype)).reshape(*p.shape[:-1], b, b)


@functools.lru_cache(maxsize=64)
def _eye_pair(b: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the first call ran in
        eye = torch.eye(b, dtype=dtype, device=device)
        return eye, -eye


@functools.lru_cache(maxsize=64)
def _triu_flat(b: int, device: str) -> Tensor:
    """Flat indices ``i*b + j`` of the strict upper triangle, row major (the packed layout)."""
    with torch.inference_mode(False):
        iu = torch.triu_indices(b, b, offset=1, device="cpu")
        return (iu[0] * b + iu[1]).to(device)


def _horner(K: Tensor, eye: Tensor, terms: int) -> list:
    """``[M_1, ..., M_t]`` of Horner's rule for the Neumann series: ``M_1 = I + K``, ``M_k = I + K M_(k-1)``
    (``M_t = I + K + ... + K^t``); K (n, b, b)."""
    Ms = [K + eye]
    for _ in range(terms - 1):
        Ms.append(torch.baddbmm(eye, K, Ms[-1]))
    return Ms


def _packed_backward_with_graph(ctx, G, transform):
    """``dp`` by autograd through ``transform`` of the packed ``p`` the node saved (double backward)."""
    p, index, sign = ctx.saved_tensors[:3]
    b = ctx.b
    with torch.enable_grad():
        (dp,) = torch.autograd.grad(transform(skew_gathered(p, b, index, sign)), p, G, create_graph=True)
    return (dp, *([None] * (len(ctx.needs_input_grad) - 1)))


def packed_blocks(p: Tensor, index: Tensor, sign: Tensor, b: int, terms: int | None = None, measure: bool = True):
    """``(Q, kept, err)`` for packed skew parameters ``p`` (..., b(b-1)/2) in the gather layout of
    :func:`skew_gathered`: ``Q`` (n, b, b) the exact Cayley blocks (``terms`` None: ``M = (I - K)^{-1}``,
    ``Q = 2M - I``, ``kept = (M,)``) or OFTv2's Cayley-Neumann blocks with ``terms`` terms (Horner's
    ``M_1 = I + K``, ``M_k = I + K M_(k-1)``, ``Q = 2 M_t - I``, ``kept = (K, M_1..M_(t-1))``, ``err`` the
    0-d ``max |Q^T Q - I|`` when ``measure``, else None). No autograd: :func:`packed_blocks_grad` is the
    backward."""
    K = skew_gathered(p, b, index, sign).view(-1, b, b)
    eye, neg_eye = _eye_pair(b, p.dtype, str(p.device))
    if terms is None:
        with lapack_single_thread(p.device):
            M = torch.linalg.inv_ex(torch.sub(eye, K)).inverse  # I - K is never singular (SPEC)
        return torch.add(neg_eye, M, alpha=2), (M,), None
    Ms = _horner(K, eye, terms)
    Q = torch.add(neg_eye, Ms[-1], alpha=2)
    err = torch.baddbmm(eye, Q.transpose(-1, -2), Q, beta=-1).abs().amax() if measure else None
    return Q, (K, *Ms[:-1]), err


def packed_blocks_grad(kept, dQ: Tensor, b: int, series: bool) -> Tensor:
    """``dp`` (n, b(b-1)/2) of :func:`packed_blocks` for ``dQ`` (n, b, b), from its ``kept`` tensors (``series``:
    they are the Cayley-Neumann ones). Exact:
    ``dK = 2 M^T G M^T``; Cayley-Neumann: ``G_t = 2 dQ``, ``G_(k-1) = K^T G_k``,
    ``dK = G_1 + sum_(k>=2) G_k M_(k-1)^T``; then ``dp = (dK - dK^T)`` on the packed triangle."""
    if not series:
        (M,) = kept
        Mt = M.transpose(-1, -2)
        T = torch.bmm(Mt, dQ.reshape(-1, b, b).to(M.dtype))
        dK = torch.baddbmm(T, T, Mt, beta=0, alpha=2)  # 2 M^T G M^T (beta=0: T itself is not added)
    else:
        K, *Ms = kept
        G = 2 * dQ.reshape(-1, b, b).to(K.dtype)
        dK = torch.zeros_like(K)
        Kt = K.transpose(-1, -2)
        for M_prev in reversed(Ms):          # M_(k-1) for k = t .. 2
            dK = torch.baddbmm(dK, G, M_prev.transpose(-1, -2))
            G = torch.bmm(Kt, G)
        dK = dK + G                          # k = 1: M_1 = I + K
    dA = torch.sub(dK, dK.transpose(-1, -2)).view(-1, b * b)
    return dA.index_select(1, _triu_flat(b, str(dK.device)))


class _CayleyPackedEager(torch.autograd.Function):
    """Packed skew parameters -> exact Cayley blocks in one node (eager, float32/float64): the skew
    layout, ``M = (I - K)^{-1}`` and ``Q = 2M - I``; backward ``dK = 2 M^T G M^T`` and
    ``dp = (dK - dK^T)`` on the packed triangle (:func:`packed_blocks`). Fewer small ops and autograd
    nodes than the separate skew gather and Cayley transform (what a small layer's step is made of)."""

    @staticmethod
    def forward(ctx, p, index, sign, b):
        Q, kept, _ = packed_blocks(p, index, sign, b)
        ctx.save_for_backward(p, index, sign, *kept)
        ctx.shape, ctx.b = p.shape, b
        return Q.view(*p.shape[:-1], b, b)

    @staticmethod
    def backward(ctx, G):
        if torch.is_grad_enabled():  # create_graph: differentiate through the reference instead
            return _packed_backward_with_graph(ctx, G, lambda K: cayley_exact_reference(K))
        return packed_blocks_grad(ctx.saved_tensors[3:], G, ctx.b, False).view(ctx.shape), None, None, None


class _NeumannPackedEager(torch.autograd.Function):
    """Packed skew parameters -> OFTv2's Cayley-Neumann blocks in one node (eager, float32/float64),
    by :func:`packed_blocks` and :func:`packed_blocks_grad`."""

    @staticmethod
    def forward(ctx, p, index, sign, b, terms):
        Q, kept, _ = packed_blocks(p, index, sign, b, terms, measure=False)  # the caller measures the series
        ctx.save_for_backward(p, index, sign, *kept)
        ctx.shape, ctx.b, ctx.terms = p.shape, b, terms
        return Q.view(*p.shape[:-1], b, b)

    @staticmethod
    def backward(ctx, dQ):
        if torch.is_grad_enabled():  # create_graph: differentiate through the reference instead
            return _packed_backward_with_graph(ctx, dQ, lambda K: cayley_neumann_reference(K, ctx.terms))
        return packed_blocks_grad(ctx.saved_tensors[3:], dQ, ctx.b, True).view(ctx.shape), None, None, None, None



def neumann_packed_unchecked(p: Tensor, index: Tensor, sign: Tensor, b: int, terms: int) -> Tensor:
    """Cayley-Neumann blocks ``(..., b, b)`` with ``terms`` terms of packed skew parameters ``p``, as
    :func:`cayley_packed_unchecked` (same gather, same conditions, :func:`cayley_packed_fits`); no checks
    and no policy (the caller measures the series' orthogonality)."""
    if terms < 1:
        raise ValueError(f"terms={terms} must be >= 1")
    return _NeumannPackedEager.apply(p, index, sign, b, terms)


def cayley_packed_unchecked(p: Tensor, index: Tensor, sign: Tensor, b: int) -> Tensor:
    """Exact Cayley blocks ``(..., b, b)`` of packed skew parameters ``p`` (..., b(b-1)/2), given the
    gather ``index``/``sign`` of the packed layout (``K_flat = p[..., index] * sign``; the backward
    assumes that layout: strict upper triangle, row major, +1 above the diagonal), on the torch
    path in eager mode with float32/float64 ``p`` (:func:`cayley_packed_fits`); no checks."""
    return _CayleyPackedEager.apply(p, index, sign, b)


def cayley_packed_fits(p: Tensor) -> bool:
    """Whether :func:`cayley_packed_unchecked` takes ``p`` in this call."""
    if p.dtype not in (torch.float32, torch.float64) or not p.numel() or torch.compiler.is_compiling() \
            or p.device.type == "meta" or is_fake(p):
        return False
    backend = dispatch.requested()  # the backend cayley_exact gets: torch when forced, and off CUDA under auto
    return backend == "torch" or (backend == "auto" and p.device.type != "cuda")


def cayley_exact_backward_reference(grad: Tensor, Q: Tensor) -> Tensor:
    """``dK = 2 M^T G M^T`` with ``M = (Q + I) / 2`` (the saved Q gives M)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    Mt = ((Q + eye) / 2).transpose(-1, -2)
    return 2 * Mt @ grad.to(Q.dtype) @ Mt


def cayley_neumann_reference(K: Tensor, terms: int) -> Tensor:
    """OFTv2's Cayley–Neumann: ``Q = 2 M_t - I`` with ``M_t = I + K + ... + K^terms``.

    Valid only while ``||K||_2 < 1``; see :func:`neumann_error_bound`.
    """
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    M = eye.expand_as(K).clone()
    power = eye.expand_as(K)
    for _ in range(terms):
        power = power @ K
        M = M + power
    return 2 * M - eye


def _cayley_neumann_eager(K: Tensor, terms: int) -> Tensor:
    """:func:`cayley_neumann_reference` by Horner's rule, ``M_t = I + K (I + K (... (I + K)))``: one
    batched product per term (fewer small ops under plain autograd, eager unchecked calls)."""
    if K.dim() < 3 or not K.numel() or terms < 1:
        return cayley_neumann_reference(K, terms)
    b = K.shape[-1]
    eye, neg_eye = _eye_pair(b, K.dtype, str(K.device))
    return torch.add(neg_eye, _horner(K.reshape(-1, b, b), eye, terms)[-1], alpha=2).view(K.shape)


def cayley_neumann_backward_reference(grad: Tensor, K: Tensor, terms: int) -> Tensor:
    """``dK = 2 sum_{j=1..t} sum_{a<j} (K^T)^a G (K^T)^(j-1-a)`` for ``Q = 2 sum_j K^j - I``."""
    Kt = K.transpose(-1, -2)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device).expand_as(K)
    powers = [eye]
    for _ in range(terms - 1):
        powers.append(powers[-1] @ Kt)
    G = grad.to(K.dtype)
    dK = torch.zeros_like(K)
    for j in range(1, terms + 1):
        for a in range(j):
            dK = dK + powers[a] @ G @ powers[j - 1 - a]
    return 2 * dK


def spectral_norm(K: Tensor) -> Tensor:
    """``||K||_2`` per block, for skew K: ``sqrt(lambda_max(K^T K))``."""
    Kd = K.detach().to(torch.float64)
    gram = Kd.transpose(-1, -2) @ Kd
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()


def neumann_error_bound(norm: Tensor, terms: int) -> Tensor:
    """Bound on ``||Q_neumann - Q_exact||_2`` for ``||K||_2 = norm < 1``.

    ``Q_exact - Q_t = 2 sum_{j>terms} K^j``, so the error is at most
    ``2 norm^(terms+1) / (1 - norm)``.
    """
    return 2 * norm ** (terms + 1) / (1 - norm)


# ----------------------------------------------------------------------------- custom ops

# K float32 or float64 (the public op casts); the backward reads M from the saved output Q = 2M - I.
# Q = 2(I - K)^{-1} - I; the backward reads Q (M = (Q + I) / 2) and returns dK. Eager unchecked calls
# keep M itself (_CayleyExactEager).
EXACT = library.define(library.OpSpec("cayley_exact", "Tensor K", "Tensor", "Tensor",
                                      cayley_exact_reference, cayley_exact_backward_reference,
                                      saved="Tensor Q", save=lambda args, Q: (Q,), eager=_CayleyExactEager.apply))

# Q = 2(I + K + ... + K^terms) - I; the backward reads K and returns dK. Eager unchecked calls take
# torch's autograd of the series (linear in terms; the closed formula is quadratic).
NEUMANN = library.define(library.OpSpec("cayley_neumann", "Tensor K, int terms", "Tensor", "Tensor",
                                        cayley_neumann_reference, cayley_neumann_backward_reference,
                                        eager=_cayley_neumann_eager))

# ----------------------------------------------------------------------------- dispatch


def skew(params: Tensor, b: int) -> Tensor:
    """Packed ``b(b-1)/2`` numbers (upper triangle, row major) -> skew ``K`` of shape (..., b, b)."""
    check_tensor("params", params)
    b = check_int("b", b)
    need = b * (b - 1) // 2
    if params.shape[-1] != need:
        raise ValueError(f"params.shape[-1]={params.shape[-1]} must equal b*(b-1)/2={need} for b={b}")
    return skew_reference(params, b)


def _check_square(name, K):
    check_tensor(name, K, min_dim=2)
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"{name} must have square trailing dimensions (..., b, b), got {tuple(K.shape)}")


def unskew(K: Tensor) -> Tensor:
    """The packed strict upper triangle of skew ``K`` (..., b, b); inverse of :func:`skew`."""
    _check_square("K", K)
    return unskew_reference(K)


_neumann_warned = [False]


def cayley(K: Tensor, method: str = "exact", terms: int = 5) -> Tensor:
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
        return library.call(EXACT, dispatch.for_call("cayley_exact", K), K.to(acc)).to(K.dtype)
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
    return library.call(NEUMANN, dispatch.for_call("cayley_neumann", K), K, terms)


def cayley_unchecked(K: Tensor, method: str = "exact", terms: int = 5) -> Tensor:
    """:func:`cayley` for a K that is skew by construction: no checks, no refusal, no host sync.

    ``method="neumann"`` returns the series whatever ``||K||_2``: the caller owns the policy
    (the adapters measure ``||Q^T Q - I||`` on the device, see :mod:`gsops.nn.adapters`).
    """
    if method == "exact":
        Kc = K.to(accumulate_dtype(K.dtype))
        return library.call_unchecked(EXACT, dispatch.for_call("cayley_exact", Kc), Kc).to(K.dtype)
    return library.call_unchecked(NEUMANN, dispatch.for_call("cayley_neumann", K), K, terms)

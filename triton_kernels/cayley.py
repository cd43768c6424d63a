"""Batched Cayley transform of small skew blocks (SPEC "Orthogonal blocks").

``Q = (I + K)(I - K)^{-1} = 2M - I`` with ``M = (I - K)^{-1}``; the backward is
``dL/dK = 2 M^T G M^T`` for ``G = dL/dQ``.

* Exact: one program per block holds ``A = I - K`` (padded to ``BB =
  next_pow2(b)`` with the identity) in registers and inverts it in place by
  Gauss-Jordan elimination *without pivoting*.  That is stable here: the
  symmetric part of ``I - K`` is ``I`` (K skew), so every pivot is >= 1 and no
  growth occurs (SPEC).  The forward stores ``Q``; since ``M = (Q + I) / 2``
  exactly, the backward reads ``M^T`` straight from the saved ``Q`` (no second
  inversion) and forms ``2 M^T G M^T`` with two ``tl.dot``.
* Neumann (OFTv2): ``M_t = I + K + ... + K^t`` in Horner form
  ``S_{j+1} = I + K S_j``; its backward runs Horner in reverse,
  ``dK += G_{j+1} S_j^T`` and ``G_j = K^T G_{j+1}``, recomputing ``S_j``.

``tl.dot`` tiles are padded to at least 16 (zeros outside the block).  All
arithmetic is float32 (float64 for float64 inputs) with IEEE dots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cayley_exact_kernel(k_ptr, q_ptr, b: tl.constexpr, BB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BB)[:, None]
    cols = tl.arange(0, BB)[None, :]
    inb = (rows < b) & (cols < b)
    off = pid * b * b + rows * b + cols
    K = tl.load(k_ptr + off, mask=inb, other=0.0)
    eye = rows == cols
    A = tl.where(eye, 1.0, 0.0).to(K.dtype) - K  # I - K, identity in the padding
    # In-place Gauss-Jordan inversion, pivots on the diagonal.
    for k in range(0, b):
        row_k = tl.sum(tl.where(rows == k, A, 0.0), axis=0)  # A[k, :]
        col_k = tl.sum(tl.where(cols == k, A, 0.0), axis=1)  # A[:, k]
        pivot = tl.sum(tl.where(tl.arange(0, BB) == k, row_k, 0.0), axis=0)
        row_k = tl.where(tl.arange(0, BB) == k, 1.0, row_k) / pivot
        col_k = tl.where(tl.arange(0, BB) == k, 0.0, col_k)
        A = tl.where(cols == k, 0.0, A)
        A = A - col_k[:, None] * row_k[None, :]
        A = tl.where(rows == k, row_k[None, :], A)
    Q = 2.0 * A - tl.where(eye, 1.0, 0.0).to(A.dtype)
    tl.store(q_ptr + off, Q.to(q_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _cayley_exact_backward_kernel(g_ptr, q_ptr, dk_ptr, b: tl.constexpr, BB: tl.constexpr):
    """dK = 2 M^T G M^T with M^T = (Q^T + I) / 2 read from the saved forward output."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BB)[:, None]
    cols = tl.arange(0, BB)[None, :]
    inb = (rows < b) & (cols < b)
    base = pid * b * b
    G = tl.load(g_ptr + base + rows * b + cols, mask=inb, other=0.0)
    Qt = tl.load(q_ptr + base + cols * b + rows, mask=inb, other=0.0)
    Mt = tl.where(inb, 0.5 * (Qt + tl.where(rows == cols, 1.0, 0.0).to(Qt.dtype)), 0.0).to(Qt.dtype)
    T = tl.dot(Mt, G.to(Mt.dtype), input_precision="ieee", out_dtype=Mt.dtype)
    dK = 2.0 * tl.dot(T, Mt, input_precision="ieee", out_dtype=Mt.dtype)
    tl.store(dk_ptr + base + rows * b + cols, dK.to(dk_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _horner(K, EYE, STEPS: tl.constexpr):
    """S_STEPS with S_0 = I, S_{j+1} = I + K S_j."""
    S = EYE
    for _ in tl.static_range(STEPS):
        S = EYE + tl.dot(K, S, input_precision="ieee", out_dtype=K.dtype)
    return S


@triton.jit
def _cayley_neumann_kernel(k_ptr, q_ptr, b: tl.constexpr, BB: tl.constexpr, TERMS: tl.constexpr,
                           ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BB)[:, None]
    cols = tl.arange(0, BB)[None, :]
    inb = (rows < b) & (cols < b)
    off = pid * b * b + rows * b + cols
    K = tl.load(k_ptr + off, mask=inb, other=0.0).to(ACC)
    EYE = tl.where(rows == cols, 1.0, 0.0).to(ACC)
    S = _horner(K, EYE, TERMS)
    tl.store(q_ptr + off, (2.0 * S - EYE).to(q_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _cayley_neumann_backward_kernel(g_ptr, k_ptr, dk_ptr, b: tl.constexpr, BB: tl.constexpr,
                                    TERMS: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BB)[:, None]
    cols = tl.arange(0, BB)[None, :]
    inb = (rows < b) & (cols < b)
    base = pid * b * b
    K = tl.load(k_ptr + base + rows * b + cols, mask=inb, other=0.0).to(ACC)
    Kt = tl.load(k_ptr + base + cols * b + rows, mask=inb, other=0.0).to(ACC)
    Gs = 2.0 * tl.load(g_ptr + base + rows * b + cols, mask=inb, other=0.0).to(ACC)  # dL/dM = 2 dL/dQ
    EYE = tl.where(rows == cols, 1.0, 0.0).to(ACC)
    dK = tl.zeros((BB, BB), dtype=ACC)
    for jj in tl.static_range(TERMS):
        # S_j for j = TERMS-1-jj, recomputed by Horner (TERMS is small; constant loop bounds)
        S = EYE
        for i in tl.static_range(TERMS):
            if i + jj < TERMS - 1:
                S = EYE + tl.dot(K, S, input_precision="ieee", out_dtype=ACC)
        dK += tl.dot(Gs, tl.trans(S), input_precision="ieee", out_dtype=ACC)
        Gs = tl.dot(Kt, Gs, input_precision="ieee", out_dtype=ACC)
    tl.store(dk_ptr + base + rows * b + cols, dK.to(dk_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- launchers

def _flat(K: torch.Tensor) -> torch.Tensor:
    return K.reshape(-1, K.shape[-2], K.shape[-1]).contiguous()


def _pad(b: int, dot: bool) -> int:
    bb = triton.next_power_of_2(b)
    return max(bb, 16) if dot else max(bb, 2)


def _warps(bb: int) -> int:
    """Few warps for small blocks: a 32 x 32 tile in one warp makes the b row/column
    extractions of Gauss-Jordan intra-warp shuffles instead of shared-memory round trips."""
    return 1 if bb <= 32 else 8  # fewer warps at b=64 make the backward spill (sm_90 ptxas)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def cayley_exact(K: torch.Tensor) -> torch.Tensor:
    """``Q = 2 (I - K)^{-1} - I`` for skew ``K`` (..., b, b) in float32 or float64; same dtype out."""
    b = K.shape[-1]
    Kf = _flat(K)
    Q = torch.empty_like(Kf)
    if Kf.shape[0]:
        bb = _pad(b, dot=False)
        _cayley_exact_kernel[(Kf.shape[0],)](Kf, Q, b=b, BB=bb, num_warps=_warps(bb))
    return Q.reshape(K.shape)


def cayley_exact_backward(grad: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``dK = 2 M^T G M^T`` with ``M = (Q + I) / 2`` from the forward's output."""
    b = Q.shape[-1]
    Qf = _flat(Q)
    Gf = _flat(grad.to(Q.dtype))
    dK = torch.empty_like(Qf)
    if Qf.shape[0]:
        bb = _pad(b, dot=True)
        _cayley_exact_backward_kernel[(Qf.shape[0],)](Gf, Qf, dK, b=b, BB=bb, num_warps=_warps(bb))
    return dK.reshape(Q.shape)


def cayley_neumann(K: torch.Tensor, terms: int) -> torch.Tensor:
    """OFTv2's ``Q = 2 (I + K + ... + K^terms) - I``, float32 accumulation, K's dtype out."""
    b = K.shape[-1]
    Kf = _flat(K)
    Q = torch.empty_like(Kf)
    if Kf.shape[0]:
        bb = _pad(b, dot=True)
        _cayley_neumann_kernel[(Kf.shape[0],)](Kf, Q, b=b, BB=bb, TERMS=int(terms), ACC=_acc(K.dtype),
                                               num_warps=_warps(bb))
    return Q.reshape(K.shape)


def cayley_neumann_backward(grad: torch.Tensor, K: torch.Tensor, terms: int) -> torch.Tensor:
    b = K.shape[-1]
    Kf = _flat(K)
    Gf = _flat(grad)
    dK = torch.empty_like(Kf)
    if Kf.shape[0]:
        bb = _pad(b, dot=True)
        _cayley_neumann_backward_kernel[(Kf.shape[0],)](Gf, Kf, dK, b=b, BB=bb, TERMS=int(terms),
                                                        ACC=_acc(K.dtype), num_warps=_warps(bb))
    return dK.reshape(K.shape)

"""Cayley transforms of batched skew-symmetric blocks (SPEC "Orthogonal blocks").

``Q = (I + K)(I - K)^{-1} = 2M - I`` with ``M = (I - K)^{-1}``; backward
``dL/dK = 2 M^T G M^T`` for ``G = dL/dQ``.
"""
from __future__ import annotations

import contextlib

import torch

from ..checks import accumulate_dtype


def _triu_index(b: int, device=None):
    return torch.triu_indices(b, b, offset=1, device=device)


def skew(params: torch.Tensor, b: int) -> torch.Tensor:
    """Packed ``b(b-1)/2`` numbers (strict upper triangle, row major) -> skew ``K`` of shape (..., b, b)."""
    iu = _triu_index(b, params.device)
    K = params.new_zeros(*params.shape[:-1], b, b)
    K[..., iu[0], iu[1]] = params
    return K - K.transpose(-1, -2)


def unskew(K: torch.Tensor) -> torch.Tensor:
    """The packed strict upper triangle (row major) of ``K``; inverse of :func:`skew`."""
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


class _CayleyExact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, K):
        acc = accumulate_dtype(K.dtype)
        Kc = K.to(acc)
        eye = torch.eye(K.shape[-1], dtype=acc, device=K.device)
        # I - K has singular values >= 1 (its symmetric part is I), so the explicit inverse is as
        # accurate as a solve; batched inv is also far faster than batched solve on a busy CPU
        # (measured: 38 ms vs 837 ms for 64 blocks of 32x32 with 2 threads under load), and it runs
        # on one thread (see lapack_single_thread).
        with lapack_single_thread(K.device):
            M = torch.linalg.inv_ex(eye - Kc).inverse  # no error check: I - K is never singular, and the
            # check would read the info flags on the host (a device sync on CUDA)
        ctx.save_for_backward(M)
        ctx.in_dtype = K.dtype
        return (2 * M - eye).to(K.dtype)

    @staticmethod
    def backward(ctx, G):
        (M,) = ctx.saved_tensors
        Mt = M.transpose(-1, -2)
        dK = 2 * Mt @ G.to(M.dtype) @ Mt
        return dK.to(ctx.in_dtype)


def cayley_exact(K: torch.Tensor) -> torch.Tensor:
    """``(I + K)(I - K)^{-1}`` for a batch of skew ``K`` (..., b, b), with the SPEC's exact backward."""
    return _CayleyExact.apply(K)


def cayley_neumann(K: torch.Tensor, terms: int) -> torch.Tensor:
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


def spectral_norm(K: torch.Tensor) -> torch.Tensor:
    """``||K||_2`` per block, for skew K: ``sqrt(lambda_max(K^T K))``."""
    Kd = K.detach().to(torch.float64)
    gram = Kd.transpose(-1, -2) @ Kd
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()


def neumann_error_bound(norm: torch.Tensor, terms: int) -> torch.Tensor:
    """Bound on ``||Q_neumann - Q_exact||_2`` for ``||K||_2 = norm < 1``.

    ``Q_exact - Q_t = 2 sum_{j>terms} K^j``, so the error is at most
    ``2 norm^(terms+1) / (1 - norm)``.
    """
    return 2 * norm ** (terms + 1) / (1 - norm)

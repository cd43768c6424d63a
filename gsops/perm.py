"""The permutations of the adapters and layers, in one place (SPEC "Permutations").

``perm(k, n)`` is sigma of ``P_(k,n)`` (Definition 5.2 of Gorbunov et al., 2024):
``sigma(i) = (i % k) * (n // k) + i // k`` with matrix ``P[sigma(i), i] = 1``,
so ``(P x)[sigma(i)] = x[i]``. As a gather, ``P x = x[..., perm(n // k, n)]``.
``paired_perm`` is ChShuffle's permutation of channel pairs, and
``butterfly_index`` the block-butterfly permutation of BOFT's factors.
"""
from __future__ import annotations

import functools

import torch

from .checks import check_divides, check_int, check_tensor


@functools.lru_cache(maxsize=256)
def _perm_cached(k: int, n: int) -> torch.Tensor:
    # always built on the CPU: a default-device context (e.g. "meta") must not leak into the cache
    i = torch.arange(n, device="cpu")
    return (i % k) * (n // k) + i // k


def perm(k: int, n: int) -> torch.Tensor:
    """sigma of the paper's ``P_(k,n)`` as a LongTensor of length n."""
    k = check_int("k", k)
    n = check_int("n", n)
    check_divides("k", k, "n", n)
    return _perm_cached(k, n).clone()


def gather_index(k: int, n: int, inverse: bool = False) -> torch.Tensor:
    """Index ``idx`` with ``P_(k,n) x == x[..., idx]`` (``P^T x`` when inverse). Cached, do not modify."""
    return _perm_cached(k, n) if inverse else _perm_cached(n // k, n)


def permute(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """``P_(k,n) x`` (or ``P_(k,n)^T x`` when ``inverse``) along the last dimension, n = x.shape[-1]."""
    check_tensor("x", x)
    k = check_int("k", k)
    n = x.shape[-1]
    check_divides("k", k, "x.shape[-1]", n)
    return _permute_unchecked(x, k, inverse)


def _permute_unchecked(x: torch.Tensor, k: int, inverse: bool) -> torch.Tensor:
    # P x is a reshape-transpose (SPEC); no index tensor is needed.
    n = x.shape[-1]
    lead = x.shape[:-1]
    if inverse:
        return x.reshape(*lead, k, n // k).transpose(-1, -2).reshape(*lead, n)
    return x.reshape(*lead, n // k, k).transpose(-1, -2).reshape(*lead, n)


@functools.lru_cache(maxsize=256)
def _paired_perm_cached(k: int, n: int) -> torch.Tensor:
    i = torch.arange(n, device="cpu")
    return ((i // 2) % k) * (n // k) + 2 * (i // (2 * k)) + (i % 2)


def paired_perm(k: int, n: int) -> torch.Tensor:
    """ChShuffle's permutation (SPEC): ``perm(k, n // 2)`` acting on channel pairs ``(2j, 2j+1)``."""
    k = check_int("k", k)
    n = check_int("n", n)
    if n % 2:
        raise ValueError(f"n={n} must be even for a paired permutation")
    check_divides("k", k, "n // 2", n // 2)
    return _paired_perm_cached(k, n).clone()


def invert(sigma: torch.Tensor) -> torch.Tensor:
    """The inverse permutation of ``sigma``."""
    inv = torch.empty_like(sigma)
    inv[sigma] = torch.arange(sigma.numel(), device=sigma.device)
    return inv


@functools.lru_cache(maxsize=64)
def _butterfly_index_cached(d: int, b: int, level: int) -> torch.Tensor:
    if level == 0:
        return torch.arange(d, device="cpu")
    half = b // 2
    chunk = b * 2 ** level
    n_half = chunk // half  # = 2^(level+1) half-blocks per chunk
    order = list(range(0, n_half, 2)) + list(range(1, n_half, 2))
    within = torch.cat([torch.arange(h * half, (h + 1) * half, device="cpu") for h in order])
    return torch.cat([within + start for start in range(0, d, chunk)])


def butterfly_index(d: int, block_size: int, level: int) -> torch.Tensor:
    """Gather index ``g`` of BOFT's level-``level`` block-butterfly permutation ``B``: ``B x = x[g]``.

    Fact of BOFT (Liu et al., 2024; as built by PEFT): the features are cut into
    chunks of ``b * 2^level``; inside each chunk the half-blocks of size ``b/2``
    are reordered even-numbered first, then odd-numbered. Level 0 is the identity.
    The level-``l`` factor ``B C B^T`` therefore couples half-blocks ``2^l`` apart.
    """
    d = check_int("d", d)
    block_size = check_int("block_size", block_size)
    level = check_int("level", level, minimum=0)
    if level:
        if block_size % 2:
            raise ValueError(f"block_size={block_size} must be even for butterfly level {level}")
        check_divides(f"block_size * 2**{level}", block_size * 2 ** level, "d", d)
    return _butterfly_index_cached(d, block_size, level).clone()

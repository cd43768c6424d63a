"""Structured orthogonal ``d x d`` matrices built from Cayley blocks: the rotations the adapters apply.

* :class:`GSRotation`: GSOFT's ``Q = P^T L P R`` (Gorbunov et al., 2024, Sec. 6),
  ``P = perm(r, d)``, L and R block-diagonal with ``r`` Cayley blocks of size ``b``.
* :class:`BlockDiagRotation`: OFT's ``Q = diag(C_1..C_r)`` (Qiu et al., 2023).
* :class:`ButterflyRotation`: BOFT's ``Q = F_0^T F_1^T ... F_{m-1}^T`` (Liu et al.,
  ICLR 2024) with butterfly factors ``F_l^T = B_l C_l B_l^T``; ``C_l`` block-diagonal
  and ``B_l`` the level-``l`` block-butterfly permutation
  (:func:`gsops.perm.butterfly_index`). With ``K_l = 0.5 (A_l - A_l^T)`` from a full
  ``b x b`` tensor ``A_l`` this is, fact for fact, the forward of PEFT's BOFT layer
  for parameters ``boft_R[l] = A_l`` (PEFT writes its Cayley as
  ``(I - K)(I + K)^{-1}`` and multiplies row vectors on the right, which is the
  transpose; a test loads the same numbers into both).

``rotate(x, blocks, transpose)`` applies ``Q`` (or ``Q^T``) to the last dimension
of ``x`` from blocks computed once per forward; the dense ``Q`` is never built
on the training path.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..perm import _permute_unchecked, butterfly_index, invert
from .cayley_param import CayleyBlocks


def _bmm_blocks(x: torch.Tensor, C: torch.Tensor, transpose: bool) -> torch.Tensor:
    return ops.block_diag_mm_unchecked(x, C.transpose(-1, -2) if transpose else C)


# --------------------------------------------------------------------------- rotations
class Rotation(nn.Module):
    """A structured orthogonal ``d x d`` matrix ``Q``; ``rotate(x)`` is ``Q x`` on the last dim of ``x``.

    (The method is ``rotate``, not ``apply``: ``nn.Module.apply(fn)`` must keep working on models.)
    """

    d: int

    def __init__(self, d: int, block_size: int, n_factors: int, **cayley_kw):
        """``n_factors`` factors of ``r = d / block_size`` Cayley blocks of size ``block_size`` each."""
        super().__init__()
        self.d, self.b = d, block_size
        self.r = d // block_size
        self.factors = CayleyBlocks(n_factors, self.r, block_size, **cayley_kw)

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self, dtype=None) -> torch.Tensor:
        return self.factors(dtype)

    # True when linear_factors(blocks) is the factors' blocks in order (blocks[0], blocks[1], ...): the
    # adapter may then compute the blocks and the rotated Linear in one node (gsops.ops.rotated_linear)
    fused_linear = False

    def linear_factors(self, blocks: torch.Tensor):
        """The factors :func:`gsops.ops.rotated_linear` takes for this ``Q`` (None: it takes none)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # blocks are built in the parameters' dtype (float32 on a half-precision model), used in x's dtype
        return self.rotate(x, self.factors().to(x.dtype))

    def dense(self, dtype=torch.float64) -> torch.Tensor:
        """The dense ``Q`` (for tests, merging and inspection), computed in ``dtype``."""
        blocks = self.blocks(dtype)
        eye = torch.eye(self.d, dtype=dtype, device=blocks.device)
        # applying Q to the rows of I gives the rows (Q e_i)^T, i.e. Q^T
        return self.rotate(eye, blocks).transpose(0, 1).contiguous()


class GSRotation(Rotation):
    """GSOFT's ``Q = P^T L P R``, ``P = perm(r, d)``; ``factors.params[0]`` is R, ``[1]`` is L."""

    def __init__(self, d: int, block_size: int, **cayley_kw):
        super().__init__(d, block_size, 2, **cayley_kw)

    fused_linear = True

    def linear_factors(self, blocks):
        return blocks[0], blocks[1]  # (R, L)

    def rotate(self, x, blocks=None, transpose=False):
        B = self.factors() if blocks is None else blocks
        R, L = B[0], B[1]
        if not transpose:
            return ops.gs_apply_unchecked(x, L, R)
        # Q^T x = R^T P^T L^T P x
        y = _permute_unchecked(x, self.r, inverse=False)
        y = _bmm_blocks(y, L, True)
        y = _permute_unchecked(y, self.r, inverse=True)
        return _bmm_blocks(y, R, True)


class BlockDiagRotation(Rotation):
    """OFT's ``Q = diag(C_1..C_r)``."""

    def __init__(self, d: int, block_size: int, **cayley_kw):
        super().__init__(d, block_size, 1, **cayley_kw)

    fused_linear = True

    def linear_factors(self, blocks):
        return (blocks[0],)

    def rotate(self, x, blocks=None, transpose=False):
        B = self.factors() if blocks is None else blocks
        return _bmm_blocks(x, B[0], transpose)



class ButterflyRotation(Rotation):
    """BOFT's ``Q = F_0^T F_1^T ... F_{m-1}^T``, ``F_l^T = B_l C_l B_l^T``; ``factors.params[l]`` is level l."""

    def __init__(self, d: int, block_size: int, n_factors: int, **cayley_kw):
        super().__init__(d, block_size, n_factors, **cayley_kw)
        self.m = n_factors
        for level in range(n_factors):
            g = butterfly_index(d, block_size, level)
            self.register_buffer(f"gather_{level}", g, persistent=False)
            self.register_buffer(f"scatter_{level}", invert(g), persistent=False)

    def _level(self, x, C, level, transpose):
        if level == 0:
            return _bmm_blocks(x, C, transpose)
        g, s = getattr(self, f"gather_{level}"), getattr(self, f"scatter_{level}")
        y = x.index_select(-1, s)           # B^T x
        y = _bmm_blocks(y, C, transpose)    # C (or C^T)
        return y.index_select(-1, g)        # B y

    def rotate(self, x, blocks=None, transpose=False):
        B = self.factors() if blocks is None else blocks
        levels = range(self.m) if transpose else reversed(range(self.m))
        y = x
        for level in levels:
            y = self._level(y, B[level], level, transpose)
        return y



__all__ = ["Rotation", "GSRotation", "BlockDiagRotation", "ButterflyRotation"]

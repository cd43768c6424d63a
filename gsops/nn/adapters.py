"""Orthogonal fine-tuning layers: GSOFT, Double GSOFT, OFT and BOFT (SPEC "GSOFT").

Every method multiplies the frozen weight ``W`` of a layer by a learned
orthogonal ``Q`` built from Cayley blocks ``(I + K)(I - K)^{-1}`` (SPEC
"Orthogonal blocks"):

* ``gsoft``  (Gorbunov et al., 2024, Sec. 6): ``Q = P^T L P R``, ``P = perm(r, d)``,
  L and R block-diagonal with ``r`` Cayley blocks of size ``b``.
* ``double_gsoft`` (same paper): ``y = Q_out (W (Q_in x)) + c`` with two independent
  GS orthogonal matrices (``Q_out`` is ``out x out``).
* ``oft``    (Qiu et al., 2023): ``Q = diag(C_1..C_r)``, one block-diagonal factor.
* ``boft``   (Liu et al., ICLR 2024): ``Q = F_0^T F_1^T ... F_{m-1}^T`` with
  butterfly factors ``F_l^T = B_l C_l B_l^T``; ``C_l`` block-diagonal and ``B_l``
  the level-``l`` block-butterfly permutation (see :func:`butterfly_index`). With
  ``K_l = 0.5 (A_l - A_l^T)`` from a full ``b x b`` tensor ``A_l`` this is, fact
  for fact, the forward of PEFT's BOFT layer for parameters ``boft_R[l] = A_l``
  (PEFT writes its Cayley as ``(I - K)(I + K)^{-1}`` and multiplies row vectors
  on the right, which is the transpose; a test loads the same numbers into both).

Data flow (SPEC): for ``nn.Linear`` the input is rotated, ``y = s * (W (Q x)) + c``,
and the dense ``W Q`` is never built while training. For ``nn.Conv2d`` ``Q`` acts
on the flattened ``in_channels * kh * kw`` dimension of the weight (OFT's rule),
and the rotation is applied on the weight side: ``W' = diag(s) W Q`` is built for
each forward (``out x d`` times the structured ``Q``, cost ``out * d * b``) and
the base layer's own convolution (stride, padding, dilation, padding mode) runs
with it. Merging writes the same ``W'`` into the base layer, computed in float64.

Skew parameters: ``packed=True`` stores the ``b(b-1)/2`` free numbers of each
block (strict upper triangle, row major, as :func:`gsops.ops.skew`);
``packed=False`` stores a full ``b x b`` tensor ``A`` with ``K = A - A^T`` as the
GSOFT paper's code does. All parameters start at zero, so ``Q = I`` and the
adapted layer equals the base layer at initialisation; the scale ``s`` starts at 1.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checks import check_divides, check_int
from ..perm import invert, permute

ORTHOGONAL_METHODS = ("gsoft", "double_gsoft", "oft", "boft")
CAYLEY_METHODS = ("exact", "neumann")


# --------------------------------------------------------------------------- Cayley blocks
class CayleyBlocks(nn.Module):
    """``n`` stacks of ``r`` orthogonal ``b x b`` Cayley blocks, parametrised by skew matrices.

    ``params`` has shape ``(n, r, b(b-1)/2)`` when packed, ``(n, r, b, b)`` when not.
    Calling the module returns the orthogonal blocks, shape ``(n, r, b, b)``.
    """

    def __init__(self, n: int, r: int, b: int, *, packed: bool = True, cayley: str = "exact",
                 neumann_terms: int = 5, dtype=None, device=None):
        super().__init__()
        self.n, self.r, self.b = check_int("n", n), check_int("r", r), check_int("b", b)
        if cayley not in CAYLEY_METHODS:
            raise ValueError(f"cayley={cayley!r} must be one of {CAYLEY_METHODS}")
        self.packed = bool(packed)
        self.cayley = cayley
        self.neumann_terms = check_int("neumann_terms", neumann_terms)
        shape = (n, r, b * (b - 1) // 2) if self.packed else (n, r, b, b)
        self.params = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    def skew_matrices(self, dtype=None) -> torch.Tensor:
        p = self.params if dtype is None else self.params.to(dtype)
        if self.packed:
            return ops.skew(p, self.b)
        return p - p.transpose(-1, -2)

    def forward(self, dtype=None) -> torch.Tensor:
        K = self.skew_matrices(dtype)
        return ops.cayley(K, method=self.cayley, terms=self.neumann_terms)

    def extra_repr(self) -> str:
        return f"n={self.n}, r={self.r}, b={self.b}, packed={self.packed}, cayley={self.cayley!r}"


def _bmm_blocks(x: torch.Tensor, C: torch.Tensor, transpose: bool) -> torch.Tensor:
    return ops.block_diag_mm(x, C.transpose(-1, -2) if transpose else C)


# --------------------------------------------------------------------------- rotations
class Rotation(nn.Module):
    """A structured orthogonal ``d x d`` matrix ``Q``; ``apply(x)`` is ``Q x`` on the last dim of ``x``."""

    d: int

    def apply(self, x: torch.Tensor, blocks: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self, dtype=None) -> torch.Tensor:
        return self.factors(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def dense(self, dtype=torch.float64) -> torch.Tensor:
        """The dense ``Q`` (for tests, merging and inspection), computed in ``dtype``."""
        blocks = self.blocks(dtype)
        eye = torch.eye(self.d, dtype=dtype, device=blocks.device)
        # applying Q to the rows of I gives the rows (Q e_i)^T, i.e. Q^T
        return self.apply(eye, blocks).transpose(0, 1).contiguous()


class GSRotation(Rotation):
    """GSOFT's ``Q = P^T L P R``, ``P = perm(r, d)``; ``factors.params[0]`` is R, ``[1]`` is L."""

    def __init__(self, d: int, block_size: int, **cayley_kw):
        super().__init__()
        self.d, self.b = d, block_size
        self.r = d // block_size
        self.factors = CayleyBlocks(2, self.r, block_size, **cayley_kw)

    def apply(self, x, blocks=None, transpose=False):
        B = self.factors() if blocks is None else blocks
        R, L = B[0], B[1]
        if not transpose:
            return ops.gs_apply(x, L, R)
        # Q^T x = R^T P^T L^T P x
        y = permute(x, self.r)
        y = _bmm_blocks(y, L, True)
        y = permute(y, self.r, inverse=True)
        return _bmm_blocks(y, R, True)


class BlockDiagRotation(Rotation):
    """OFT's ``Q = diag(C_1..C_r)``."""

    def __init__(self, d: int, block_size: int, **cayley_kw):
        super().__init__()
        self.d, self.b = d, block_size
        self.r = d // block_size
        self.factors = CayleyBlocks(1, self.r, block_size, **cayley_kw)

    def apply(self, x, blocks=None, transpose=False):
        B = self.factors() if blocks is None else blocks
        return _bmm_blocks(x, B[0], transpose)


@functools.lru_cache(maxsize=64)
def _butterfly_index_cached(d: int, b: int, level: int) -> torch.Tensor:
    if level == 0:
        return torch.arange(d)
    half = b // 2
    chunk = b * 2 ** level
    n_half = chunk // half  # = 2^(level+1) half-blocks per chunk
    order = list(range(0, n_half, 2)) + list(range(1, n_half, 2))
    within = torch.cat([torch.arange(h * half, (h + 1) * half) for h in order])
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


class ButterflyRotation(Rotation):
    """BOFT's ``Q = F_0^T F_1^T ... F_{m-1}^T``, ``F_l^T = B_l C_l B_l^T``; ``factors.params[l]`` is level l."""

    def __init__(self, d: int, block_size: int, n_factors: int, **cayley_kw):
        super().__init__()
        self.d, self.b, self.m = d, block_size, n_factors
        self.r = d // block_size
        self.factors = CayleyBlocks(n_factors, self.r, block_size, **cayley_kw)
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

    def apply(self, x, blocks=None, transpose=False):
        B = self.factors() if blocks is None else blocks
        levels = range(self.m) if transpose else reversed(range(self.m))
        y = x
        for level in levels:
            y = self._level(y, B[level], level, transpose)
        return y


def make_rotation(method: str, d: int, block_size: int, n_factors: int = 2, **cayley_kw) -> Rotation:
    if method in ("gsoft", "double_gsoft"):
        return GSRotation(d, block_size, **cayley_kw)
    if method == "oft":
        return BlockDiagRotation(d, block_size, **cayley_kw)
    if method == "boft":
        return ButterflyRotation(d, block_size, n_factors, **cayley_kw)
    raise ValueError(f"method={method!r} must be one of {ORTHOGONAL_METHODS}")


# --------------------------------------------------------------------------- layer rules
def layer_dims(base: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` that an adapter sees: Linear (in, out); Conv2d (in_channels*kh*kw, out_channels)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        kh, kw = base.kernel_size
        return base.in_channels * kh * kw, base.out_channels
    raise TypeError(f"adapters wrap nn.Linear or nn.Conv2d, got {type(base).__name__}")


def check_base_layer(base: nn.Module, name: str = "layer") -> None:
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"{name}: adapters wrap nn.Linear or nn.Conv2d, got {type(base).__name__}")
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise ValueError(f"{name}: Conv2d groups={base.groups} is not supported (adapters need groups=1)")


def check_orthogonal_layer(name: str, base: nn.Module, method: str, block_size: int, n_factors: int) -> None:
    """Raise, naming the layer and the numbers, when ``method`` cannot wrap ``base``."""
    check_base_layer(base, name)
    d_in, d_out = layer_dims(base)
    what = "in_features" if isinstance(base, nn.Linear) else "in_channels*kh*kw"
    if d_in % block_size:
        raise ValueError(f"{name}: block_size={block_size} must divide {what}={d_in}")
    if method == "double_gsoft" and d_out % block_size:
        what_out = "out_features" if isinstance(base, nn.Linear) else "out_channels"
        raise ValueError(f"{name}: block_size={block_size} must divide {what_out}={d_out} (double_gsoft rotates outputs)")
    if method == "boft" and n_factors > 1:
        if block_size % 2:
            raise ValueError(f"{name}: boft with n_factors={n_factors} > 1 needs an even block_size, got {block_size}")
        span = block_size * 2 ** (n_factors - 1)
        if d_in % span:
            raise ValueError(
                f"{name}: boft with n_factors={n_factors} needs block_size*2**(n_factors-1)={span} "
                f"to divide {what}={d_in}"
            )


# --------------------------------------------------------------------------- merge bookkeeping
class MergeableAdapter(nn.Module):
    """Shared merge/unmerge state of every adapter layer."""

    base_layer: nn.Module
    merged: bool

    def merge(self) -> bool:
        """Write the adapted weight into the base layer. Warns and does nothing when already merged."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}: already merged; merge() did nothing (no double apply)")
            return False
        self._check_mergeable()
        with torch.no_grad():
            W = self.base_layer.weight
            self.base_layer.weight.copy_(self._merged_weight().reshape(W.shape).to(W.dtype))
        self.merged = True
        return True

    def unmerge(self) -> bool:
        """Restore the frozen base weight. Warns and does nothing when not merged."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}: not merged; unmerge() did nothing")
            return False
        self._check_unmergeable()
        with torch.no_grad():
            W = self.base_layer.weight
            self.base_layer.weight.copy_(self._unmerged_weight().reshape(W.shape).to(W.dtype))
        self.merged = False
        return True

    def _check_mergeable(self):
        if getattr(self, "weight_is_shared", False):
            raise ValueError(
                f"{type(self).__name__}: the base weight is shared with another module (tied weights); "
                "merging would change that module too. Exclude this layer via target_modules, or untie the weights"
            )

    def _check_unmergeable(self):
        pass

    def _flat_weight(self, dtype=None) -> torch.Tensor:
        W = self.base_layer.weight
        W = W.reshape(W.shape[0], -1)
        return W if dtype is None else W.to(dtype)

    def _base_forward(self, x, weight_flat, with_bias=True):
        base = self.base_layer
        bias = base.bias if with_bias else None
        if isinstance(base, nn.Linear):
            return F.linear(x, weight_flat, bias)
        return base._conv_forward(x, weight_flat.reshape(base.weight.shape), bias)

    def revert(self) -> nn.Module:
        """The original base module, with its original weight (unmerging first when merged)."""
        if self.merged:
            self.unmerge()
        return self.base_layer


class OrthogonalAdapter(MergeableAdapter):
    """``nn.Linear`` / ``nn.Conv2d`` wrapped with a learned orthogonal rotation (see module docstring)."""

    def __init__(self, base: nn.Module, method: str = "gsoft", block_size: int = 32, n_factors: int = 2,
                 scale: bool = True, packed: bool = True, cayley: str = "exact", neumann_terms: int = 5,
                 name: str = "layer"):
        super().__init__()
        if method not in ORTHOGONAL_METHODS:
            raise ValueError(f"method={method!r} must be one of {ORTHOGONAL_METHODS}")
        block_size = check_int("block_size", block_size)
        n_factors = check_int("n_factors", n_factors)
        check_orthogonal_layer(name, base, method, block_size, n_factors)
        self.base_layer = base
        self.method = method
        self.d_in, self.d_out = layer_dims(base)
        W = base.weight
        kw = dict(packed=packed, cayley=cayley, neumann_terms=neumann_terms, dtype=W.dtype, device=W.device)
        self.rotation = make_rotation(method, self.d_in, block_size, n_factors, **kw)
        self.rotation_out = GSRotation(self.d_out, block_size, **kw) if method == "double_gsoft" else None
        self.scale = nn.Parameter(torch.ones(self.d_out, dtype=W.dtype, device=W.device)) if scale else None
        self.merged = False

    # y = s * Q_out(W (Q_in x)) + c
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        if isinstance(base, nn.Linear):
            y = F.linear(self.rotation(x), base.weight)
            if self.rotation_out is not None:
                y = self.rotation_out(y)
            if self.scale is not None:
                y = y * self.scale
            return y if base.bias is None else y + base.bias
        return self._base_forward(x, self.adapted_weight())

    def adapted_weight(self, dtype=None) -> torch.Tensor:
        """``diag(s) Q_out W Q_in`` with W flattened to (out, d_in); in ``dtype`` when given (e.g. float64)."""
        W = self._flat_weight(dtype)
        blocks = self.rotation.blocks(dtype)
        M = self.rotation.apply(W, blocks, transpose=True)  # rows of W Q = (Q^T w_i)^T
        if self.rotation_out is not None:
            Bo = self.rotation_out.blocks(dtype)
            M = self.rotation_out.apply(M.transpose(0, 1), Bo).transpose(0, 1)  # Q_out M
        if self.scale is not None:
            s = self.scale if dtype is None else self.scale.to(dtype)
            M = M * s[:, None]
        return M

    def _merged_weight(self):
        return self.adapted_weight(torch.float64)

    def _check_unmergeable(self):
        if self.scale is not None and bool((self.scale == 0).any()):
            idx = torch.nonzero(self.scale == 0).flatten()[:5].tolist()
            raise ValueError(f"cannot unmerge: scale has zero entries (indices {idx}); diag(s) is not invertible")

    def _unmerged_weight(self):
        f64 = torch.float64
        M = self._flat_weight(f64)
        if self.scale is not None:
            M = M / self.scale.to(f64)[:, None]
        if self.rotation_out is not None:
            Bo = self.rotation_out.blocks(f64)
            M = self.rotation_out.apply(M.transpose(0, 1), Bo, transpose=True).transpose(0, 1)  # Q_out^T M
        return self.rotation.apply(M, self.rotation.blocks(f64))  # rows of M Q^T = (Q m_i)^T

    def orthogonal_matrices(self, dtype=torch.float64) -> dict:
        """The dense learned ``Q`` matrices by name (``in`` and, for double_gsoft, ``out``)."""
        out = {"in": self.rotation.dense(dtype)}
        if self.rotation_out is not None:
            out["out"] = self.rotation_out.dense(dtype)
        return out

    def extra_repr(self) -> str:
        return f"method={self.method!r}, d_in={self.d_in}, d_out={self.d_out}, scale={self.scale is not None}"


__all__ = [
    "CayleyBlocks", "Rotation", "GSRotation", "BlockDiagRotation", "ButterflyRotation", "butterfly_index",
    "make_rotation", "OrthogonalAdapter", "MergeableAdapter", "layer_dims", "check_base_layer",
    "check_orthogonal_layer", "ORTHOGONAL_METHODS",
]

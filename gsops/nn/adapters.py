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

Data flow (SPEC): for ``nn.Linear`` (and transformers' ``Conv1D``, whose weight is
stored transposed as ``in x out``) the input is rotated, ``y = s * (W (Q x)) + c``,
and the dense ``W Q`` is never built while training. For ``nn.Conv2d`` ``Q`` acts
on the flattened ``in_channels/groups * kh * kw`` dimension of the weight (OFT's rule),
and the rotation is applied on the weight side: ``W' = diag(s) W Q`` is built for
each forward (``out x d`` times the structured ``Q``, cost ``out * d * b``) and
the base layer's own convolution (stride, padding, dilation, padding mode) runs
with it. Merging writes the same ``W'`` into the base layer, computed in float64.

Skew parameters: ``packed=True`` stores the ``b(b-1)/2`` free numbers of each
block (strict upper triangle, row major, as :func:`gsops.ops.skew`);
``packed=False`` stores a full ``b x b`` tensor ``A`` with ``K = A - A^T``; the
GSOFT paper's code and PEFT's BOFT build ``K = 0.5 (A - A^T)`` instead, so the
same ``K`` needs ``A_gsops = 0.5 A`` (:mod:`gsops.adapters.convert`). All
parameters start at zero, so ``Q = I`` and the adapted layer equals the base
layer at initialisation; the scale ``s`` starts at 1.

Reliability policies:

* Non-finite values. Every adapter layer scans its own parameters (not the
  frozen base weight) in each forward and raises ``ValueError`` naming the
  layer and the parameter when one holds NaN or inf, e.g. ``encoder.q: adapter
  parameter(s) ['rotation.factors.params'] contain NaN or inf``: a run whose
  optimizer produced a non-finite step stops instead of training on garbage.
  The scan never stalls the device (:mod:`gsops.nn.guard`): on CPU it refuses in
  the same call, before the output is returned; on CUDA the numbers travel to
  the host without a sync and the refusal comes at the latest at the layer's
  next call. The global opt-out is ``GSOPS_CHECK_FINITE=0`` (or
  ``gsops.set_check_finite(False)``).
  Inputs are not scanned (that costs a pass over every activation); the opt-in
  is ``GSOPS_CHECK_INPUTS=1`` (or ``gsops.set_check_inputs(True)``).
  ``merge()`` always scans, whatever the switches say, and also refuses to write
  a merged weight that is not finite in the base weight's dtype (e.g. fp16
  overflow): a merge never corrupts the base layer.
* Inputs are checked before computing: a tensor of a floating dtype equal to the
  weight's (any floating dtype under ``torch.autocast``), with ``in_features``
  last (Linear) or ``in_channels`` at dim -3 (Conv2d); else TypeError/ValueError
  naming the layer.
* Cayley–Neumann (``cayley="neumann"``, ``t = neumann_terms``) is OFTv2's series,
  valid only while ``||K||_2`` is well below 1 (SPEC). Each forward measures,
  on the device, the orthogonality error ``max |Q^T Q - I|`` of the series'
  blocks; once it exceeds ``NEUMANN_WARN_ERROR`` (1e-3, gsops/tolerances.py)
  the layer switches to the exact Cayley transform for good and warns once,
  naming the layer: the run goes on, with an orthogonal Q. On CPU the switch
  happens in the call that measured the error (that call already uses the
  exact Q); on CUDA, read without a sync, at the latest one call later.
  ``cayley="exact"`` has no such limit (``(I - K)^{-1}`` exists for every skew K).
* Merging stores a copy of the adapter parameters (small); ``unmerge()`` undoes
  exactly what was merged, even if the parameters changed while merged (it
  warns). Merging a merged layer or unmerging an unmerged one warns and does
  nothing: never a double apply.
* Determinism: on CPU every method's forward and backward is bitwise
  reproducible for a fixed seed. GPU kernels that reduce block gradients with
  atomics (the CUDA backend's ``gs_apply`` block gradient and grouped
  conv-exponential weight gradient use ``atomicAdd``) are not bitwise
  deterministic; the torch reference backend (``GSOPS_BACKEND=torch``) is as
  deterministic as torch itself.
"""
from __future__ import annotations

import functools
import math
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..tolerances import NEUMANN_WARN_ERROR
from . import guard
from ..checks import (
    FLOAT_DTYPES, check_divides, check_finite_enabled, check_inputs_enabled, check_int, has_values,
)
from ..perm import _permute_unchecked, invert
from ..reference.cayley import neumann_error_bound, spectral_norm
from ..reference.peft_cayley import peft_cayley_neumann

ORTHOGONAL_METHODS = ("gsoft", "double_gsoft", "oft", "boft")
CAYLEY_METHODS = ("exact", "neumann", "peft_neumann")  # peft_neumann: see gsops.reference.peft_cayley


# --------------------------------------------------------------------------- Cayley blocks
@functools.lru_cache(maxsize=64)
def _skew_gather(b: int):
    """``(index, sign)`` over the b*b entries of K into the packed ``p`` (upper triangle row major); sign 0 on the diagonal."""
    idx = torch.zeros(b * b, dtype=torch.long, device="cpu")
    sign = torch.zeros(b * b, device="cpu")
    t = 0
    for i in range(b):
        for j in range(i + 1, b):
            idx[i * b + j], sign[i * b + j] = t, 1.0
            idx[j * b + i], sign[j * b + i] = t, -1.0
            t += 1
    return idx, sign


def _skew_packed(p: torch.Tensor, b: int, idx: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``ops.skew`` for packed parameters in two ops, from the index tensors of :func:`_skew_gather`."""
    if b == 1:
        return p.new_zeros(*p.shape[:-1], 1, 1) + p.sum(-1, keepdim=True)[..., None]  # keeps the graph
    # a 2-D gather along dim 1 is ~10x cheaper on CPU than index_select on the last dim of a 3-D tensor
    flat = p.reshape(-1, p.shape[-1]).index_select(1, idx)
    return (flat * sign.to(p.dtype)).reshape(*p.shape[:-1], b, b)


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
        if self.packed:  # the skew layout, built once (moves with the module, not saved)
            idx, sign = _skew_gather(b)
            self.register_buffer("skew_index", idx.to(device), persistent=False)
            self.register_buffer("skew_sign", sign.to(device=device, dtype=dtype or torch.get_default_dtype()),
                                 persistent=False)
        self.neumann_switched = False  # set once the series lost orthogonality: exact Cayley from then on
        self.label = "CayleyBlocks"  # set by the adapter to "<layer name>.<attribute>" for messages

    def skew_matrices(self, dtype=None) -> torch.Tensor:
        p = self.params if dtype is None else self.params.to(dtype)
        if self.packed:
            return _skew_packed(p, self.b, self.skew_index, self.skew_sign)
        return p - p.transpose(-1, -2)

    @property
    def series(self) -> bool:
        """True while the blocks come from the Neumann series (``cayley="neumann"``, not switched)."""
        return self.cayley == "neumann" and not self.neumann_switched

    @property
    def exact(self) -> bool:
        """True when the blocks come from the exact Cayley transform (``cayley="exact"``, or a switched series)."""
        return self.cayley != "peft_neumann" and not self.series

    def forward(self, dtype=None) -> torch.Tensor:
        """The orthogonal blocks ``(n, r, b, b)``, following the layer's Neumann policy (checked at once)."""
        Q, err = self.blocks_and_error(dtype)
        if err is not None and has_values(err) and err.numel():
            if self.judge_series(float(err.max())):  # off the training path (merge, dense): a sync is fine
                Q, _ = self.blocks_and_error(dtype)
        return Q

    def blocks_and_error(self, dtype=None):
        """``(Q, err)``: the blocks and, for the Neumann series, ``max |Q^T Q - I|`` as a device tensor (else None).

        No host sync: the caller decides when to read ``err`` (see :mod:`gsops.nn.guard`).
        """
        K = self.skew_matrices(dtype)
        if self.cayley == "peft_neumann":  # PEFT's own series, for adapters imported from PEFT
            return peft_cayley_neumann(K, self.neumann_terms), None
        if not self.series:
            return ops.cayley_unchecked(K, "exact"), None
        Q = ops.cayley_unchecked(K, "neumann", self.neumann_terms)
        with torch.no_grad():
            Qd = Q.detach().flatten(0, -3)
            gram = Qd.transpose(-1, -2) @ Qd
            gram.diagonal(dim1=-2, dim2=-1).sub_(1)
            err = gram.abs().amax().double().reshape(1) if gram.numel() else gram.new_zeros(1, dtype=torch.float64)
        return Q, err

    def judge_series(self, err: float) -> bool:
        """Switch to the exact Cayley (once, with a warning naming the layer) when ``err`` is too large."""
        if not self.series or err <= NEUMANN_WARN_ERROR:
            return False
        self.neumann_switched = True
        warnings.warn(
            f"{self.label}: cayley='neumann' with neumann_terms={self.neumann_terms} lost orthogonality "
            f"(max |Q^T Q - I| = {err:.3g} > NEUMANN_WARN_ERROR = {NEUMANN_WARN_ERROR}); this layer uses the "
            "exact Cayley transform from now on"
        )
        return True

    def neumann_bound(self, K: torch.Tensor | None = None) -> tuple[float, float]:
        """``(max ||K||_2, error bound 2||K||^(t+1)/(1-||K||))`` over the blocks (inf when ``||K|| >= 1``).

        For inspection (reads values on the host); the training path measures ``Q^T Q - I`` instead.
        """
        K = self.skew_matrices() if K is None else K
        if not K.numel() or not has_values(K):
            return 0.0, 0.0
        norm = float(spectral_norm(K).max())
        if not math.isfinite(norm) or norm >= 1:
            return norm, math.inf
        return norm, float(neumann_error_bound(torch.tensor(norm, dtype=torch.float64), self.neumann_terms))

    def extra_repr(self) -> str:
        return f"n={self.n}, r={self.r}, b={self.b}, packed={self.packed}, cayley={self.cayley!r}"


def _blocks_batched(stacks: list) -> list:
    """``blocks_and_error()`` of several CayleyBlocks, with one Cayley call for all exact ones of one block size."""
    exact = [f for f in stacks if f.exact]
    if len(exact) < 2 or len({(f.b, f.params.dtype) for f in exact}) != 1:
        return [f.blocks_and_error() for f in stacks]
    Ks = [f.skew_matrices() for f in exact]
    Q = ops.cayley_unchecked(torch.cat([K.flatten(0, 1) for K in Ks]), "exact")
    parts = iter(Q.split([K.shape[0] * K.shape[1] for K in Ks]))
    return [(next(parts).view(f.n, f.r, f.b, f.b), None) if f.exact else f.blocks_and_error()
            for f in stacks]


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

    def rotate(self, x, blocks=None, transpose=False):
        B = self.factors() if blocks is None else blocks
        return _bmm_blocks(x, B[0], transpose)


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


def make_rotation(method: str, d: int, block_size: int, n_factors: int = 2, **cayley_kw) -> Rotation:
    if method in ("gsoft", "double_gsoft"):
        return GSRotation(d, block_size, **cayley_kw)
    if method == "oft":
        return BlockDiagRotation(d, block_size, **cayley_kw)
    if method == "boft":
        return ButterflyRotation(d, block_size, n_factors, **cayley_kw)
    raise ValueError(f"method={method!r} must be one of {ORTHOGONAL_METHODS}")


# --------------------------------------------------------------------------- layer rules
def conv1d_type():
    """transformers' ``pytorch_utils.Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``) if imported.

    Only looked up among imported modules: a model holding a Conv1D has imported it already.
    """
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(base: nn.Module) -> bool:
    t = conv1d_type()
    return t is not None and isinstance(base, t)


def is_linear_like(base: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D``: ``y = W x + c`` on the last dimension."""
    return isinstance(base, nn.Linear) or is_conv1d(base)


def supported_layer(base: nn.Module) -> bool:
    return isinstance(base, (nn.Linear, nn.Conv2d)) or is_conv1d(base)


SUPPORTED_LAYERS = "nn.Linear, nn.Conv2d or transformers' Conv1D"


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` that an adapter sees.

    Linear (in, out); Conv1D (weight rows, weight columns) = (in, out);
    Conv2d (in_channels/groups*kh*kw, out_channels): the flattened weight is
    ``out x (in_channels/groups*kh*kw)`` whatever ``groups`` is.
    """
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        kh, kw = base.kernel_size
        return base.in_channels // base.groups * kh * kw, base.out_channels
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"adapters wrap {SUPPORTED_LAYERS}, got {type(base).__name__}")


def _in_what(base) -> str:
    if is_linear_like(base):
        return "in_features"
    return "in_channels*kh*kw" if base.groups == 1 else "in_channels/groups*kh*kw"


def check_base_layer(base: nn.Module, name: str = "layer") -> None:
    if not supported_layer(base):
        raise TypeError(f"{name}: adapters wrap {SUPPORTED_LAYERS}, got {type(base).__name__}")
    if base.weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: the layer's weight must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {base.weight.dtype}"
        )


def _block_size_problem(base: nn.Module, method: str, block_size: int, n_factors: int) -> str | None:
    """Why ``block_size`` does not fit ``base`` for ``method`` (None when it fits)."""
    d_in, d_out = layer_dims(base)
    what = _in_what(base)
    if block_size < 2:
        return (f"block_size={block_size} gives 1x1 Cayley blocks, which are always 1: "
                "Q = I has no trainable parameter (use block_size >= 2)")
    if d_in % block_size:
        return f"block_size={block_size} must divide {what}={d_in}"
    if method == "double_gsoft" and d_out % block_size:
        what_out = "out_features" if is_linear_like(base) else "out_channels"
        return f"block_size={block_size} must divide {what_out}={d_out} (double_gsoft rotates outputs)"
    if method == "boft" and n_factors > 1:
        if block_size % 2:
            return f"boft with n_factors={n_factors} > 1 needs an even block_size, got {block_size}"
        span = block_size * 2 ** (n_factors - 1)
        if d_in % span:
            return f"boft with n_factors={n_factors} needs block_size*2**(n_factors-1)={span} to divide {what}={d_in}"
    return None


def check_orthogonal_layer(name: str, base: nn.Module, method: str, block_size: int, n_factors: int) -> None:
    """Raise, naming the layer and the numbers, when ``method`` cannot wrap ``base``."""
    check_base_layer(base, name)
    if method in ("gsoft", "double_gsoft") and n_factors != 2:
        raise ValueError(
            f"{name}: n_factors={n_factors}: method={method!r} has exactly 2 factors (L and R); use method='boft' for more"
        )
    if method == "double_gsoft" and isinstance(base, nn.Conv2d) and base.groups != 1:
        raise ValueError(
            f"{name}: double_gsoft cannot wrap a Conv2d with groups={base.groups}: its output rotation mixes "
            "output channels of different groups, which a grouped convolution cannot hold"
        )
    why = _block_size_problem(base, method, block_size, n_factors)
    if why:
        raise ValueError(f"{name}: {why}")


def fit_block_size(name: str, base: nn.Module, method: str, block_size: int, n_factors: int) -> int:
    """The block size nearest to ``block_size`` that fits ``base`` (ties: the smaller; PEFT OFT's rule).

    Returns ``block_size`` itself when it fits; raises ValueError naming the
    layer when no size >= 2 fits.
    """
    if _block_size_problem(base, method, block_size, n_factors) is None:
        return block_size
    d_in, _ = layer_dims(base)
    fits = [b for b in range(2, d_in + 1) if _block_size_problem(base, method, b, n_factors) is None]
    if not fits:
        raise ValueError(
            f"{name}: no block size fits this layer for method={method!r} (n_factors={n_factors}): "
            f"{_block_size_problem(base, method, block_size, n_factors)}, and no size in [2, {d_in}] divides it"
        )
    return min(fits, key=lambda b: (abs(b - block_size), b))


# --------------------------------------------------------------------------- merge bookkeeping
def _fused_paths_off(module, args):
    """A no-op forward pre-hook: its presence keeps torch's fused encoder fast path off (see MergeableAdapter)."""
    return None


def adapter_param_dtype(weight_dtype: torch.dtype, adapter_dtype=None) -> torch.dtype:
    """The dtype of an adapter's own parameters: ``adapter_dtype``, else float32 on a half-precision base."""
    if adapter_dtype is not None:
        if adapter_dtype not in FLOAT_DTYPES:
            raise TypeError(f"adapter_dtype must be one of {FLOAT_DTYPES} or None, got {adapter_dtype!r}")
        return adapter_dtype
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


class MergeableAdapter(nn.Module):
    """Shared merge/unmerge state and input/parameter checks of every adapter layer.

    Drop-in: attributes the adapter does not have are read from the base layer
    (``weight``, ``bias``, ``in_features``, ``out_features``, ``kernel_size``,
    ...), as PEFT's tuner layers do; ``weight`` is the frozen base weight, not
    the adapted one. Code that reads ``weight`` to compute instead of calling
    the layer is kept off: torch's ``nn.TransformerEncoderLayer`` fused
    inference path (eval + no_grad) multiplies by ``linear1.weight`` itself, and
    it is not taken while a module inside the layer has a forward hook, so every
    adapter registers a no-op forward pre-hook.
    """

    base_layer: nn.Module
    merged: bool
    name: str = "layer"

    def __init__(self):
        super().__init__()
        self.register_forward_pre_hook(_fused_paths_off)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            base = modules.get("base_layer") if modules is not None else None
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the base layer alone would compute in: the autocast dtype when autocast is on, else x's."""
        dev = x.device.type
        if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def _param_dtype(self) -> torch.dtype:
        named = self.adapter_named_parameters()
        return named[0][1].dtype if named else self.base_layer.weight.dtype

    # ---- checks shared by every adapter's forward
    def adapter_named_parameters(self) -> list:
        """``(name, parameter)`` of the adapter's own parameters (not the base layer's), in
        ``named_parameters`` order (walks the adapter's own modules only: this runs in every forward)."""
        out = [(n, p) for n, p in self._parameters.items() if p is not None]
        for cname, child in self._modules.items():
            if cname != "base_layer" and child is not None:
                out += [(f"{cname}.{n}", p) for n, p in child.named_parameters()]
        return out

    def nonfinite_parameters(self) -> list:
        """Names of adapter parameters holding NaN or inf (one device sync for all of them)."""
        named = [(n, p) for n, p in self.adapter_named_parameters() if p.numel()]
        if not named or not has_values(named[0][1]):
            return []
        with torch.no_grad():
            ok = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
        return [n for (n, _), good in zip(named, ok) if not good]

    def check_parameters_finite(self, force: bool = False, series=()) -> bool:
        """Raise ValueError naming the layer when an adapter parameter is NaN/inf (see module docstring).

        ``force=True`` (merging) checks at once, whatever the switches say. Otherwise the values
        are read through the layer's :class:`~gsops.nn.guard.DeferredReadout` (no device sync),
        together with the orthogonality errors of ``series``, a list of ``(CayleyBlocks, err)``
        for factors computed by the Neumann series. Returns True when one of those factors has
        just switched to the exact Cayley transform (the caller recomputes its blocks).
        """
        if force:
            bad = self.nonfinite_parameters()
            if bad:
                self._raise_nonfinite(bad)
            return False
        named = [(n, p) for n, p in self.adapter_named_parameters() if p.numel()] if check_finite_enabled() else []
        series = list(series)
        probe = named[0][1] if named else (series[0][1] if series else None)
        if probe is None or probe.device.type == "meta":
            return False
        parts = ([guard.finite_probe([p for _, p in named])] if named else []) + [err for _, err in series]
        values = torch.cat([v.to(probe.device, torch.float64) for v in parts]) if len(parts) > 1 else parts[0]
        if torch.compiler.is_compiling():  # checked at run time inside the compiled graph, by the same judge
            mask = sum(1 << i for i, r in enumerate(self._rotations()) if any(f is r.factors for f, _ in series))
            guard.compiled_readout(values, self._guard_key(), len(named), mask)
            return False
        context = ([n for n, _ in named], [f for f, _ in series])
        switched = False
        readout = self._guard_readout()
        for vals, (names, factors) in readout.submit(values, context):
            switched = self._judge(vals, names, factors) or switched
        return switched

    def _judge(self, vals, names, factors) -> bool:
        bad = [n for n, v in zip(names, vals[: len(names)]) if not np.isfinite(v)]
        if bad:
            self._guard_readout().discard()
            self._raise_nonfinite(bad)
        switched = False
        for factor, err in zip(factors, vals[len(names):]):
            switched = factor.judge_series(float(err)) or switched
        return switched

    def _rotations(self) -> list:
        return [r for r in (getattr(self, "rotation", None), getattr(self, "rotation_out", None)) if r is not None]

    def _judge_compiled(self, values: torch.Tensor, n_params: int, series_mask: int) -> None:
        """Run time of a compiled forward: the same checks as eager (:meth:`check_parameters_finite`)."""
        names = [n for n, p in self.adapter_named_parameters() if p.numel()][:n_params]
        factors = [r.factors for i, r in enumerate(self._rotations()) if series_mask >> i & 1]
        for vals, (names_, factors_) in self._guard_readout().submit(values, (names, factors)):
            self._judge(vals, names_, factors_)

    def _guard_key(self) -> int:
        key = self.__dict__.get("_readout_key")
        if key is None:
            key = self.__dict__["_readout_key"] = guard.register(self)
        return key

    def _raise_nonfinite(self, bad):
        raise ValueError(
            f"{self.name}: adapter parameter(s) {bad} contain NaN or inf (a diverged optimizer step?); "
            "refusing to run on them. Lower the learning rate / clip gradients and reload a checkpoint. "
            "Set GSOPS_CHECK_FINITE=0 to skip this check"
        )

    def _guard_readout(self) -> guard.DeferredReadout:
        readout = self.__dict__.get("_readout")
        if readout is None:
            readout = self.__dict__["_readout"] = guard.DeferredReadout()
        return readout

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_readout", None)  # pending device readouts do not travel with copies or pickles
        state.pop("_readout_key", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._guard_key()  # a copy gets its own key

    def check_input(self, x) -> None:
        """x: a floating tensor of the weight's dtype (any float under autocast) and the layer's feature size."""
        base = self.base_layer
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: input x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{self.name}: input x must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
            )
        W = base.weight
        if x.dtype != W.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self.name}: input x has dtype {x.dtype} but the layer's weights are {W.dtype}; "
                "cast the input or run under torch.autocast"
            )
        if x.device != W.device:
            raise ValueError(f"{self.name}: input x is on {x.device} but the layer's weights are on {W.device}")
        if x.is_nested:
            raise ValueError(f"{self.name}: nested tensors are not supported as input; pass a padded tensor")
        if is_linear_like(base):
            d_in = layer_dims(base)[0]
            if x.dim() < 1 or x.shape[-1] != d_in:
                raise ValueError(
                    f"{self.name}: input x.shape[-1] must equal in_features={d_in}, got shape {tuple(x.shape)}"
                )
        else:
            if x.dim() not in (3, 4) or x.shape[-3] != base.in_channels:
                raise ValueError(
                    f"{self.name}: input x must be (N, C, H, W) or (C, H, W) with C = in_channels={base.in_channels}, "
                    f"got shape {tuple(x.shape)}"
                )
        if check_inputs_enabled() and x.numel() and has_values(x):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{self.name}: input x contains NaN or inf (GSOPS_CHECK_INPUTS=1 is on)")

    # ---- merging
    def _param_snapshot(self) -> dict:
        return {n: p.detach().clone() for n, p in self.adapter_named_parameters()}

    def merge(self) -> bool:
        """Write the adapted weight into the base layer. Warns and does nothing when already merged.

        Refuses (ValueError, layer unchanged) when an adapter parameter or the
        merged weight in the base weight's dtype is not finite.
        """
        if self.merged:
            warnings.warn(f"{self.name} ({type(self).__name__}): already merged; merge() did nothing (no double apply)")
            return False
        new = self.check_merge()
        with torch.no_grad():
            snapshot = self._param_snapshot()
            self.base_layer.weight.copy_(new)
        self._merged_params = snapshot
        self.merged = True
        return True

    def unmerge(self) -> bool:
        """Restore the frozen base weight. Warns and does nothing when not merged.

        Undoes exactly what :meth:`merge` wrote: if the adapter parameters
        changed while merged (e.g. an optimizer step), it warns and unmerges with
        the parameters that were merged, keeping the new values afterwards.
        """
        if not self.merged:
            warnings.warn(f"{self.name} ({type(self).__name__}): not merged; unmerge() did nothing")
            return False
        snapshot = getattr(self, "_merged_params", None)
        named = dict(self.adapter_named_parameters())
        changed = snapshot is not None and any(not torch.equal(named[n], t.to(named[n])) for n, t in snapshot.items())
        with torch.no_grad():
            current = self._param_snapshot() if changed else None
            if changed:
                warnings.warn(
                    f"{self.name}: adapter parameters changed while merged; unmerging with the parameters that "
                    "were merged (the new values are kept afterwards)"
                )
                for n, t in snapshot.items():
                    named[n].copy_(t)
            try:
                self._check_unmergeable()
                W = self.base_layer.weight
                new = self._to_base_layout(self._unmerged_weight()).to(W.dtype)
                if not bool(torch.isfinite(new).all()):
                    raise ValueError(f"{self.name}: the unmerged weight is not finite; unmerge refused, layer unchanged")
            finally:
                if changed:
                    for n, t in current.items():
                        named[n].copy_(t)
            W.copy_(new)
        self._merged_params = None
        self.merged = False
        return True

    def check_merge(self) -> torch.Tensor:
        """Every check :meth:`merge` makes, without changing anything; returns the weight merge would write.

        Raises ValueError naming the layer when the weight is shared (tied), an
        adapter parameter is not finite, or the merged weight is not finite in
        the base weight's dtype.
        """
        self._check_mergeable()
        self.check_parameters_finite(force=True)
        with torch.no_grad():
            W = self.base_layer.weight
            new = self._to_base_layout(self._merged_weight()).to(W.dtype)
            if not bool(torch.isfinite(new).all()):
                raise ValueError(f"{self.name}: the merged weight is not finite in {W.dtype}; merge refused, layer unchanged")
        return new

    def _check_mergeable(self):
        if self.__dict__.get("weight_is_shared", False):
            raise ValueError(
                f"{self.name}: the base weight is shared with another module (tied weights); "
                "merging would change that module too. Exclude this layer via target_modules, or untie the weights"
            )

    def _check_unmergeable(self):
        pass

    def _flat_weight(self, dtype=None) -> torch.Tensor:
        """The base weight as ``d_out x d_in`` (Conv2d flattened, Conv1D transposed), in ``dtype`` when given."""
        W = self.base_layer.weight
        W = W.transpose(0, 1) if is_conv1d(self.base_layer) else W.reshape(W.shape[0], -1)
        return W if dtype is None else W.to(dtype)

    def _to_base_layout(self, M: torch.Tensor) -> torch.Tensor:
        """A ``d_out x d_in`` matrix in the base weight's own layout (inverse of :meth:`_flat_weight`)."""
        W = self.base_layer.weight
        return M.transpose(0, 1) if is_conv1d(self.base_layer) else M.reshape(W.shape)

    def _base_forward(self, x, weight_flat, with_bias=True):
        base = self.base_layer
        bias = base.bias if with_bias else None
        if is_linear_like(base):
            return F.linear(x, weight_flat, bias)
        return base._conv_forward(x, weight_flat.reshape(base.weight.shape), bias)

    def revert(self) -> nn.Module:
        """The original base module, with its original weight (unmerging first when merged)."""
        if self.merged:
            self.unmerge()
        return self.base_layer


class OrthogonalAdapter(MergeableAdapter):
    """``nn.Linear`` / ``nn.Conv2d`` / transformers ``Conv1D`` wrapped with a learned orthogonal rotation.

    See the module docstring. ``adapter_dtype``: dtype of the rotation and scale
    parameters; None gives float32 on a float16/bfloat16 base (the optimizer
    then updates float32 numbers) and the base dtype otherwise. The output has
    the dtype the base layer alone would give (the autocast dtype under autocast).
    """

    def __init__(self, base: nn.Module, method: str = "gsoft", block_size: int = 32, n_factors: int = 2,
                 scale: bool = True, packed: bool = True, cayley: str = "exact", neumann_terms: int = 5,
                 name: str = "layer", adapter_dtype: torch.dtype | None = None):
        super().__init__()
        if method not in ORTHOGONAL_METHODS:
            raise ValueError(f"method={method!r} must be one of {ORTHOGONAL_METHODS}")
        block_size = check_int("block_size", block_size)
        n_factors = check_int("n_factors", n_factors)
        if cayley == "peft_neumann" and method != "oft":
            raise ValueError(f"{name}: cayley='peft_neumann' (PEFT OFT's series) needs method='oft', got {method!r}")
        check_orthogonal_layer(name, base, method, block_size, n_factors)
        self.base_layer = base
        self.method = method
        self.d_in, self.d_out = layer_dims(base)
        W = base.weight
        pdt = adapter_param_dtype(W.dtype, adapter_dtype)
        kw = dict(packed=packed, cayley=cayley, neumann_terms=neumann_terms, dtype=pdt, device=W.device)
        self.rotation = make_rotation(method, self.d_in, block_size, n_factors, **kw)
        self.rotation_out = GSRotation(self.d_out, block_size, **kw) if method == "double_gsoft" else None
        self.scale = nn.Parameter(torch.ones(self.d_out, dtype=pdt, device=W.device)) if scale else None
        self.merged = False
        self.name = name
        self._guard_key()
        self.rotation.factors.label = f"{name}.rotation"
        if self.rotation_out is not None:
            self.rotation_out.factors.label = f"{name}.rotation_out"

    # y = s * Q_out(W (Q_in x)) + c
    def _training_blocks(self):
        """The blocks of every rotation for one forward, with the device-side checks (no host sync)."""
        rotations = self._rotations()
        computed = _blocks_batched([r.factors for r in rotations])
        series = [(r.factors, err) for r, (_, err) in zip(rotations, computed) if err is not None]
        if self.check_parameters_finite(series=series):
            computed = _blocks_batched([r.factors for r in rotations])
        blocks = [Q for Q, _ in computed]
        return blocks[0], (blocks[1] if len(blocks) > 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.merged:
            return self.base_layer(x)
        B_in, B_out = self._training_blocks()
        base = self.base_layer
        if is_linear_like(base):
            # blocks are built in the parameters' dtype (float32 on a half-precision model), used in x's dtype
            y = F.linear(self.rotation.rotate(x, B_in.to(x.dtype)), self._flat_weight())
            if self.rotation_out is not None:
                y = self.rotation_out.rotate(y, B_out.to(y.dtype))
            if self.scale is not None:
                s = self.scale.to(y.dtype)
                if base.bias is not None:  # s * y + c in one pass
                    return torch.addcmul(base.bias.to(y.dtype), y, s)
                return y * s
            return y if base.bias is None else y + base.bias.to(y.dtype)
        return self._base_forward(x, self.adapted_weight(blocks=(B_in, B_out)).to(base.weight.dtype))

    def adapted_weight(self, dtype=None, blocks=None) -> torch.Tensor:
        """``diag(s) Q_out W Q_in`` with W flattened to (out, d_in); in ``dtype`` when given (e.g. float64).

        Without ``dtype`` it is computed in the wider of the base weight's and the parameters' dtypes.
        ``blocks=(B_in, B_out)``: the rotations' blocks already computed for this forward.
        """
        if dtype is None:
            dtype = torch.promote_types(self.base_layer.weight.dtype, self._param_dtype())
        W = self._flat_weight(dtype)
        if blocks is None:
            B_in = self.rotation.blocks(dtype)
            B_out = self.rotation_out.blocks(dtype) if self.rotation_out is not None else None
        else:
            B_in, B_out = (None if B is None else B.to(dtype) for B in blocks)
        M = self.rotation.rotate(W, B_in, transpose=True)  # rows of W Q = (Q^T w_i)^T
        if self.rotation_out is not None:
            M = self.rotation_out.rotate(M.transpose(0, 1), B_out).transpose(0, 1)  # Q_out M
        if self.scale is not None:
            s = self.scale if dtype is None else self.scale.to(dtype)
            M = M * s[:, None]
        return M

    def _merged_weight(self):
        return self.adapted_weight(torch.float64)

    def _check_unmergeable(self):
        if self.scale is None:
            return
        snapshot = getattr(self, "_merged_params", None) if self.merged else None
        scale = snapshot["scale"].to(self.scale) if snapshot else self.scale  # the scale that was merged
        if bool((scale == 0).any()):
            idx = torch.nonzero(scale == 0).flatten()[:5].tolist()
            raise ValueError(
                f"{self.name}: cannot unmerge: scale has zero entries (indices {idx}); diag(s) is not invertible"
            )

    def _unmerged_weight(self):
        f64 = torch.float64
        M = self._flat_weight(f64)
        if self.scale is not None:
            M = M / self.scale.to(f64)[:, None]
        if self.rotation_out is not None:
            Bo = self.rotation_out.blocks(f64)
            M = self.rotation_out.rotate(M.transpose(0, 1), Bo, transpose=True).transpose(0, 1)  # Q_out^T M
        if self.rotation.factors.cayley == "peft_neumann":  # PEFT's series is not orthogonal: undo W Q with Q^{-1}
            return self.rotation.rotate(M, torch.linalg.inv(self.rotation.blocks(f64)), transpose=True)
        return self.rotation.rotate(M, self.rotation.blocks(f64))  # rows of M Q^T = (Q m_i)^T

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
    "check_orthogonal_layer", "fit_block_size", "adapter_param_dtype", "conv1d_type", "is_linear_like",
    "supported_layer", "ORTHOGONAL_METHODS",
]

"""Packed skew parameters -> orthogonal Cayley blocks, with the Cayley–Neumann policy (SPEC "Orthogonal blocks").

:class:`CayleyBlocks` holds ``n`` stacks of ``r`` skew-symmetric ``b x b``
matrices ``K`` and returns the orthogonal blocks ``(I + K)(I - K)^{-1}``.

Skew parameters: ``packed=True`` stores the ``b(b-1)/2`` free numbers of each
block (strict upper triangle, row major, as :func:`gsops.ops.skew`);
``packed=False`` stores a full ``b x b`` tensor ``A`` with ``K = A - A^T``; the
GSOFT paper's code and PEFT's BOFT build ``K = 0.5 (A - A^T)`` instead, so the
same ``K`` needs ``A_gsops = 0.5 A`` (:mod:`gsops.adapters.convert`). The
parameters start at zero, so every block starts as ``I``.

Cayley–Neumann (``cayley="neumann"``, ``t = neumann_terms``) is OFTv2's series,
valid only while ``||K||_2`` is well below 1 (SPEC). Each forward measures, on
the device, the orthogonality error ``max |Q^T Q - I|`` of the series' blocks
(:meth:`CayleyBlocks.blocks_and_error`, no host sync); the adapter reads it
through :mod:`gsops.nn.guard` and, once it exceeds ``NEUMANN_WARN_ERROR`` (1e-3,
gsops/tolerances.py), :meth:`CayleyBlocks.judge_series` switches the stack to
the exact Cayley transform for good and warns once, naming the layer: the run
goes on, with an orthogonal Q. On CPU the switch happens in the call that
measured the error (that call already uses the exact Q); on CUDA, read without a
sync, at the latest one call later. ``cayley="exact"`` has no such limit
(``(I - K)^{-1}`` exists for every skew K). ``cayley="peft_neumann"`` is PEFT
OFT's own series (:mod:`gsops.reference.peft_cayley`), for adapters imported
from PEFT.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from .. import ops
from ..checks import check_int, has_values
from ..ops.cayley import (cayley_packed_fits, cayley_packed_unchecked, neumann_error_bound, neumann_packed_unchecked,
                          skew_gathered, spectral_norm)
from ..reference.peft_cayley import peft_cayley_neumann
from ..tolerances import NEUMANN_WARN_ERROR

CAYLEY_METHODS = ("exact", "neumann", "peft_neumann")


def cayley_problem(cayley) -> str | None:
    """Why ``cayley`` names no Cayley transform of :data:`CAYLEY_METHODS` (None when it does)."""
    if not isinstance(cayley, str) or cayley not in CAYLEY_METHODS:
        return f"cayley={cayley!r} must be one of {CAYLEY_METHODS}"
    return None


def check_cayley(cayley) -> str:
    """``cayley`` must name a Cayley transform of :data:`CAYLEY_METHODS`; else ValueError."""
    why = cayley_problem(cayley)
    if why:
        raise ValueError(why)
    return cayley


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


class CayleyBlocks(nn.Module):
    """``n`` stacks of ``r`` orthogonal ``b x b`` Cayley blocks, parametrised by skew matrices.

    ``params`` has shape ``(n, r, b(b-1)/2)`` when packed, ``(n, r, b, b)`` when not.
    Calling the module returns the orthogonal blocks, shape ``(n, r, b, b)``.
    """

    def __init__(self, n: int, r: int, b: int, *, packed: bool = True, cayley: str = "exact",
                 neumann_terms: int = 5, dtype=None, device=None):
        super().__init__()
        self.n, self.r, self.b = check_int("n", n), check_int("r", r), check_int("b", b)
        check_cayley(cayley)
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
            return skew_gathered(p, self.b, self.skew_index, self.skew_sign)
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
        if self.cayley == "peft_neumann":  # PEFT's own series, for adapters imported from PEFT
            return peft_cayley_neumann(self.skew_matrices(dtype), self.neumann_terms), None
        one_node = self.packed and (dtype is None or dtype == self.params.dtype) and cayley_packed_fits(self.params)
        if not self.series:
            if one_node:  # skew layout and Cayley in one autograd node (the eager CPU path)
                return cayley_packed_unchecked(self.params, self.skew_index, self.skew_sign, self.b), None
            return ops.cayley_unchecked(self.skew_matrices(dtype), "exact"), None
        if one_node:
            Q = neumann_packed_unchecked(self.params, self.skew_index, self.skew_sign, self.b, self.neumann_terms)
        else:
            Q = ops.cayley_unchecked(self.skew_matrices(dtype), "neumann", self.neumann_terms)
        with torch.no_grad():
            Qd = Q.detach().flatten(0, -3)
            if Qd.numel():
                eye = torch.eye(Qd.shape[-1], dtype=Qd.dtype, device=Qd.device)
                err = torch.baddbmm(eye, Qd.transpose(-1, -2), Qd, alpha=1, beta=-1).abs().amax().double().reshape(1)
            else:
                err = Qd.new_zeros(1, dtype=torch.float64)
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


def blocks_batched(stacks: list) -> list:
    """``blocks_and_error()`` of several CayleyBlocks, with one Cayley call for all exact ones of one block size."""
    exact = [f for f in stacks if f.exact]
    if len(exact) < 2 or len({(f.b, f.params.dtype, f.packed) for f in exact}) != 1:
        return [f.blocks_and_error() for f in stacks]
    f0 = exact[0]
    if f0.packed and cayley_packed_fits(f0.params):  # skew layout and Cayley in one node
        Q = cayley_packed_unchecked(torch.cat([f.params.flatten(0, 1) for f in exact]), f0.skew_index,
                                    f0.skew_sign, f0.b)
    else:
        Q = ops.cayley_unchecked(torch.cat([f.skew_matrices().flatten(0, 1) for f in exact]), "exact")
    parts = iter(Q.split([f.n * f.r for f in exact]))
    return [(next(parts).view(f.n, f.r, f.b, f.b), None) if f.exact else f.blocks_and_error()
            for f in stacks]



__all__ = ["CAYLEY_METHODS", "CayleyBlocks", "blocks_batched", "cayley_problem", "check_cayley"]

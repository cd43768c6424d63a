"""PEFT's Cayley–Neumann series, for OFT adapters imported from PEFT (``cayley="peft_neumann"``).

PEFT's OFT layer (``use_cayley_neumann=True``, ``num_cayley_neumann_terms = t``)
replaces the exact Cayley transform by a truncated series in the skew block ``K``
that differs from OFTv2's series used by ``cayley="neumann"``: the powers
``K^1 .. K^p`` carry the coefficient 2 and the next power ``K^(p+1)`` the
coefficient 1, with ``p = max(2, t - 2)`` (so ``t = 3`` and ``t = 4`` give the same
series), and ``t <= 2`` keeps ``I`` (t = 1) or ``I + 2K`` (t = 2). This is a
measured fact of PEFT 0.18 and later; a test compares it with PEFT's layer.

With ``K`` the skew matrix of the gsops parameters, :func:`peft_cayley_neumann`
returns ``I + 2K + 2K^2 + ... + 2K^p + K^(p+1)``, which approximates gsops's
exact ``(I + K)(I - K)^{-1}``. PEFT multiplies row vectors by its matrix ``R``,
so the rotation it applies to a column vector is ``R^T``; since ``K^T = -K``,
``R(K)^T = R(-K)``: a PEFT adapter with parameters ``v`` is a gsops
``peft_neumann`` adapter with parameters ``-v`` (see
:mod:`gsops.adapters.peft_io`). The series is not orthogonal when ``||K||`` is
not small; it is evaluated as PEFT does, without a bound check, so that an
imported adapter computes exactly PEFT's function.
"""
from __future__ import annotations

import torch


def peft_cayley_neumann(K: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated Cayley series of the skew blocks ``K`` (..., b, b) with ``terms`` terms (see module docstring)."""
    if not isinstance(K, torch.Tensor) or K.dim() < 2 or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be a tensor of square blocks (..., b, b), got {getattr(K, 'shape', type(K).__name__)}")
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise ValueError(f"terms={terms!r} must be an int >= 1")
    b = K.shape[-1]
    out = torch.eye(b, dtype=K.dtype, device=K.device).expand(K.shape).clone()
    if terms == 1:
        return out
    out = out + 2.0 * K
    if terms == 2:
        return out
    last = max(2, terms - 2)          # highest power with coefficient 2
    power = K
    for _ in range(2, last + 1):
        power = power @ K
        out = out + 2.0 * power
    return out + power @ K            # K^(last+1), coefficient 1

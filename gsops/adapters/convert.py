"""Skew-block conventions of other codebases, converted exactly to gsops parameters.

The GS paper's reference code (Gorbunov et al., 2024) and PEFT's BOFT store each
Cayley block as a full ``b x b`` tensor ``A`` and build the skew matrix as
``K = 0.5 (A - A^T)``. gsops stores either the packed strict upper triangle of
``K`` (``packed=True``) or a full tensor ``A'`` with ``K = A' - A'^T``
(``packed=False``). The same ``K``, hence the same orthogonal block
``(I + K)(I - K)^{-1}``, needs

* ``packed=False``: ``A' = 0.5 A`` (exact: a power-of-two scale);
* ``packed=True``: the upper triangle of ``0.5 (A - A^T)``.

The way back, :func:`to_reference_blocks`, returns ``A = K`` for packed
parameters (``0.5 (K - K^T) = K`` for skew ``K``) and ``A = 2 A'`` otherwise.

The paper's GSOFT layer is ``Q = P^T L P R`` with ``P = perm(r, d)``, ``R``
applied first, and a per-output scale: the same structure as gsops ``gsoft``,
whose ``rotation.factors.params[0]`` is ``R`` and ``[1]`` is ``L``.
:func:`from_gs_reference_state` copies such a layer's blocks into a model
adapted with ``method="gsoft"``; map the checkpoint's own key names to the
``{"R": ..., "L": ..., "scale": ...}`` entries it expects.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .model import adapter_layers


def _check_blocks(name, A):
    if not isinstance(A, torch.Tensor) or not A.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must hold square blocks (..., b, b), got shape {tuple(A.shape)}")


def from_reference_blocks(A: torch.Tensor, *, packed: bool) -> torch.Tensor:
    """Full blocks ``A`` (..., b, b) of a ``K = 0.5 (A - A^T)`` codebase -> gsops parameters with the same ``K``."""
    _check_blocks("A", A)
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {packed!r}")
    if packed:
        return ops.unskew(0.5 * (A - A.transpose(-1, -2)))
    return 0.5 * A


def to_reference_blocks(params: torch.Tensor, b: int, *, packed: bool) -> torch.Tensor:
    """gsops parameters (packed ``(..., b(b-1)/2)`` or full ``(..., b, b)``) -> full blocks ``A`` with ``K = 0.5 (A - A^T)``."""
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {packed!r}")
    if packed:
        return ops.skew(params, b)
    _check_blocks("params", params)
    return 2 * params


def from_gs_reference_state(model: nn.Module, state: dict) -> nn.Module:
    """Copy GS-reference GSOFT blocks into ``model``'s ``gsoft`` adapters; returns ``model``.

    ``state``: ``{layer name: {"R": A_R, "L": A_L, "scale": s (optional)}}`` with
    ``A_R``, ``A_L`` of shape ``(r, b, b)`` in the reference code's convention
    (``K = 0.5 (A - A^T)``) and ``s`` of shape ``(out,)``. Every entry is checked
    (layer is a gsoft adapter, shapes, finite values) before anything is copied.
    """
    if not isinstance(state, dict) or not state:
        raise TypeError("state must be a non-empty dict {layer name: {'R': ..., 'L': ..., 'scale': ...}}")
    layers = dict(adapter_layers(model))
    plan = []
    for name, entry in state.items():
        m = layers.get(name)
        if m is None or getattr(m, "method", None) != "gsoft":
            raise ValueError(f"state[{name!r}]: the model has no gsoft adapter layer of that name")
        if not isinstance(entry, dict) or not {"R", "L"} <= set(entry) or set(entry) - {"R", "L", "scale"}:
            raise ValueError(f"state[{name!r}] must be a dict with keys 'R', 'L' and optionally 'scale'")
        f = m.rotation.factors
        for key in ("R", "L"):
            A = entry[key]
            _check_blocks(f"state[{name!r}][{key!r}]", A)
            if tuple(A.shape) != (f.r, f.b, f.b):
                raise ValueError(f"state[{name!r}][{key!r}] has shape {tuple(A.shape)}, the layer needs {(f.r, f.b, f.b)}")
        blocks = torch.stack([from_reference_blocks(entry[k], packed=f.packed) for k in ("R", "L")])
        scale = entry.get("scale")
        if scale is not None:
            if m.scale is None:
                raise ValueError(f"state[{name!r}] has a scale but the adapter has scale=False")
            if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != tuple(m.scale.shape):
                raise ValueError(f"state[{name!r}]['scale'] must have shape {tuple(m.scale.shape)}")
        for t in (blocks, scale):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"state[{name!r}] holds NaN or inf")
        plan.append((m, blocks, scale))
    with torch.no_grad():
        for m, blocks, scale in plan:
            m.rotation.factors.params.copy_(blocks.to(m.rotation.factors.params))
            if scale is not None:
                m.scale.copy_(scale.to(m.scale))
    return model


__all__ = ["from_reference_blocks", "to_reference_blocks", "from_gs_reference_state"]

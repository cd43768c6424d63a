"""One dispatch decision: the backend for an op, from ``GSOPS_BACKEND`` and the tensors.

``GSOPS_BACKEND=auto`` (default) takes, for tensors on a CUDA device, the first
of triton > cuda > torch (:data:`AUTO_ORDER_REASON` says why) whose
:func:`gsops.backends.supports` has no objection, and says once, with every
backend's reason, when it lands on the reference path; on other devices it
takes torch. A forced backend (``GSOPS_BACKEND=triton`` or :func:`use_backend`)
that cannot take the tensors raises :class:`~gsops.backends.BackendUnavailable`
with the reason, before any kernel runs. The op's backward is asked about too
when a gradient will flow, so that forward and backward run on one backend.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .. import backends
from ..flags import env_choice

_override: list[str] = []
_warned: set = set()

CHOICES = ("auto",) + backends.NAMES
AUTO_ORDER = ("triton", "cuda", "torch")
AUTO_ORDER_REASON = (
    "triton before cuda: both GS applies are one pass forward (2T, python -m perf.traffic [--backend cuda]), "
    "but the Triton kernels do the block products on tensor cores (tl.dot) where the CUDA gs_pair uses fp32 "
    "FMAs, and at b = 64 the Triton backward moves 5T where the CUDA one falls back to the two-pass "
    "kernels (10T; 3T for b <= 32); no GPU has timed both yet"
)


def requested() -> str:
    return _override[-1] if _override else env_choice("GSOPS_BACKEND", CHOICES, "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (same rules as ``GSOPS_BACKEND``)."""
    if name not in CHOICES:
        raise ValueError(f"backend={name!r} must be one of {CHOICES}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def why_not(backend: str, ops, tensors) -> str | None:
    """None when ``backend`` runs every op of ``ops`` on ``tensors``; else the first reason."""
    for op in ops:
        why = backends.supports(backend, op, *tensors)
        if why is not None:
            return why
    return None


def choose(op: str, *tensors: torch.Tensor, also=()) -> str:
    """The backend that runs ``op`` on ``tensors``; it must also run the ops in ``also``
    (``op + "_backward"`` when a gradient will be needed)."""
    ops = (op, *also)
    name = requested()
    if name != "auto":
        why = why_not(name, ops, tensors)
        if why is not None:
            raise backends.BackendUnavailable(f"GSOPS_BACKEND={name} cannot run {op}: {why}")
        return name
    if not tensors or tensors[0].device.type != "cuda":
        why = why_not("torch", ops, tensors)
        if why is not None:
            raise backends.BackendUnavailable(f"the torch backend cannot run {op}: {why}")
        return "torch"
    reasons = []
    for cand in AUTO_ORDER:
        why = why_not(cand, ops, tensors)
        if why is None:
            break
        reasons.append(f"{cand}: {why}")
    else:
        raise backends.BackendUnavailable(f"no backend runs {op}: {'; '.join(reasons)}")
    if cand == "torch" and (op, "fallback") not in _warned:
        _warned.add((op, "fallback"))
        warnings.warn(f"gsops: {op} on CUDA uses the torch reference path ({'; '.join(reasons)})")
    return cand


def for_call(op: str, *tensors: torch.Tensor) -> str:
    """:func:`choose` for a call: the backward must exist too when a gradient will flow."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return choose(op, *tensors, also=(op + "_backward",) if needs_grad else ())


def impl(op: str, backend: str):
    """The kernel of ``op`` registered by ``backend`` (loading the backend first)."""
    return backends.kernel(backend, op)

"""One dispatch: picks the backend for an op from ``GSOPS_BACKEND`` and the tensors' device.

``GSOPS_BACKEND=auto`` (default) takes the best backend that runs on the
device (triton > cuda > torch on CUDA tensors, torch on CPU; :data:`AUTO_ORDER_REASON`
says why) and says once,
with the reason, when a CUDA tensor falls back to the reference path. A forced
backend that cannot run raises :class:`~gsops.backends.BackendUnavailable`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .. import backends

_IMPLS: dict[str, dict[str, object]] = {}
_override: list[str] = []
_warned: set = set()

CHOICES = ("auto",) + backends.NAMES
AUTO_ORDER = ("triton", "cuda", "torch")
AUTO_ORDER_REASON = (
    "triton before cuda: the one-pass Triton GS apply moves the minimal activation bytes (2T forward, "
    "3-4T backward, python -m perf.traffic) where a super group fits on chip, the CUDA gs_apply is two "
    "passes forward and five kernels backward (4T, 10T); no GPU has timed both yet"
)


def register(backend: str, op: str, fn) -> None:
    _IMPLS.setdefault(op, {})[backend] = fn


def requested() -> str:
    name = _override[-1] if _override else os.environ.get("GSOPS_BACKEND", "auto").strip().lower() or "auto"
    if name not in CHOICES:
        raise ValueError(f"GSOPS_BACKEND={name!r} must be one of {CHOICES}")
    return name


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


def _has(backend: str, op: str, device: torch.device, also=()) -> tuple[bool, str]:
    ok, reason = backends.runs_on(backend, device)
    if ok:
        for name in (op, *also):
            if backend not in _IMPLS.get(name, {}):
                return False, f"the {backend} backend has no kernel for {name}"
    return ok, reason


def choose(op: str, device: torch.device, also=()) -> str:
    """The backend that runs ``op`` on ``device``; it must also have the ops in ``also``
    (e.g. ``op + "_backward"`` when a gradient will be needed), so that forward and
    backward run on the same backend."""
    name = requested()
    if name != "auto":
        ok, reason = _has(name, op, device, also)
        if not ok:
            raise backends.BackendUnavailable(f"GSOPS_BACKEND={name} cannot run {op}: {reason}")
        return name
    if device.type != "cuda":
        _has("torch", op, device, also)
        return "torch"
    reasons = []
    for cand in AUTO_ORDER:
        ok, reason = _has(cand, op, device, also)
        if ok:
            break
        reasons.append(f"{cand}: {reason}")
    if cand == "torch" and (op, "fallback") not in _warned:
        _warned.add((op, "fallback"))
        warnings.warn(f"gsops: {op} on CUDA uses the torch reference path ({'; '.join(reasons)})")
    return cand


def get(op: str, device: torch.device):
    """The implementation of ``op`` for tensors on ``device``."""
    backend = choose(op, device)  # loads the backend, which registers its kernels
    return _IMPLS[op][backend]


def impl(op: str, backend: str):
    """The implementation of ``op`` registered by ``backend`` (loading the backend first)."""
    ok, reason = backends.load(backend)
    if not ok:
        raise backends.BackendUnavailable(f"backend {backend} cannot run {op}: {reason}")
    try:
        return _IMPLS[op][backend]
    except KeyError:
        raise backends.BackendUnavailable(f"the {backend} backend has no kernel for {op}") from None

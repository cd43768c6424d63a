"""Loaders for the kernel backends, each with the reason it is not available.

``torch`` (the reference path) is always available. ``triton`` needs the
``triton`` package and either a CUDA device or ``TRITON_INTERPRET=1``.
``cuda`` needs the compiled extension ``gsops._C``; for testing without a GPU,
``GSOPS_CUDA_EMULATOR=<path>`` loads instead the same binding and kernels built
for the CPU CUDA emulator (``python csrc/emu/run.py --extension``), which then
runs ``GSOPS_BACKEND=cuda`` on CPU tensors. A backend module, once imported,
registers its implementations with :mod:`gsops.ops.dispatch`.
"""
from __future__ import annotations

import importlib
import os

import torch

NAMES = ("torch", "triton", "cuda")

_MODULES = {
    "torch": "gsops.backends.torch_backend",
    "triton": "gsops.backends.triton_backend",
    "cuda": "gsops.backends.cuda_backend",
}

_loaded: dict[str, tuple[bool, str]] = {}


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here; the message says why."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_emulated() -> bool:
    """Whether the loaded cuda backend is the CPU emulator build (GSOPS_CUDA_EMULATOR)."""
    mod = importlib.import_module(_MODULES["cuda"]) if load("cuda")[0] else None
    return bool(mod is not None and getattr(mod, "EMULATED", False))


def load(name: str) -> tuple[bool, str]:
    """Import a backend once. Returns (available, reason-or-description)."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} must be one of {NAMES}")
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            _loaded[name] = (True, getattr(mod, "DESCRIPTION", "loaded"))
        except BackendUnavailable as e:
            _loaded[name] = (False, str(e))
        except ImportError as e:
            _loaded[name] = (False, f"import failed: {e}")
    return _loaded[name]


def runs_on(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run on tensors on ``device``, and why not."""
    ok, reason = load(name)
    if not ok:
        return False, reason
    if name == "torch":
        return True, "reference path"
    if device.type == "cuda":
        return True, reason
    if name == "triton" and triton_interpret():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if name == "cuda" and device.type == "cpu" and cuda_emulated():
        return True, reason
    return False, f"the {name} backend runs on CUDA tensors, got tensors on {device}"


def status() -> dict[str, tuple[bool, str]]:
    return {n: load(n) for n in NAMES}

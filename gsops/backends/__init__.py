"""The kernel backends: their loaders, their kernel tables, and what each can run.

``torch`` (the reference path) is always available; its kernels are the
reference definitions of the ops, registered by :mod:`gsops.ops.library`.
``triton`` needs the ``triton`` package and runs on CUDA tensors, or on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1``). ``cuda`` needs
the compiled extension ``gsops._C`` and runs on tensors of the device type it
was built for (``gsops._C.device_type``, ``"cuda"``).

Each backend module declares

* ``DESCRIPTION``: one line for ``python -m gsops.info``;
* ``KERNELS``: ``{op: fn}`` for the forward ops and their ``<op>_backward`` ops
  (signatures in :mod:`gsops.ops.library`);
* ``supports(op, *tensors) -> None | str``: None when its kernel for ``op``
  takes these tensors, else the reason (device, dtype, block size).

A kernel never falls back to another backend: the dispatcher
(:mod:`gsops.ops.dispatch`) asks :func:`supports` before it chooses.
"""
from __future__ import annotations

import importlib

import torch

from ..flags import env_flag

NAMES = ("torch", "triton", "cuda")

_MODULES = {
    "torch": "gsops.backends.torch_backend",
    "triton": "gsops.backends.triton_backend",
    "cuda": "gsops.backends.cuda_backend",
}

_loaded: dict[str, tuple[bool, str]] = {}
_modules: dict = {}
_KERNELS: dict[str, dict[str, object]] = {name: {} for name in NAMES}


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here; the message says why."""


def triton_interpret() -> bool:
    return env_flag("TRITON_INTERPRET", False)


def block_size(op: str, tensors) -> int | None:
    """The block size ``b`` an op's kernel works with (None for conv_exp): the trailing size of K for
    the Cayley ops, of the blocks (the last tensor arguments) for the block products."""
    if op.startswith("conv_exp"):
        return None
    if op.startswith("cayley"):
        return tensors[0].shape[-1]
    return tensors[-1].shape[-1]


def dtype_reason(backend: str, tensors, dtypes) -> str | None:
    """None when every tensor's dtype is one of ``dtypes``; else the reason, naming the backend."""
    for t in tensors:
        if t.dtype not in dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in dtypes)
            return f"the {backend} kernels take {names}, got {t.dtype}"
    return None


def register(backend: str, op: str, fn) -> None:
    """Add ``fn`` as ``backend``'s kernel for ``op`` (the reference backend's kernels come this way)."""
    _KERNELS[backend][op] = fn


def load(name: str) -> tuple[bool, str]:
    """Import a backend once and read its kernel table. Returns (available, reason-or-description)."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} must be one of {NAMES}")
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
        except BackendUnavailable as e:
            _loaded[name] = (False, str(e))
        except ImportError as e:
            _loaded[name] = (False, f"import failed: {e}")
        else:
            _modules[name] = mod
            _KERNELS[name].update(getattr(mod, "KERNELS", {}))
            _loaded[name] = (True, getattr(mod, "DESCRIPTION", "loaded"))
    return _loaded[name]


def module(name: str):
    """The loaded backend module; :class:`BackendUnavailable` with the reason when it does not load."""
    ok, reason = load(name)
    if not ok:
        raise BackendUnavailable(f"the {name} backend is unavailable: {reason}")
    return _modules[name]


def supports(name: str, op: str, *tensors: torch.Tensor) -> str | None:
    """None when backend ``name`` loads, has a kernel for ``op`` and takes ``tensors``; else why not."""
    ok, reason = load(name)
    if not ok:
        return reason
    if op not in _KERNELS[name]:
        return f"the {name} backend has no kernel for {op}"
    return _modules[name].supports(op, *tensors)


def kernel(name: str, op: str):
    """Backend ``name``'s kernel for ``op`` (loading the backend first)."""
    ok, reason = load(name)
    if not ok:
        raise BackendUnavailable(f"backend {name} cannot run {op}: {reason}")
    try:
        return _KERNELS[name][op]
    except KeyError:
        raise BackendUnavailable(f"the {name} backend has no kernel for {op}") from None


def runs_on(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` loads and runs on tensors on ``device``, and why not."""
    ok, reason = load(name)
    if not ok:
        return False, reason
    why = _modules[name].device_reason(torch.device(device))
    return (True, reason) if why is None else (False, why)


def status() -> dict[str, tuple[bool, str]]:
    return {n: load(n) for n in NAMES}

"""The Triton backend: kernels from ``triton_kernels/`` registered with the dispatch.

Forward ops keep the dispatch contract of the reference (``x, ... -> y``).
Backward ops (names ``<op>_backward``, contract in :mod:`gsops.ops.custom`)
let the custom ops run the whole training step on this backend.  Runs on CUDA
tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
set before this module is first imported). Every op checks that its tensors share one
device (``ValueError`` naming the arguments otherwise) and launches with that CUDA device
current: Triton launches on the current device, not the tensors'.
"""
from __future__ import annotations

import functools
import inspect

import torch

from . import BackendUnavailable

try:
    import triton  # noqa: F401
except ImportError as e:
    raise BackendUnavailable(f"the triton package is not importable ({e})") from None

from gsops.triton_kernels import cayley as _cayley
from gsops.triton_kernels import gs_apply as _gs

import warnings

from .. import reference as ref
from ..checks import accumulate_dtype
from ..ops import custom, dispatch

DESCRIPTION = f"Triton {triton.__version__} kernels (gsops.triton_kernels, the triton_kernels/ folder)"

# float64 tiles of 128 x 128 need more shared memory than a GPU has (checked by compiling for
# sm_90: up to 384 KiB); smaller float64 blocks and every float32/16 size fit.
MAX_FLOAT64_BLOCK_ON_GPU = 64
_warned: set = set()


def _kernels_run(op: str, tensors, b: int) -> bool:
    """False (after a one-time warning) when auto must use the reference path; raises when forced."""
    if b <= MAX_FLOAT64_BLOCK_ON_GPU or not any(t.dtype == torch.float64 and t.is_cuda for t in tensors):
        return True
    reason = f"float64 blocks of size b={b} > {MAX_FLOAT64_BLOCK_ON_GPU} exceed the GPU's shared memory"
    if dispatch.requested() == "triton":
        raise TypeError(f"GSOPS_BACKEND=triton cannot run {op}: {reason}; use GSOPS_BACKEND=torch or auto")
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"gsops: {op} on the triton backend uses the torch reference path ({reason})")
    return False


def block_diag_mm(x, B):
    if _kernels_run("block_diag_mm", (x, B), B.shape[1]):
        return _gs.block_diag_mm(x, B)
    return ref.block_diag_mm(x, B)


def block_diag_mm_backward(grad, x, B):
    if _kernels_run("block_diag_mm_backward", (x, B), B.shape[1]):
        return _gs.block_diag_mm_backward(grad, x, B)
    return custom.block_diag_mm_backward_torch(grad, x, B)


def gs_chain(x, blocks):
    if _kernels_run("gs_chain", (x, *blocks), blocks[0].shape[1]):
        return _gs.gs_chain(x, blocks)
    return ref.gs_chain(x, blocks)


def gs_chain_backward(grad, x, blocks):
    if _kernels_run("gs_chain_backward", (x, *blocks), blocks[0].shape[1]):
        return _gs.gs_chain_backward(grad, x, blocks)
    return custom.gs_chain_backward_torch(grad, x, blocks)


def gs_apply(x, L, R):
    if _kernels_run("gs_apply", (x, L, R), R.shape[1]):
        return _gs.gs_apply(x, L, R)
    return ref.gs_apply(x, L, R)


def gs_apply_backward(grad, x, L, R):
    if _kernels_run("gs_apply_backward", (x, L, R), R.shape[1]):
        return _gs.gs_apply_backward(grad, x, L, R)
    return custom.gs_apply_backward_torch(grad, x, L, R)


def cayley_exact(K: torch.Tensor) -> torch.Tensor:
    """Q in K's dtype, computed in float32 (float64 for float64 K)."""
    if not _kernels_run("cayley_exact", (K,), K.shape[-1]):
        return ref.cayley_exact(K)
    return _cayley.cayley_exact(K.to(accumulate_dtype(K.dtype))).to(K.dtype)


def cayley_exact_backward(grad: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    if not _kernels_run("cayley_exact_backward", (Q,), Q.shape[-1]):
        return custom.cayley_exact_backward_torch(grad, Q)
    return _cayley.cayley_exact_backward(grad.to(accumulate_dtype(Q.dtype)), Q.to(accumulate_dtype(Q.dtype))).to(Q.dtype)


def cayley_neumann(K, terms):
    if _kernels_run("cayley_neumann", (K,), K.shape[-1]):
        return _cayley.cayley_neumann(K, terms)
    return ref.cayley_neumann(K, terms)


def cayley_neumann_backward(grad, K, terms):
    if _kernels_run("cayley_neumann_backward", (K,), K.shape[-1]):
        return _cayley.cayley_neumann_backward(grad, K, terms)
    return custom.cayley_neumann_backward_torch(grad, K, terms)


def _named_tensors(sig, args, kwargs):
    """(name, tensor) for every tensor argument of a call of signature ``sig``; lists as ``blocks[i]``."""
    bound = sig.bind(*args, **kwargs)
    out = []
    for name, v in bound.arguments.items():
        if isinstance(v, torch.Tensor):
            out.append((name, v))
        elif isinstance(v, (list, tuple)):
            out += [(f"{name}[{i}]", t) for i, t in enumerate(v) if isinstance(t, torch.Tensor)]
    return out


def check_one_device(op: str, named) -> torch.device | None:
    """The one device of the ``(name, tensor)`` pairs; ``ValueError`` naming the arguments otherwise."""
    if not named:
        return None
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}: "
                             f"the triton backend needs every tensor on one device")
    return first.device


def on_tensor_device(fn, op: str | None = None):
    """Wraps a launcher: checks that its tensors share one device and launches with that CUDA
    device current (Triton launches on the current device, not the tensors')."""
    op = op or fn.__name__
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = check_one_device(op, _named_tensors(sig, args, kwargs))
        if dev is None or dev.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)

    return wrapper


for _name in ("block_diag_mm", "gs_chain", "gs_apply", "cayley_exact", "cayley_neumann"):
    for _op in (_name, _name + "_backward"):
        globals()[_op] = on_tensor_device(globals()[_op], _op)
        dispatch.register("triton", _op, globals()[_op])

# --- conv_exp (GS-SOC issue): registration of triton_kernels.conv_exp goes here ---
# (the GS-SOC engineer registers it lazily from gsops/ops/conv_exp.py)

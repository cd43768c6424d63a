"""The Triton backend: the kernels of ``triton_kernels/`` and what they can take.

``KERNELS`` holds the forward ops and their ``<op>_backward`` ops with the
signatures of :mod:`gsops.ops.library`. :func:`supports` says, before any
launch, why a call cannot run here: tensors not on a CUDA device (CPU tensors
run under the Triton interpreter, ``TRITON_INTERPRET=1``, set before this
module is first imported), a dtype other than float16/bfloat16/float32/float64,
or float64 blocks larger than :data:`MAX_FLOAT64_BLOCK_ON_GPU` on a GPU. Every
kernel checks that its tensors share one device (``ValueError`` naming the
arguments otherwise) and launches with that CUDA device current: Triton
launches on the current device, not the tensors'.
"""
from __future__ import annotations

import functools
import inspect

import torch

from . import BackendUnavailable, block_size, dtype_reason, triton_interpret

try:
    import triton  # noqa: F401
except ImportError as e:
    raise BackendUnavailable(f"the triton package is not importable ({e})") from None

from gsops.triton_kernels import cayley as _cayley
from gsops.triton_kernels import conv_exp as _conv
from gsops.triton_kernels import gs_apply as _gs

from ..checks import accumulate_dtype

DESCRIPTION = f"Triton {triton.__version__} kernels (gsops.triton_kernels, the triton_kernels/ folder)"

# float64 tiles of 128 x 128 need more shared memory than a GPU has (checked by compiling for
# sm_90: up to 384 KiB); smaller float64 blocks and every float32/16 size fit.
MAX_FLOAT64_BLOCK_ON_GPU = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def device_reason(device: torch.device) -> str | None:
    """None when the kernels run on tensors on ``device``; else why not."""
    if device.type == "cuda" or triton_interpret():
        return None
    return (f"the triton backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
            f"got tensors on {device}")


def supports(op: str, *tensors: torch.Tensor) -> str | None:
    """None when the Triton kernel for ``op`` takes ``tensors``; else the reason."""
    if not tensors:
        return None
    why = device_reason(tensors[0].device) or dtype_reason("triton", tensors, DTYPES)
    if why:
        return why
    b = block_size(op, tensors)
    if (b is not None and b > MAX_FLOAT64_BLOCK_ON_GPU
            and any(t.dtype == torch.float64 and t.is_cuda for t in tensors)):
        return f"float64 blocks of size b={b} > {MAX_FLOAT64_BLOCK_ON_GPU} exceed the GPU's shared memory"
    return None


def cayley_exact(K: torch.Tensor) -> torch.Tensor:
    """Q in K's dtype, computed in float32 (float64 for float64 K)."""
    return _cayley.cayley_exact(K.to(accumulate_dtype(K.dtype))).to(K.dtype)


def cayley_exact_backward(grad: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    acc = accumulate_dtype(Q.dtype)
    return _cayley.cayley_exact_backward(grad.to(acc), Q.to(acc)).to(Q.dtype)


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


_LAUNCHERS = {
    "block_diag_mm": _gs.block_diag_mm, "block_diag_mm_backward": _gs.block_diag_mm_backward,
    "gs_chain": _gs.gs_chain, "gs_chain_backward": _gs.gs_chain_backward,
    "gs_apply": _gs.gs_apply, "gs_apply_backward": _gs.gs_apply_backward,
    "cayley_exact": cayley_exact, "cayley_exact_backward": cayley_exact_backward,
    "cayley_neumann": _cayley.cayley_neumann, "cayley_neumann_backward": _cayley.cayley_neumann_backward,
    "conv_exp": _conv.conv_exp_forward, "conv_exp_backward": _conv.conv_exp_backward,
}
KERNELS = {op: on_tensor_device(fn, op) for op, fn in _LAUNCHERS.items()}
globals().update(KERNELS)  # tb.gs_apply(...) etc.: the guarded kernels by name

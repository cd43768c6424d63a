"""The compiled CUDA extension ``gsops._C`` (kernels in ``csrc/``) registered with the dispatch.

``gsops._C`` registers ``torch.ops.gsops_cuda.*`` (see ``csrc/bindings.cpp``):

* ``block_diag_perm(x, blocks, in_mode, out_mode, transpose_blocks)``:
  ``y = P^out diag(B) P^in x`` row by row, the permutations as index arithmetic
  (mode 0: identity, 1: ``P = perm(r, d)``, 2: ``P^T``);
* ``block_diag_perm_grad_blocks(dy, x, r, b, in_mode, out_mode)``: its block
  gradient (float32), a per-block reduction over tokens;
* ``cayley_forward(K) -> (Q, M)`` and ``cayley_backward(M, G) -> dK = 2 M^T G M^T``;
* ``conv_exp_forward(x, L, terms, groups, adjoint)`` and
  ``conv_exp_weight_grad(x, dy, L, terms, groups)`` (float32).

This module composes them into the dispatch contract of :mod:`gsops.ops.custom`
(forward ops and their ``*_backward`` ops; ``conv_exp`` is an autograd
function, as in :mod:`gsops.ops.conv_exp`). The input gradient of every
block-diagonal factor is the forward kernel with transposed blocks and the
inverse permutations (STYLE habit 6).

The kernels compute in float32 and take blocks of size b <= 128. For float64
tensors or larger blocks, ``GSOPS_BACKEND=cuda`` raises; ``auto`` runs the
reference path and warns once, naming the op and the reason.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import warnings

import torch

from . import BackendUnavailable


def _load_emulated(path: str):
    """The binding and kernels built for the CPU CUDA emulator (csrc/emu), from ``path``."""
    name = os.path.basename(path).split(".")[0]
    try:
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
    except (ImportError, OSError) as e:
        raise BackendUnavailable(
            f"GSOPS_CUDA_EMULATOR={path} cannot be loaded ({e}); build it with python csrc/emu/run.py --extension"
        ) from None
    if not getattr(mod, "emulated", False):
        raise BackendUnavailable(f"GSOPS_CUDA_EMULATOR={path} is not an emulator build of csrc/bindings.cpp")
    return mod


_EMULATOR_PATH = os.environ.get("GSOPS_CUDA_EMULATOR", "")
if _EMULATOR_PATH:
    _C = _load_emulated(_EMULATOR_PATH)
else:
    try:
        from .. import _C
    except ImportError as e:  # not built: CPU torch, no nvcc, or GSOPS_SKIP_CUDA=1 at install
        raise BackendUnavailable(
            f"the CUDA extension gsops._C is not built ({e}); install on a machine with a CUDA torch and nvcc: "
            "pip install --no-build-isolation ."
        ) from None

try:
    _ops = torch.ops.gsops_cuda
    _ops.block_diag_perm  # noqa: B018  (raises when the library did not register)
except (AttributeError, RuntimeError) as e:
    raise BackendUnavailable(f"gsops._C loaded but registered no gsops_cuda ops ({e}); rebuild the extension") from None

from .. import reference as ref
from ..ops import custom, dispatch
from ..reference import conv_exp as conv_ref

EMULATED = bool(getattr(_C, "emulated", False))
DESCRIPTION = (
    f"CUDA kernels run on the CPU by the gsops CUDA emulator, for testing ({_C.__file__}, GSOPS_CUDA_EMULATOR)"
    if EMULATED
    else f"compiled CUDA kernels ({_C.__file__})"
)

MAX_BLOCK = int(_C.max_block)
NONE, P, PT = 0, 1, 2
_INVERSE = {NONE: NONE, P: PT, PT: P}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set = set()


def _unsupported(tensors, b=None):
    """Why the kernels cannot take these tensors (None when they can)."""
    for t in tensors:
        if t.dtype not in _KERNEL_DTYPES:
            return f"the CUDA kernels take float32/float16/bfloat16, got {t.dtype}"
    if b is not None and b > MAX_BLOCK:
        return f"the CUDA kernels take blocks of size b <= {MAX_BLOCK}, got b={b}"
    return None


def _outside_kernels(op: str, reason: str):
    """Forced backend: raise. auto: say once that the reference path runs instead."""
    if dispatch.requested() == "cuda":
        raise TypeError(f"GSOPS_BACKEND=cuda cannot run {op}: {reason}; use GSOPS_BACKEND=torch or auto")
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"gsops: {op} on the cuda backend uses the torch reference path ({reason})")


# ----------------------------------------------------------------------------- block-diagonal x permutation

def _factor(x: torch.Tensor, B: torch.Tensor, in_mode: int, out_mode: int, transpose: bool = False) -> torch.Tensor:
    """``P^out diag(B) P^in x`` (``diag(B)^T`` when ``transpose``) along the last dimension."""
    d = B.shape[0] * B.shape[1]
    y = _ops.block_diag_perm(x.reshape(-1, d).contiguous(), B, in_mode, out_mode, transpose)
    return y.reshape(x.shape)


def _factor_input_grad(g: torch.Tensor, B: torch.Tensor, in_mode: int, out_mode: int) -> torch.Tensor:
    """Input gradient of :func:`_factor`: the same kernel, transposed blocks, inverse permutations."""
    return _factor(g, B, _INVERSE[out_mode], _INVERSE[in_mode], transpose=True)


def _factor_block_grad(g: torch.Tensor, x: torch.Tensor, B: torch.Tensor, in_mode: int, out_mode: int):
    r, b = B.shape[0], B.shape[1]
    d = r * b
    dB = _ops.block_diag_perm_grad_blocks(
        g.to(x.dtype).reshape(-1, d).contiguous(), x.reshape(-1, d).contiguous(), r, b, in_mode, out_mode
    )
    return dB.to(B.dtype)


def block_diag_mm(x, B):
    why = _unsupported([x, B], B.shape[1])
    if why:
        _outside_kernels("block_diag_mm", why)
        return ref.block_diag_mm(x, B)
    return _factor(x, B, NONE, NONE)


def block_diag_mm_backward(grad, x, B):
    why = _unsupported([grad, x, B], B.shape[1])
    if why:
        _outside_kernels("block_diag_mm_backward", why)
        return custom.block_diag_mm_backward_torch(grad, x, B)
    g = grad.to(x.dtype)
    return _factor_input_grad(g, B, NONE, NONE), _factor_block_grad(g, x, B, NONE, NONE)


def _chain_modes(m: int):
    return [NONE if j == 0 else P for j in range(m)]  # factor j reads P y_{j-1} (j > 0), writes unpermuted


def gs_chain(x, blocks):
    blocks = list(blocks)
    why = _unsupported([x, *blocks], blocks[0].shape[1])
    if why:
        _outside_kernels("gs_chain", why)
        return ref.gs_chain(x, blocks)
    y = x
    for B, in_mode in zip(blocks, _chain_modes(len(blocks))):
        y = _factor(y, B, in_mode, NONE)
    return y


def gs_chain_backward(grad, x, blocks):
    blocks = list(blocks)
    why = _unsupported([grad, x, *blocks], blocks[0].shape[1])
    if why:
        _outside_kernels("gs_chain_backward", why)
        return custom.gs_chain_backward_torch(grad, x, blocks)
    modes = _chain_modes(len(blocks))
    inputs = [x]  # the (unpermuted) input of every factor, recomputed
    for B, in_mode in zip(blocks[:-1], modes[:-1]):
        inputs.append(_factor(inputs[-1], B, in_mode, NONE))
    g = grad.to(x.dtype)
    dBs = [None] * len(blocks)
    for j in range(len(blocks) - 1, -1, -1):
        dBs[j] = _factor_block_grad(g, inputs[j], blocks[j], modes[j], NONE)
        g = _factor_input_grad(g, blocks[j], modes[j], NONE)
    return g, dBs


def gs_apply(x, L, R):
    why = _unsupported([x, L, R], R.shape[1])
    if why:
        _outside_kernels("gs_apply", why)
        return ref.gs_apply(x, L, R)
    return _factor(_factor(x, R, NONE, NONE), L, P, PT)  # P^T L P R x: the two permutations fused into L's pass


def gs_apply_backward(grad, x, L, R):
    why = _unsupported([grad, x, L, R], R.shape[1])
    if why:
        _outside_kernels("gs_apply_backward", why)
        return custom.gs_apply_backward_torch(grad, x, L, R)
    g = grad.to(x.dtype)
    u = _factor(x, R, NONE, NONE)
    dL = _factor_block_grad(g, u, L, P, PT)
    du = _factor_input_grad(g, L, P, PT)
    dR = _factor_block_grad(du, x, R, NONE, NONE)
    return _factor_input_grad(du, R, NONE, NONE), dL, dR


# ----------------------------------------------------------------------------- Cayley

def cayley_exact(K):
    why = _unsupported([K], K.shape[-1])
    if why:
        _outside_kernels("cayley_exact", why)
        return ref.cayley_exact(K.detach())
    Q, _M = _ops.cayley_forward(K.contiguous())
    return Q


def cayley_exact_backward(grad, Q):
    why = _unsupported([grad, Q], Q.shape[-1])
    if why:
        _outside_kernels("cayley_exact_backward", why)
        return custom.cayley_exact_backward_torch(grad, Q)
    eye = torch.eye(Q.shape[-1], dtype=torch.float32, device=Q.device)
    M = ((Q.to(torch.float32) + eye) / 2).contiguous()  # the contract saves Q = 2M - I
    return _ops.cayley_backward(M, grad.to(Q.dtype).contiguous())


# ----------------------------------------------------------------------------- grouped convolution exponential

class _ConvExpCUDA(torch.autograd.Function):
    """``exp(L) x`` by the fused Taylor kernel; ``dx = exp(L^T) dy`` (same kernel, adjoint)."""

    @staticmethod
    def forward(ctx, x, L, terms, groups):
        x = x.contiguous()
        ctx.save_for_backward(x, L)
        ctx.terms, ctx.groups = terms, groups
        return _ops.conv_exp_forward(x, L, terms, groups, False)

    @staticmethod
    def backward(ctx, dy):
        x, L = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        dx = dL = None
        if ctx.needs_input_grad[0]:
            dx = _ops.conv_exp_forward(dy, L, ctx.terms, ctx.groups, True)
        if ctx.needs_input_grad[1]:
            dL = _ops.conv_exp_weight_grad(x, dy, L, ctx.terms, ctx.groups).to(L.dtype)
        return dx, dL, None, None


def conv_exp(x, L, terms, groups=1):
    why = _unsupported([x, L])
    if why:
        _outside_kernels("conv_exp", why)
        return conv_ref.conv_exp(x, L, terms, groups)
    return _ConvExpCUDA.apply(x, L, terms, groups)


# ----------------------------------------------------------------------------- fake kernels (torch.compile)

@torch.library.register_fake("gsops_cuda::block_diag_perm")
def _(x, blocks, in_mode, out_mode, transpose_blocks):
    return torch.empty_like(x)


@torch.library.register_fake("gsops_cuda::block_diag_perm_grad_blocks")
def _(dy, x, r, b, in_mode, out_mode):
    return x.new_empty((r, b, b), dtype=torch.float32)


@torch.library.register_fake("gsops_cuda::cayley_forward")
def _(K):
    return torch.empty_like(K), K.new_empty(K.shape, dtype=torch.float32)


@torch.library.register_fake("gsops_cuda::cayley_backward")
def _(M, G):
    return torch.empty_like(G)


@torch.library.register_fake("gsops_cuda::conv_exp_forward")
def _(x, weight, terms, groups, adjoint):
    return torch.empty_like(x)


@torch.library.register_fake("gsops_cuda::conv_exp_weight_grad")
def _(x, dy, weight, terms, groups):
    return weight.new_empty(weight.shape, dtype=torch.float32)


for _name, _fn in [
    ("block_diag_mm", block_diag_mm), ("block_diag_mm_backward", block_diag_mm_backward),
    ("gs_chain", gs_chain), ("gs_chain_backward", gs_chain_backward),
    ("gs_apply", gs_apply), ("gs_apply_backward", gs_apply_backward),
    ("cayley_exact", cayley_exact), ("cayley_exact_backward", cayley_exact_backward),
    ("conv_exp", conv_exp),
]:
    dispatch.register("cuda", _name, _fn)
# cayley_neumann has no CUDA kernel: GSOPS_BACKEND=cuda says so; auto takes Triton or the reference.

"""The compiled CUDA extension ``gsops._C`` (kernels in ``csrc/``) as a backend.

``gsops._C`` registers ``torch.ops.gsops_cuda.*`` (see ``csrc/bindings.cpp``):

* ``block_diag_perm(x, blocks, in_mode, out_mode, transpose_blocks)``:
  ``y = P^out diag(B) P^in x`` row by row, the permutations as index arithmetic
  (mode 0: identity, 1: ``P = perm(r, d)``, 2: ``P^T``);
* ``block_diag_perm_grad_blocks(dy, x, r, b, in_mode, out_mode)``: its block
  gradient (float32), a per-block reduction over tokens;
* ``cayley_forward(K) -> (Q, M)`` and ``cayley_backward(M, G) -> dK = 2 M^T G M^T``;
* ``conv_exp_forward(x, L, terms, groups, adjoint)`` and
  ``conv_exp_weight_grad(x, dy, L, terms, groups)`` (float32).

This module composes them into the kernel contract of :mod:`gsops.ops.library`
(``KERNELS``: forward ops and their ``*_backward`` ops). The input gradient of
every block-diagonal factor is the forward kernel with transposed blocks and
the inverse permutations (STYLE habit 6).

:func:`supports` says what the kernels take: tensors on the device type the
extension was built for (``gsops._C.device_type``, ``"cuda"``), float32,
float16 or bfloat16 (computed in float32), blocks of size ``b <= max_block``
(128). ``cayley_neumann`` has no CUDA kernel.
"""
from __future__ import annotations

import torch

from . import BackendUnavailable, block_size, dtype_reason

try:
    from gsops import _C
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

DEVICE_TYPE = str(getattr(_C, "device_type", "cuda"))
DESCRIPTION = f"compiled CUDA kernels ({getattr(_C, '__file__', _C)}, on {DEVICE_TYPE} tensors)"

MAX_BLOCK = int(_C.max_block)
NONE, P, PT = 0, 1, 2
_INVERSE = {NONE: NONE, P: PT, PT: P}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONV_EXP_KEEPS_TERMS = False  # the conv_exp backward recomputes its terms from x: the forward keeps none


def device_reason(device: torch.device) -> str | None:
    if device.type == DEVICE_TYPE:
        return None
    return f"the cuda backend runs on {DEVICE_TYPE} tensors, got tensors on {device}"


def supports(op: str, *tensors: torch.Tensor) -> str | None:
    """None when the CUDA kernel for ``op`` takes ``tensors``; else the reason."""
    if not tensors:
        return None
    why = next(filter(None, map(device_reason, (t.device for t in tensors))), None)
    why = why or dtype_reason("cuda", tensors, _KERNEL_DTYPES)
    if why:
        return why
    b = block_size(op, tensors)
    if b is not None and b > MAX_BLOCK:
        return f"the CUDA kernels take blocks of size b <= {MAX_BLOCK}, got b={b}"
    return None


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
    return _factor(x, B, NONE, NONE)


def block_diag_mm_backward(grad, x, B):
    g = grad.to(x.dtype)
    return _factor_input_grad(g, B, NONE, NONE), _factor_block_grad(g, x, B, NONE, NONE)


def _pair_supported(B: torch.Tensor) -> bool:
    return bool(_C.gs_pair_supported(B.shape[0], B.shape[1]))


def _pair(x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, linear_out: bool) -> torch.Tensor:
    """``P^T L P R x`` (``L P R x`` with ``linear_out``) in one pass (``gs_pair``)."""
    d = R.shape[0] * R.shape[1]
    return _ops.gs_pair(x.reshape(-1, d).contiguous(), R, L, linear_out, False).reshape(x.shape)


def _pair_backward(grad: torch.Tensor, x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, linear_out: bool):
    """``(dx, dL, dR)`` of :func:`_pair`, or None where no block-gradient accumulator fits on chip. One launch
    when both fit (x and dy read once, dx written once); else two (the second reads x and dy again for dR)."""
    r, b = R.shape[0], R.shape[1]
    per_launch = int(_C.gs_pair_grad_factors(r, b))
    if per_launch == 0:
        return None
    g = grad.to(x.dtype).reshape(-1, r * b).contiguous()
    x2 = x.reshape(-1, r * b).contiguous()
    if per_launch == 2:
        dx, dl, dr = _ops.gs_pair_grad(g, x2, R, L, linear_out, True, True, True)
    else:
        dx, dl, _ = _ops.gs_pair_grad(g, x2, R, L, linear_out, True, True, False)
        _, _, dr = _ops.gs_pair_grad(g, x2, R, L, linear_out, False, False, True)
    return dx.reshape(x.shape), dl.sum(0).to(L.dtype), dr.sum(0).to(R.dtype)


def _chain_modes(m: int):
    return [NONE if j == 0 else P for j in range(m)]  # factor j reads P y_{j-1} (j > 0), writes unpermuted


def _rows(x: torch.Tensor, blocks) -> torch.Tensor:
    """``B_m P ... P B_1 x`` in one pass over whole rows (``gs_chain_rows``)."""
    d = blocks[0].shape[0] * blocks[0].shape[1]
    W = torch.stack([B.to(torch.float32) for B in blocks])
    return _ops.gs_chain_rows(x.reshape(-1, d).contiguous(), W).reshape(x.shape)


def _rows_supported(B: torch.Tensor) -> bool:
    return bool(_C.gs_chain_rows_supported(B.shape[0], B.shape[1]))


def gs_chain(x, blocks):
    """Three or more factors in one pass over whole rows where a row fits on chip (``gs_chain_rows``); two in
    one pass where their groups fit (``gs_pair``); else one ``block_diag_perm`` per factor."""
    blocks = list(blocks)
    modes = _chain_modes(len(blocks))
    if len(blocks) >= 3 and _rows_supported(blocks[0]):
        return _rows(x, blocks)
    if len(blocks) >= 2 and _pair_supported(blocks[0]):
        y, start = _pair(x, blocks[0], blocks[1], True), 2
    else:
        y, start = x, 0
    for B, in_mode in zip(blocks[start:], modes[start:]):
        y = _factor(y, B, in_mode, NONE)
    return y


def _rows_backward(grad: torch.Tensor, x: torch.Tensor, blocks):
    """``(dx, [dB_1..dB_m])`` of :func:`_rows` over whole rows (``gs_chain_rows_grad``): one launch per group of
    factors whose block-gradient accumulators fit on chip together (x and dy read once per launch, dx written by
    the first); None where not even one fits."""
    r, b = blocks[0].shape[0], blocks[0].shape[1]
    m = len(blocks)
    per = int(_C.gs_chain_rows_grad_factors(r, b, m))
    if per == 0:
        return None
    d = r * b
    g = grad.to(x.dtype).reshape(-1, d).contiguous()
    x2 = x.reshape(-1, d).contiguous()
    W = torch.stack([B.to(torch.float32) for B in blocks])
    splits = int(_C.gs_chain_rows_grad_splits(x2.shape[0], r, b))
    dx, dBs = None, [None] * m
    for start in range(0, m, per):
        fs = range(start, min(start + per, m))
        got, part = _ops.gs_chain_rows_grad(g, x2, W, sum(1 << f for f in fs), start == 0, splits)
        dx = got if start == 0 else dx
        for k, f in enumerate(fs):
            dBs[f] = part[k].sum(0).to(blocks[f].dtype)
    return dx.reshape(x.shape), dBs


def gs_chain_backward(grad, x, blocks):
    blocks = list(blocks)
    m = len(blocks)
    if m >= 3 and _rows_supported(blocks[0]):
        out = _rows_backward(grad, x, blocks)
        if out is not None:
            return out
    modes = _chain_modes(m)
    pair = m >= 2 and _pair_supported(blocks[0]) and int(_C.gs_pair_grad_factors(blocks[0].shape[0],
                                                                                   blocks[0].shape[1])) > 0
    first = 2 if pair else 0  # the factors before `first` are the pair's
    inputs = {2: _pair(x, blocks[0], blocks[1], True)} if pair and m > 2 else {0: x}
    for j in range(first + 1, m):  # the (unpermuted) input of every further factor, recomputed
        inputs[j] = _factor(inputs[j - 1], blocks[j - 1], modes[j - 1], NONE)
    g = grad.to(x.dtype)
    dBs = [None] * m
    for j in range(m - 1, first - 1, -1):
        dBs[j] = _factor_block_grad(g, inputs[j], blocks[j], modes[j], NONE)
        g = _factor_input_grad(g, blocks[j], modes[j], NONE)
    if pair:
        g, dBs[1], dBs[0] = _pair_backward(g, x, blocks[0], blocks[1], True)
    return g, dBs


def gs_apply(x, L, R):
    """``P^T L P R x``: one pass where a group fits on chip (``gs_pair``), else two ``block_diag_perm`` passes
    (the permutations fused into L's loads and stores, the intermediate ``R x`` through memory)."""
    if _pair_supported(R):
        return _pair(x, R, L, False)
    return _factor(_factor(x, R, NONE, NONE), L, P, PT)


def gs_apply_backward(grad, x, L, R):
    if _pair_supported(R):
        out = _pair_backward(grad, x, R, L, False)
        if out is not None:
            return out
    g = grad.to(x.dtype)
    u = _factor(x, R, NONE, NONE)
    dL = _factor_block_grad(g, u, L, P, PT)
    du = _factor_input_grad(g, L, P, PT)
    dR = _factor_block_grad(du, x, R, NONE, NONE)
    return _factor_input_grad(du, R, NONE, NONE), dL, dR


# ----------------------------------------------------------------------------- Cayley

def cayley_exact(K):
    Q, _M = _ops.cayley_forward(K.contiguous())
    return Q


def cayley_exact_backward(grad, Q):
    eye = torch.eye(Q.shape[-1], dtype=torch.float32, device=Q.device)
    M = ((Q.to(torch.float32) + eye) / 2).contiguous()  # the contract saves Q = 2M - I
    return _ops.cayley_backward(M, grad.to(Q.dtype).contiguous())


# ----------------------------------------------------------------------------- grouped convolution exponential

def conv_exp(x, L, terms, groups):
    """``(y, zs)``: ``exp(L) x`` by the fused Taylor kernel, and an empty ``zs`` (the backward
    recomputes the terms from ``x``)."""
    x = x.contiguous()
    y = _ops.conv_exp_forward(x, L, terms, groups, False)
    return y, x.new_empty((0,) + tuple(x.shape[1:]))


def conv_exp_backward(grad, x, L, zs, terms, groups):
    """``dx = exp(L^T) dy`` (the same kernel, adjoint) and the weight gradient kernel."""
    dy = grad.to(x.dtype).contiguous()
    x = x.contiguous()
    dx = _ops.conv_exp_forward(dy, L, terms, groups, True)
    dL = _ops.conv_exp_weight_grad(x, dy, L, terms, groups).to(L.dtype)
    return dx, dL


# ----------------------------------------------------------------------------- fake kernels (torch.compile)

@torch.library.register_fake("gsops_cuda::block_diag_perm")
def _(x, blocks, in_mode, out_mode, transpose_blocks):
    return torch.empty_like(x)


@torch.library.register_fake("gsops_cuda::block_diag_perm_grad_blocks")
def _(dy, x, r, b, in_mode, out_mode):
    return x.new_empty((r, b, b), dtype=torch.float32)


@torch.library.register_fake("gsops_cuda::gs_pair")
def _(x, R, L, linear_out, transposed):
    return torch.empty_like(x)


@torch.library.register_fake("gsops_cuda::gs_pair_grad")
def _(dy, x, R, L, linear_out, want_dx, want_l, want_r):
    r, b = R.shape[0], R.shape[1]
    splits = int(_C.gs_pair_grad_splits(x.numel() // (r * b), r, b))
    part = (splits, r, b, b)
    f32 = x.new_empty((0,), dtype=torch.float32)
    return (torch.empty_like(x) if want_dx else x.new_empty((0,)),
            f32.new_empty(part) if want_l else f32, f32.new_empty(part) if want_r else f32)


@torch.library.register_fake("gsops_cuda::gs_chain_rows")
def _(x, blocks):
    return torch.empty_like(x)


@torch.library.register_fake("gsops_cuda::gs_chain_rows_grad")
def _(dy, x, blocks, grads, want_dx, splits):
    n = bin(int(grads)).count("1")
    return (torch.empty_like(x) if want_dx else x.new_empty((0,)),
            x.new_empty((n, splits) + tuple(blocks.shape[1:]), dtype=torch.float32))


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


KERNELS = {
    "block_diag_mm": block_diag_mm, "block_diag_mm_backward": block_diag_mm_backward,
    "gs_chain": gs_chain, "gs_chain_backward": gs_chain_backward,
    "gs_apply": gs_apply, "gs_apply_backward": gs_apply_backward,
    "cayley_exact": cayley_exact, "cayley_exact_backward": cayley_exact_backward,
    "conv_exp": conv_exp, "conv_exp_backward": conv_exp_backward,
}

"""Triton kernel for the grouped convolution exponential of GS-SOC (Definition 6.1, GS paper).

One launch per Taylor term: ``z_i = (L * z_{i-1}) / i`` as a direct grouped
"same" convolution (zero padding, odd k), fused with the running sum
``y += z_i``. The reference is :func:`gsops.reference.conv_exp.conv_exp`.

Backward (reverse mode of the recursion): with ``a_T = g`` and
``a_{i-1} = g + (L^T * a_i) / i``, ``dL = sum_i conv_weight_grad(z_{i-1}, a_i / i)``
and ``dx = a_0``; ``L^T`` is ``ConvTranspose(L)`` per group, so the adjoint
steps reuse the same kernel. The weight gradient (a correlation of two
activations) is one ``torch.nn.grad.conv2d_weight`` over the terms stacked
along the batch. :func:`conv_exp_forward` and :func:`conv_exp_backward` are the
kernels of the ``gsops::conv_exp`` custom op (autograd lives there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_exp_step_kernel(z_ptr, w_ptr, out_ptr, acc_ptr, C, H, W, scale,
                          CG: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # out = scale * conv_grouped(z, w); acc += out.  Grid: (N*C, cdiv(H*W, BLOCK)).
    # Element offsets are int64: N*C*H*W may exceed 2^31 (the plane index times H*W alone does).
    pid_nc = tl.program_id(0).to(tl.int64)
    pid_hw = tl.program_id(1)
    n = pid_nc // C
    co = pid_nc % C
    g = co // CG
    offs = pid_hw * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    h = offs // W
    w = offs % W
    total = tl.zeros([BLOCK], dtype=ACC)
    for ci in range(CG):
        cin = g * CG + ci
        base = (n * C + cin) * H
        for kh in tl.static_range(K):
            hh = h + (kh - K // 2)
            okh = mask & (hh >= 0) & (hh < H)
            for kw in tl.static_range(K):
                ww = w + (kw - K // 2)
                ok = okh & (ww >= 0) & (ww < W)
                v = tl.load(z_ptr + (base + hh) * W + ww, mask=ok, other=0.0)
                wt = tl.load(w_ptr + ((co * CG + ci) * K + kh) * K + kw)
                total += v.to(ACC) * wt.to(ACC)
    total = total * scale
    dst = pid_nc * H * W + offs
    tl.store(out_ptr + dst, total.to(out_ptr.dtype.element_ty), mask=mask)
    prev = tl.load(acc_ptr + dst, mask=mask, other=0.0)
    tl.store(acc_ptr + dst, (prev.to(ACC) + total).to(acc_ptr.dtype.element_ty), mask=mask)


def _step(z: torch.Tensor, w: torch.Tensor, acc: torch.Tensor, scale: float, out: torch.Tensor | None = None):
    """``out = scale * conv(z, w)`` (grouped, same padding); ``acc += out`` in place; returns ``out``
    (a fresh tensor unless ``out``, contiguous and of z's shape, is given)."""
    N, C, H, W = z.shape
    CG, K = w.shape[1], w.shape[-1]
    out = torch.empty_like(z) if out is None else out
    BLOCK = max(16, min(256, triton.next_power_of_2(H * W)))
    acc_dtype = tl.float64 if z.dtype == torch.float64 else tl.float32
    grid = (N * C, triton.cdiv(H * W, BLOCK))
    _conv_exp_step_kernel[grid](z, w, out, acc, C, H, W, float(scale), CG=CG, K=K, BLOCK=BLOCK, ACC=acc_dtype)
    return out


def _transpose_kernel(L: torch.Tensor, groups: int) -> torch.Tensor:
    C, c, kh, kw = L.shape
    return L.reshape(groups, c, c, kh, kw).transpose(1, 2).flip(-2, -1).reshape(C, c, kh, kw)


def conv_exp_forward(x: torch.Tensor, L: torch.Tensor, terms: int, groups: int = 1):
    """``(y, zs)``: ``y = sum_{i=0}^{terms} L^{*i} x / i!`` and the terms ``z_0 .. z_{T-1}`` stacked
    along the batch (the contract of :func:`gsops.ops.conv_exp.conv_exp_forward_reference`)."""
    x = x.contiguous()
    Lc = L.contiguous()
    n = x.shape[0]
    zs = x.new_empty((terms * n,) + tuple(x.shape[1:]))
    y = x.clone()
    if terms:
        zs[:n].copy_(x)
    z = x
    for i in range(1, terms + 1):
        z = _step(z, Lc, y, 1.0 / i, out=zs[i * n:(i + 1) * n] if i < terms else None)
    return y, zs


def conv_exp_backward(grad: torch.Tensor, x: torch.Tensor, L: torch.Tensor, zs: torch.Tensor, terms: int,
                      groups: int = 1):
    """``(dx, dL)`` (the formula of :func:`gsops.ops.conv_exp.conv_exp_backward_reference`): the adjoint
    steps ``a_{i-1} = g + (L^T * a_i) / i`` by the forward kernel with ``ConvTranspose(L)``, then one
    weight-gradient convolution over the stacked terms."""
    g = grad.contiguous()
    Lc = L.contiguous()
    if terms == 0:
        return g.clone(), torch.zeros_like(Lc)
    LT = _transpose_kernel(Lc, groups).contiguous()
    pad = Lc.shape[-1] // 2
    n = g.shape[0]
    scaled = g.new_empty(zs.shape)  # a_i / i, stacked like zs
    a = g
    for i in range(terms, 0, -1):
        torch.div(a, i, out=scaled[(i - 1) * n:i * n])  # gradient at the output of step i
        prev = g.clone()
        _step(a, LT, prev, 1.0 / i)  # prev = g + (L^T * a_i) / i
        a = prev
    dL = torch.nn.grad.conv2d_weight(zs, Lc.shape, scaled, padding=pad, groups=groups)
    return a, dL

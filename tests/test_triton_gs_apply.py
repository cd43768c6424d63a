"""Triton fused GS kernels (triton_kernels/gs_apply.py) through the public ops, forced backend "triton".

Oracles: dense float64 matrices built with explicit loops (tests/dense.py) for values and input
gradients; the pure-torch reference differentiated by torch autograd for block gradients;
``gradcheck`` (finite differences) in float64 on tiny shapes.  On CPU this runs the Triton
interpreter (tests/conftest.py), so shapes stay small.
"""
import numpy as np
import pytest
import torch

import gsops
from gsops import reference as ref
from gsops.tolerances import tol

from dense import block_diag, gs_chain_matrix, gsoft_matrix, np64
from triton_checks import assert_triton_gs_apply_matches_reference

pytest.importorskip("triton")

# (b, r, tokens): b < 16 packs several blocks per tile; 130 tokens > one interpreter tile (128)
SHAPES = [(1, 5, 7), (2, 3, 130), (3, 4, 9), (8, 3, 33), (16, 3, 17), (32, 2, 5)]


def _orth_blocks(r, b, dtype=torch.float64):
    return torch.linalg.qr(torch.randn(r, b, b, dtype=torch.float64))[0].to(dtype)


def _dense_apply(A, x):
    """``x @ A^T`` in float64 on x's device (A a numpy matrix)."""
    return torch.from_numpy(np64(x) @ A.T).to(x.device)


def _on(device, *ts):
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("b,r,n", SHAPES)
def test_gs_apply_matches_dense_float64(b, r, n, device):
    L, R = torch.randn(r, b, b, dtype=torch.float64), torch.randn(r, b, b, dtype=torch.float64)
    x = torch.randn(n, r * b, dtype=torch.float64)
    x, L, R = _on(device, x, L, R)
    with gsops.use_backend("triton"):
        y = gsops.gs_apply(x, L, R)
    A = gsoft_matrix(np64(L), np64(R))
    torch.testing.assert_close(y, _dense_apply(A, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,r,n", SHAPES)
def test_gs_apply_backward_float32(b, r, n, device):
    L, R = _orth_blocks(r, b, torch.float32), _orth_blocks(r, b, torch.float32)
    x = torch.randn(n, r * b)
    g = torch.randn(n, r * b)
    x, g, L, R = _on(device, x, g, L, R)
    leaves = [t.clone().requires_grad_() for t in (x, L, R)]
    with gsops.use_backend("triton"):
        y = gsops.gs_apply(*leaves)
    y.backward(g)
    A = gsoft_matrix(np64(L), np64(R))
    torch.testing.assert_close(y.detach(), _dense_apply(A, x).float(), **tol(torch.float32))
    # dx = A^T g (dense float64 oracle)
    torch.testing.assert_close(leaves[0].grad, _dense_apply(A.T, g).float(), **tol(torch.float32))
    ref_leaves = [t.clone().requires_grad_() for t in (x, L, R)]
    ref.gs_apply(*ref_leaves).backward(g)
    for mine, theirs in zip(leaves[1:], ref_leaves[1:]):
        torch.testing.assert_close(mine.grad, theirs.grad, **tol(torch.float32))


@pytest.mark.parametrize("b,r,n", [(1, 4, 5), (3, 2, 7), (16, 2, 19), (32, 2, 3)])
def test_gs_chain_three_factors(b, r, n, device):
    blocks = _on(device, *[torch.randn(r, b, b, dtype=torch.float64) for _ in range(3)])
    x = torch.randn(n, r * b, dtype=torch.float64).to(device)
    g = torch.randn(n, r * b, dtype=torch.float64).to(device)
    leaves = [x.clone().requires_grad_()] + [B.clone().requires_grad_() for B in blocks]
    with gsops.use_backend("triton"):
        y = gsops.gs_chain(leaves[0], leaves[1:])
    y.backward(g)
    A = gs_chain_matrix([np64(B) for B in blocks])
    torch.testing.assert_close(y.detach(), _dense_apply(A, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaves[0].grad, _dense_apply(A.T, g), rtol=1e-12, atol=1e-12)
    ref_leaves = [t.clone().requires_grad_() for t in [x] + blocks]
    ref.gs_chain(ref_leaves[0], ref_leaves[1:]).backward(g)
    for mine, theirs in zip(leaves[1:], ref_leaves[1:]):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,r", [(1, 6), (3, 5), (8, 2), (32, 1)])
def test_block_diag_mm_forward_backward(b, r, device):
    B = torch.randn(r, b, b, dtype=torch.float64).to(device).requires_grad_()
    x = torch.randn(2, 3, r * b, dtype=torch.float64).to(device).requires_grad_()  # leading batch shape
    g = torch.randn(2, 3, r * b, dtype=torch.float64).to(device)
    with gsops.use_backend("triton"):
        y = gsops.block_diag_mm(x, B)
    y.backward(g)
    D = block_diag(np64(B))
    torch.testing.assert_close(y.detach(), _dense_apply(D, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, _dense_apply(D.T, g), rtol=1e-12, atol=1e-12)
    dB = np.zeros((r, b, b))  # sum over tokens of g_p x_p^T, by loops
    gn, xn = np64(g).reshape(-1, r * b), np64(x).reshape(-1, r * b)
    for p in range(r):
        for i in range(b):
            for q in range(b):
                dB[p, i, q] = (gn[:, p * b + i] * xn[:, p * b + q]).sum()
    torch.testing.assert_close(B.grad.cpu(), torch.from_numpy(dB), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,r", [(24, 5), (20, 5), (12, 3), (3, 7)])
def test_block_diag_mm_packed_tiles(dtype, b, r, device):
    """Blocks whose runs are not whole 32-byte sectors share a tile, ``G`` consecutive blocks as one run (b = 24
    in half precision: two blocks, 96 bytes, per 64-wide tile); ``r`` is not a multiple of ``G`` (a partial last
    group) and 130 tokens are two interpreter tiles. Against the dense float64 product of the rounded inputs."""
    from gsops.triton_kernels import gs_apply as G

    esize = torch.empty(0, dtype=dtype).element_size()
    bb, g, tile = G._tiling(b, esize, linear=True)
    if (b * esize) % 32:  # packed, the last group partial
        assert bb == b and (g * b * esize) % 32 == 0 and g * b <= tile and r % g
    else:  # whole sectors already (b = 24 in float32: 96 bytes): padded
        assert bb == G.triton.next_power_of_2(b)
    assert G._tiling(b, esize, linear=False)[0] == G.triton.next_power_of_2(b)  # a permuted side stays padded
    B = (torch.randn(r, b, b) / b ** 0.5).to(dtype).to(device).requires_grad_()
    x = torch.randn(130, r * b).to(dtype).to(device).requires_grad_()
    gy = torch.randn(130, r * b).to(dtype).to(device)
    with gsops.use_backend("triton"):
        y = gsops.block_diag_mm(x, B)
    y.backward(gy)
    D = block_diag(np64(B.detach()))
    t = tol(dtype)
    torch.testing.assert_close(y.detach().double(), _dense_apply(D, x.detach()), **t)
    torch.testing.assert_close(x.grad.double(), _dense_apply(D.T, gy), **t)
    gn, xn = np64(gy).reshape(-1, r, b), np64(x.detach()).reshape(-1, r, b)
    dB = torch.from_numpy(np.einsum("npi,npq->piq", gn, xn))
    torch.testing.assert_close(B.grad.double().cpu(), dB, rtol=t["rtol"], atol=t["atol"] * 130 ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,r", [(2, 4), (16, 2)])
def test_half_precision_matches_reference(dtype, b, r, device):
    L, R = _orth_blocks(r, b, dtype), _orth_blocks(r, b, dtype)
    x = torch.randn(37, r * b).to(dtype)
    g = torch.randn(37, r * b).to(dtype)
    x, g, L, R = _on(device, x, g, L, R)
    assert_triton_gs_apply_matches_reference(x, L, R, g)


def test_half_activations_with_float32_blocks(device):
    r, b = 3, 8
    L, R = _orth_blocks(r, b, torch.float32), _orth_blocks(r, b, torch.float32)
    x = torch.randn(11, r * b, dtype=torch.bfloat16)
    x, L, R = _on(device, x, L, R)
    with gsops.use_backend("triton"):
        y = gsops.gs_apply(x, L, R)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.gs_apply(x.float(), L, R), **tol(torch.bfloat16))


def test_non_contiguous_input_and_grad(device):
    r, b = 4, 3
    L, R = _on(device, torch.randn(r, b, b, dtype=torch.float64), torch.randn(r, b, b, dtype=torch.float64))
    base = torch.randn(r * b, 2 * 9, dtype=torch.float64).to(device)
    x = base.t()[::2]  # (9, d), strides (1, 18): neither row- nor column-contiguous
    assert not x.is_contiguous()
    xl = x.clone().requires_grad_()
    with gsops.use_backend("triton"):
        y = gsops.gs_apply(x, L, R)
        g = torch.randn(r * b, 9, dtype=torch.float64).to(device).t()  # non-contiguous incoming gradient
        gsops.gs_apply(xl, L, R).backward(g)
    A = gsoft_matrix(np64(L), np64(R))
    torch.testing.assert_close(y, _dense_apply(A, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xl.grad, _dense_apply(A.T, g), rtol=1e-12, atol=1e-12)


def test_batch_of_one_token_and_empty_batch(device):
    r, b = 2, 16
    L, R = _on(device, torch.randn(r, b, b, dtype=torch.float64), torch.randn(r, b, b, dtype=torch.float64))
    A = gsoft_matrix(np64(L), np64(R))
    x1 = torch.randn(1, r * b, dtype=torch.float64).to(device)
    x0 = torch.randn(0, r * b, dtype=torch.float64).to(device)
    with gsops.use_backend("triton"):
        y1 = gsops.gs_apply(x1, L, R)
        y0 = gsops.gs_apply(x0, L, R)
    torch.testing.assert_close(y1, _dense_apply(A, x1), rtol=1e-12, atol=1e-12)
    assert y0.shape == (0, r * b)


def test_gradcheck_float64_tiny(device):
    r, b = 3, 2
    x = torch.randn(2, r * b, dtype=torch.float64).to(device).requires_grad_()
    L = torch.randn(r, b, b, dtype=torch.float64).to(device).requires_grad_()
    R = torch.randn(r, b, b, dtype=torch.float64).to(device).requires_grad_()
    with gsops.use_backend("triton"):
        assert torch.autograd.gradcheck(gsops.gs_apply, (x, L, R), fast_mode=True)
        assert torch.autograd.gradcheck(lambda x, B1, B2: gsops.gs_chain(x, [B1, B2]), (x, R, L), fast_mode=True)


def test_gpu_launch_heuristics_loop_and_split(monkeypatch, device):
    """The GPU tiling (several token tiles per program, token splits for block gradients, a ragged
    last program) run under the interpreter by pretending not to interpret; float64 data keeps the
    float64 dot path."""
    import gsops.triton_kernels.gs_apply as kernels

    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    r, b, n = 1, 16, 1100  # 18 token tiles of 64: 2 tiles per program, 5 gradient splits (last one ragged)
    L, R = torch.randn(r, b, b, dtype=torch.float64), torch.randn(r, b, b, dtype=torch.float64)
    x = torch.randn(n, r * b, dtype=torch.float64)
    g = torch.randn(n, r * b, dtype=torch.float64)
    x, g, L, R = _on(device, x, g, L, R)
    leaves = [t.clone().requires_grad_() for t in (x, L, R)]
    with gsops.use_backend("triton"):
        y = gsops.gs_apply(*leaves)
    y.backward(g)
    A = gsoft_matrix(np64(L), np64(R))
    torch.testing.assert_close(y.detach(), _dense_apply(A, x), rtol=1e-12, atol=1e-12)
    ref_leaves = [t.clone().requires_grad_() for t in (x, L, R)]
    ref.gs_apply(*ref_leaves).backward(g)
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("b,r", [(64, 2), (128, 1)])
def test_large_blocks(b, r, device):
    # float64 blocks of b > 64 do not fit a GPU's shared memory (the backend says so): float32 there
    dtype = torch.float32 if device.type == "cuda" and b > 64 else torch.float64
    t = dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else tol(dtype)
    L, R = torch.randn(r, b, b, dtype=torch.float64), torch.randn(r, b, b, dtype=torch.float64)
    x = torch.randn(3, r * b, dtype=torch.float64)
    g = torch.randn(3, r * b, dtype=torch.float64)
    x, g, L, R = _on(device, x.to(dtype), g.to(dtype), L.to(dtype), R.to(dtype))
    x.requires_grad_()
    with gsops.use_backend("triton"):
        y = gsops.gs_apply(x, L, R)
    y.backward(g)
    A = gsoft_matrix(np64(L), np64(R))
    for got, want in ((y.detach(), _dense_apply(A, x)), (x.grad, _dense_apply(A.T, g))):
        scale = want.abs().max()  # randn blocks: entries up to ~b; the tolerance is relative to the largest
        torch.testing.assert_close(got.double() / scale, want / scale, **t)


def test_float64_large_blocks_on_gpu_guard():
    """float64 with b > 64 does not fit a GPU's shared memory: the triton backend's supports() says so
    (checked on meta tensors standing in for CUDA ones), and dispatch refuses a forced triton with
    that reason, so no kernel launches."""
    from gsops import backends
    from gsops.backends import triton_backend as tb

    class OnCuda(torch.Tensor):  # a meta tensor that reports a CUDA device
        @property
        def device(self):
            return torch.device("cuda")

        @property
        def is_cuda(self):
            return True

    def cuda_like(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta").as_subclass(OnCuda)

    def blocks(b, dtype):
        return cuda_like(4, 2 * b, dtype=dtype), cuda_like(2, b, b, dtype=dtype)

    assert tb.supports("gs_apply", *blocks(128, torch.float32)) is None
    assert tb.supports("gs_apply", *blocks(64, torch.float64)) is None
    assert "b=128 > 64 exceed the GPU's shared memory" in tb.supports("gs_apply", *blocks(128, torch.float64))
    assert "b=128 > 64" in tb.supports("cayley_exact_backward", cuda_like(3, 128, 128, dtype=torch.float64))
    with gsops.use_backend("triton"), pytest.raises(backends.BackendUnavailable,
                                                    match="GSOPS_BACKEND=triton cannot run gs_apply: float64"):
        gsops.ops.dispatch.choose("gs_apply", *blocks(128, torch.float64))

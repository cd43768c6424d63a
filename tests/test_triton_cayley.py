"""Triton batched Cayley kernels (triton_kernels/cayley.py) through ``gsops.cayley``, backend "triton".

Oracles: numpy float64 ``(I + K)(I - K)^{-1}`` and the Neumann series by explicit powers
(tests/dense.py style), the SPEC backward ``2 M^T G M^T`` evaluated in numpy, and
``gradcheck`` (finite differences) in float64.
"""
import numpy as np
import pytest
import torch

import gsops
from gsops import reference as ref
from gsops.tolerances import ORTHO_TOL, tol

from dense import cayley as dense_cayley, np64

pytest.importorskip("triton")

BLOCK_SIZES = [1, 2, 3, 8, 16, 32]


def _skew(shape, b, scale=1.0, dtype=torch.float64):
    A = torch.randn(*shape, b, b, dtype=torch.float64) * scale
    return (A - A.transpose(-1, -2)).to(dtype)


def _numpy_grad(K, G):
    eye = np.eye(K.shape[-1])
    M = np.linalg.inv(eye - np64(K))
    Mt = np.swapaxes(M, -1, -2)
    return torch.from_numpy(2 * Mt @ np64(G) @ Mt)


def _dense_cayley(K):
    return torch.from_numpy(dense_cayley(np64(K)))


@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_cayley_exact_float64_forward_backward(b, device):
    K = _skew((3,), b).to(device)
    G = torch.randn(3, b, b, dtype=torch.float64).to(device)
    Kl = K.clone().requires_grad_()
    with gsops.use_backend("triton"):
        Q = gsops.cayley(Kl)
    Q.backward(G)
    torch.testing.assert_close(Q.detach().cpu(), _dense_cayley(K), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(Kl.grad.cpu(), _numpy_grad(K, G), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b", [3, 16, 32])
def test_cayley_exact_float32_orthogonal_and_batched(b, device):
    K = _skew((2, 2), b, scale=2.0, dtype=torch.float32).to(device)  # leading batch shape, ||K|| > 1
    G = torch.randn(2, 2, b, b).to(device)
    Kl = K.clone().requires_grad_()
    with gsops.use_backend("triton"):
        Q = gsops.cayley(Kl)
    Q.backward(G)
    assert Q.shape == K.shape and Q.dtype == torch.float32
    Q = Q.detach().cpu()
    torch.testing.assert_close(Q.double(), _dense_cayley(K), rtol=1e-4, atol=1e-4)
    eye = torch.eye(b, dtype=torch.float64)
    err = (Q.double().transpose(-1, -2) @ Q.double() - eye).abs().max()
    assert err < ORTHO_TOL[torch.float32]
    expected = _numpy_grad(K, G)
    scale = expected.abs().max()
    torch.testing.assert_close(Kl.grad.cpu().double() / scale, expected / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cayley_exact_half_inputs(dtype, device):
    b = 8
    K = _skew((4,), b, scale=0.3, dtype=dtype).to(device)
    G = torch.randn(4, b, b).to(dtype).to(device)
    Kl = K.clone().requires_grad_()
    with gsops.use_backend("triton"):
        Q = gsops.cayley(Kl)
    Q.backward(G)
    assert Q.dtype == dtype and Kl.grad.dtype == dtype
    torch.testing.assert_close(Q.detach().cpu().double(), _dense_cayley(K), **tol(dtype))
    expected = _numpy_grad(K, G)
    scale = expected.abs().max()
    torch.testing.assert_close(Kl.grad.cpu().double() / scale, expected / scale, **tol(dtype))


def _neumann_numpy(K, terms):
    K = np64(K)
    eye = np.broadcast_to(np.eye(K.shape[-1]), K.shape)
    M, power = eye.copy(), eye.copy()
    for _ in range(terms):
        power = power @ K
        M = M + power
    return torch.from_numpy(2 * M - eye)


@pytest.mark.filterwarnings("ignore:cayley\\(method='neumann'")  # few terms: the op warns (once)
@pytest.mark.parametrize("b", [1, 3, 16, 32])
@pytest.mark.parametrize("terms", [1, 4])
def test_cayley_neumann_forward_backward(b, terms, device):
    K = _skew((3,), b)
    K = (0.4 * K / torch.linalg.matrix_norm(K, 2).clamp_min(1e-9)[:, None, None]).to(device)  # ||K|| < 1
    G = torch.randn(3, b, b, dtype=torch.float64).to(device)
    Kl = K.clone().requires_grad_()
    # the kernel itself, through the unchecked internal op (gsops.cayley may refuse terms=1 at this norm)
    Q = torch.ops.gsops.cayley_neumann(Kl, terms, "triton")
    Q.backward(G)
    torch.testing.assert_close(Q.detach().cpu(), _neumann_numpy(K, terms), rtol=1e-12, atol=1e-12)
    Kr = K.clone().requires_grad_()  # torch autograd through the reference series
    ref.cayley_neumann(Kr, terms).backward(G)
    torch.testing.assert_close(Kl.grad, Kr.grad, rtol=1e-12, atol=1e-12)


def test_cayley_gradcheck_float64(device):
    K = _skew((2,), 3, scale=0.2).to(device).requires_grad_()
    with gsops.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda K: gsops.cayley(K - K.transpose(-1, -2)), (K,), fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda K: torch.ops.gsops.cayley_neumann(K - K.transpose(-1, -2), 3, "triton"), (K,), fast_mode=True
        )


def test_cayley_identity_at_zero(device):
    K = torch.zeros(5, 4, 4, device=device)
    with gsops.use_backend("triton"):
        Q = gsops.cayley(K)
    torch.testing.assert_close(Q.cpu(), torch.eye(4).expand(5, 4, 4), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:cayley\\(method='neumann'")
def test_largest_block_and_non_contiguous_input(device):
    """b = 128 (the largest block the kernels target); K given as a transposed (non-contiguous) view.
    float64 on the CPU; float32 on a GPU (float64 blocks of b > 64 exceed its shared memory)."""
    b = 128
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    t = tol(dtype) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    K = _skew((1,), b, scale=0.05).to(device, dtype)
    Kt = K.transpose(-1, -2)  # = -K, skew, non-contiguous
    assert not Kt.is_contiguous()
    G = torch.randn(1, b, b, dtype=torch.float64).to(device, dtype)
    Kl = Kt.detach().requires_grad_()  # still the non-contiguous view
    with gsops.use_backend("triton"):
        Q = gsops.cayley(Kl)
        Q.backward(G)
        Qn = gsops.cayley(0.25 * Kt.to(torch.bfloat16), method="neumann", terms=6)
    torch.testing.assert_close(Q.detach().cpu().double(), _dense_cayley(Kt), **t)
    expected = _numpy_grad(Kt, G)
    scale = expected.abs().max()
    torch.testing.assert_close(Kl.grad.cpu().double() / scale, expected / scale,
                               **(t if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)))
    assert Qn.dtype == torch.bfloat16
    torch.testing.assert_close(Qn.cpu().double(), _neumann_numpy(0.25 * Kt.to(torch.bfloat16), 6), **tol(torch.bfloat16))

"""The eager CPU forms of the Cayley transforms (one node from packed parameters, Horner's Neumann
series) against independent float64 computations."""
import numpy as np
import pytest
import torch

from gsops.nn.cayley_param import _skew_gather
import importlib

C = importlib.import_module("gsops.ops.cayley")
from gsops.tolerances import tol

from dense import skew_from_packed


def _cayley_dense(K):
    """(I + K)(I - K)^{-1} with torch.linalg.solve in float64 (differentiable), K (..., b, b)."""
    eye = torch.eye(K.shape[-1], dtype=K.dtype)
    return torch.linalg.solve((eye - K).transpose(-1, -2), (eye + K).transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,b", [((3, 4), 8), ((2,), 5), ((1, 2), 2), ((6,), 32)])
def test_packed_cayley_node_matches_dense_float64(dtype, shape, b):
    g = torch.Generator().manual_seed(b)
    m = b * (b - 1) // 2
    p64 = (0.3 * torch.randn(*shape, m, generator=g, dtype=torch.float64)).requires_grad_()
    G = torch.randn(*shape, b, b, generator=g, dtype=torch.float64)
    K = torch.tensor(skew_from_packed(p64.detach().numpy(), b))  # numpy loops, no gsops code
    want = _cayley_dense(K)
    idx, sign = _skew_gather(b)
    p = p64.detach().to(dtype).requires_grad_()
    got = C.cayley_packed_unchecked(p, idx, sign.to(dtype), b)
    torch.testing.assert_close(got, want.to(dtype), **tol(dtype))
    # gradient: the dense formula under float64 autograd, K built from p by the same gather
    Kp = (p64.reshape(-1, m)[:, idx] * sign.double()).reshape(*shape, b, b)
    (want_dp,) = torch.autograd.grad(_cayley_dense(Kp), p64, G)
    (got_dp,) = torch.autograd.grad(got, p, G.to(dtype))
    rtol, atol = tol(dtype).values()
    torch.testing.assert_close(got_dp, want_dp.to(dtype), rtol=10 * rtol, atol=10 * atol)


@pytest.mark.parametrize("terms", [1, 2, 5, 9])
def test_horner_neumann_matches_the_series(terms):
    g = torch.Generator().manual_seed(terms)
    A = 0.1 * torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    K = (A - A.transpose(-1, -2)).requires_grad_()
    Kn = K.detach().numpy()
    series = np.broadcast_to(np.eye(6), Kn.shape).copy()
    power = series.copy()
    for _ in range(terms):
        power = power @ Kn
        series = series + power
    want = 2 * series - np.eye(6)
    got = C._cayley_neumann_eager(K, terms)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    G = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    (dK,) = torch.autograd.grad(got, K, G)
    torch.testing.assert_close(dK, C.cayley_neumann_backward_reference(G, K.detach(), terms), **tol(torch.float64))


def test_packed_node_runs_for_the_eager_torch_path_only():
    p = torch.zeros(2, 6)
    assert C.cayley_packed_fits(p)
    assert not C.cayley_packed_fits(p.half())
    assert not C.cayley_packed_fits(torch.zeros(0, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("terms", [1, 2, 5])
def test_packed_neumann_node_matches_the_series_and_its_gradient(dtype, terms):
    b, shape = 6, (2, 3)
    g = torch.Generator().manual_seed(10 + terms)
    m = b * (b - 1) // 2
    p64 = (0.1 * torch.randn(*shape, m, generator=g, dtype=torch.float64)).requires_grad_()
    G = torch.randn(*shape, b, b, generator=g, dtype=torch.float64)
    idx, sign = _skew_gather(b)
    Kp = (p64.reshape(-1, m)[:, idx] * sign.double()).reshape(*shape, b, b)
    eye = torch.eye(b, dtype=torch.float64)
    series, power = eye.expand_as(Kp), eye.expand_as(Kp)
    for _ in range(terms):  # the plain series under float64 autograd
        power = power @ Kp
        series = series + power
    want = 2 * series - eye
    (want_dp,) = torch.autograd.grad(want, p64, G)
    p = p64.detach().to(dtype).requires_grad_()
    got = C.neumann_packed_unchecked(p, idx, sign.to(dtype), b, terms)
    torch.testing.assert_close(got, want.detach().to(dtype), **tol(dtype))
    (got_dp,) = torch.autograd.grad(got, p, G.to(dtype))
    rtol, atol = tol(dtype).values()
    torch.testing.assert_close(got_dp, want_dp.to(dtype), rtol=10 * rtol, atol=10 * atol)


@pytest.mark.parametrize("series", [False, True])
def test_packed_nodes_are_twice_differentiable(series):
    b, terms = 5, 4
    g = torch.Generator().manual_seed(3)
    m = b * (b - 1) // 2
    p0 = 0.2 * torch.randn(2, m, generator=g, dtype=torch.float64)
    G = torch.randn(2, b, b, generator=g, dtype=torch.float64)
    idx, sign = _skew_gather(b)

    def ours(p):
        if series:
            return C.neumann_packed_unchecked(p, idx, sign.double(), b, terms)
        return C.cayley_packed_unchecked(p, idx, sign.double(), b)

    def ref(p):
        K = (p[:, idx] * sign.double()).view(2, b, b)
        if series:
            return C.cayley_neumann_reference(K, terms)
        return _cayley_dense(K)

    def second(fn):
        p = p0.clone().requires_grad_()
        (dp,) = torch.autograd.grad((fn(p) * G).sum(), p, create_graph=True)
        return torch.autograd.grad(dp.square().sum(), p)[0]

    torch.testing.assert_close(second(ours), second(ref), **tol(torch.float64))

import warnings

import numpy as np
import pytest
import torch

import gsops
from gsops.ops import NEUMANN_WARN_ERROR
from gsops.tolerances import ORTHO_TOL, tol
from dense import cayley as cayley_np
from dense import np64, skew_from_packed


@pytest.mark.parametrize("b", [1, 2, 3, 4, 8, 16, 32])
def test_skew_unskew(b):
    p = torch.randn(3, 2, b * (b - 1) // 2, dtype=torch.float64)
    K = gsops.skew(p, b)
    np.testing.assert_array_equal(np64(K), skew_from_packed(np64(p), b))
    assert torch.equal(gsops.unskew(K), p)


@pytest.mark.parametrize("b", [1, 2, 3, 8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cayley_exact_matches_oracle_and_is_orthogonal(b, dtype):
    K = gsops.skew(torch.randn(5, b * (b - 1) // 2, dtype=torch.float64), b)
    Q = gsops.cayley(K.to(dtype))
    torch.testing.assert_close(Q.double(), torch.from_numpy(cayley_np(np64(K))), **tol(dtype))
    err = (Q.transpose(-1, -2) @ Q - torch.eye(b, dtype=dtype)).abs().max()
    assert err < ORTHO_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cayley_half_precision(dtype):
    K = gsops.skew(0.3 * torch.randn(4, 28, dtype=torch.float64), 8)
    Q = gsops.cayley(K.to(dtype))
    assert Q.dtype == dtype
    expected = torch.from_numpy(cayley_np(np64(K.to(dtype))))
    torch.testing.assert_close(Q.double(), expected, **tol(dtype))


def test_identity_at_zero():
    K = torch.zeros(7, 6, 6)
    assert torch.equal(gsops.cayley(K), torch.eye(6).expand(7, 6, 6))
    assert torch.equal(gsops.cayley(K, method="neumann", terms=3), torch.eye(6).expand(7, 6, 6))


def test_large_skew_stays_finite_and_orthogonal():
    # ||K|| up to 1e3: the exact transform stays orthogonal (SPEC: (I - K)^-1 always exists, norm <= 1)
    K = gsops.skew(1e3 * torch.randn(4, 28, dtype=torch.float64), 8)
    Q = gsops.cayley(K)
    assert torch.isfinite(Q).all()
    assert (Q.transpose(-1, -2) @ Q - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-9


@pytest.mark.parametrize("b", [2, 3, 5])
def test_gradcheck_exact(b):
    A = torch.randn(3, b, b, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda A: gsops.cayley(A - A.transpose(-1, -2)), (A,))
    p = torch.randn(2, b * (b - 1) // 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: gsops.cayley(gsops.skew(p, b)), (p,))


def test_exact_backward_matches_autograd_through_solve():
    K = gsops.skew(torch.randn(4, 10, dtype=torch.float64), 5).requires_grad_()
    G = torch.randn(4, 5, 5, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((gsops.cayley(K) * G).sum(), K)
    eye = torch.eye(5, dtype=torch.float64)
    K2 = K.detach().clone().requires_grad_()
    Q2 = (eye + K2) @ torch.linalg.inv(eye - K2)
    (g_ref,) = torch.autograd.grad((Q2 * G).sum(), K2)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)


def test_neumann_agrees_for_small_K():
    K = gsops.skew(torch.randn(6, 28, dtype=torch.float64), 8)
    K = 0.05 * K / torch.linalg.matrix_norm(K, ord=2).amax()
    exact = gsops.cayley(K)
    for terms, bound in [(2, 1e-3), (5, 1e-7), (10, 1e-13)]:
        approx = gsops.cayley(K, method="neumann", terms=terms)
        assert (approx - exact).abs().max() < bound


def test_neumann_raises_where_series_diverges():
    K = gsops.skew(torch.randn(3, 6, dtype=torch.float64), 4)
    K = 1.5 * K / torch.linalg.matrix_norm(K, ord=2).amax()  # max ||K||_2 = 1.5
    with pytest.raises(ValueError, match="neumann.*\\|\\|K\\|\\|_2 < 1"):
        gsops.cayley(K, method="neumann")


def test_neumann_warns_once_when_inaccurate(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("gsops.ops.cayley"), "_neumann_warned", [False])
    K = gsops.skew(torch.randn(3, 6, dtype=torch.float64), 4)
    K = 0.2 * K / torch.linalg.matrix_norm(K, ord=2).amax()  # bound 2 (0.2^4) / 0.8 = 4e-3: warns, not refused
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Q = gsops.cayley(K, method="neumann", terms=3)
        gsops.cayley(K, method="neumann", terms=3)
    assert len([x for x in w if "orthogonality error" in str(x.message)]) == 1
    # and the warning is honest: Q really is that far from orthogonal
    err = (Q.transpose(-1, -2) @ Q - torch.eye(4, dtype=torch.float64)).abs().max()
    assert err > NEUMANN_WARN_ERROR / 100

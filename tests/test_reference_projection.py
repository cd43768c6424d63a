"""gs_project: Algorithm 1 of the GS paper for Q = P^T L P R."""
import numpy as np
import pytest
import torch

import gsops
from dense import gsoft_matrix, np64

SHAPES = [(4, 3), (3, 4), (8, 2), (2, 8), (6, 4), (1, 5), (5, 1), (4, 4), (3, 5)]


@pytest.mark.parametrize("r,b", SHAPES)
def test_exact_recovery_of_class_members(r, b):
    L = torch.randn(r, b, b, dtype=torch.float64)
    R = torch.randn(r, b, b, dtype=torch.float64)
    W = torch.from_numpy(gsoft_matrix(np64(L), np64(R)))
    L2, R2 = gsops.gs_project(W, b)
    np.testing.assert_allclose(gsoft_matrix(np64(L2), np64(R2)), np64(W), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("r,b", [(4, 3), (3, 4), (8, 2), (2, 4)])
def test_never_worse_than_random_members(r, b):
    d = r * b
    W = torch.randn(d, d, dtype=torch.float64)
    L, R = gsops.gs_project(W, b)
    err = np.linalg.norm(gsoft_matrix(np64(L), np64(R)) - np64(W))
    best = np.inf
    for _ in range(100):
        Lr, Rr = np.random.randn(r, b, b), np.random.randn(r, b, b)
        A = gsoft_matrix(Lr, Rr)
        # give each random member its best scalar multiple, to make the comparison harder
        c = (A * np64(W)).sum() / (A * A).sum()
        best = min(best, np.linalg.norm(c * A - np64(W)))
    assert err <= best
    # local optimality: no small perturbation of (L, R) improves the fit
    for _ in range(20):
        dL, dR = 1e-3 * np.random.randn(r, b, b), 1e-3 * np.random.randn(r, b, b)
        assert err <= np.linalg.norm(gsoft_matrix(np64(L) + dL, np64(R) + dR) - np64(W)) + 1e-12


def test_projection_is_idempotent():
    W = torch.randn(12, 12, dtype=torch.float64)
    L, R = gsops.gs_project(W, 3)
    Q1 = gsoft_matrix(np64(L), np64(R))
    L2, R2 = gsops.gs_project(torch.from_numpy(Q1), 3)
    np.testing.assert_allclose(gsoft_matrix(np64(L2), np64(R2)), Q1, rtol=1e-10, atol=1e-10)


def test_projection_of_a_dense_orthogonal_matrix_keeps_shape_and_dtype():
    W = torch.linalg.qr(torch.randn(16, 16))[0]
    L, R = gsops.gs_project(W, 4)
    assert L.shape == R.shape == (4, 4, 4) and L.dtype == torch.float32

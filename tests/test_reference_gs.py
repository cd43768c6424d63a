"""block_diag_mm, gs_chain, gs_apply, gs_dense against the loop-built float64 oracle."""
import math

import numpy as np
import pytest
import torch

import gsops
from gsops.tolerances import tol
from dense import block_diag, gs_chain_matrix, gsoft_matrix, np64

# (r, b): b in {1,2,3,4,8,16,32}, non-power-of-two r
SHAPES = [(5, 1), (3, 2), (4, 3), (1, 4), (6, 4), (3, 8), (5, 8), (2, 16), (3, 32), (7, 3)]
LEADS = [(1,), (4,), (2, 3)]  # batch 1, a batch, 3-D input


def _rand_blocks(r, b, n=1, dtype=torch.float64):
    return [torch.randn(r, b, b, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("r,b", SHAPES)
@pytest.mark.parametrize("lead", LEADS)
def test_block_diag_mm(r, b, lead):
    (B,) = _rand_blocks(r, b)
    x = torch.randn(*lead, r * b, dtype=torch.float64)
    expected = np64(x) @ block_diag(np64(B)).T
    np.testing.assert_allclose(np64(gsops.block_diag_mm(x, B)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r,b", SHAPES)
@pytest.mark.parametrize("lead", LEADS + [(0,)])
def test_block_diag_mm_bmm_and_the_unchecked_op(r, b, lead):
    """The adapters' block product (one bmm, no checks) and its gradients against the float64 oracle."""
    from gsops.ops import block_diag_mm_unchecked
    from gsops.reference.gs import block_diag_mm_bmm

    (B,) = _rand_blocks(r, b)
    x = torch.randn(*lead, r * b, dtype=torch.float64)
    dense = block_diag(np64(B))
    for fn in (block_diag_mm_bmm, block_diag_mm_unchecked):
        Bl, xl = B.clone().requires_grad_(), x.clone().requires_grad_()
        y = fn(xl, Bl)
        np.testing.assert_allclose(np64(y), np64(x) @ dense.T, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y)
        y.backward(g)
        np.testing.assert_allclose(np64(xl.grad), np64(g) @ dense, rtol=1e-12, atol=1e-12)
        dB = np.einsum("nri,nrj->rij", np64(g).reshape(-1, r, b), np64(x).reshape(-1, r, b))
        np.testing.assert_allclose(np64(Bl.grad), dB, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r,b", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gs_chain(r, b, m):
    blocks = _rand_blocks(r, b, m)
    x = torch.randn(2, 3, r * b, dtype=torch.float64)
    A = gs_chain_matrix([np64(B) for B in blocks])
    np.testing.assert_allclose(np64(gsops.gs_chain(x, blocks)), np64(x) @ A.T, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("r,b", SHAPES)
@pytest.mark.parametrize("lead", LEADS)
def test_gs_apply_and_dense(r, b, lead):
    L, R = _rand_blocks(r, b, 2)
    x = torch.randn(*lead, r * b, dtype=torch.float64)
    Q = gsoft_matrix(np64(L), np64(R))
    np.testing.assert_allclose(np64(gsops.gs_dense(L, R)), Q, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np64(gsops.gs_apply(x, L, R)), np64(x) @ Q.T, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64(dtype):
    r, b = 6, 8
    L, R = (B / math.sqrt(b) for B in _rand_blocks(r, b, 2))
    x = torch.randn(3, 5, r * b, dtype=torch.float64)
    expected = np64(x) @ gsoft_matrix(np64(L), np64(R)).T
    # the only error allowed is rounding the inputs and the output to dtype
    xs, Ls, Rs = x.to(dtype), L.to(dtype), R.to(dtype)
    y = gsops.gs_apply(xs, Ls, Rs)
    assert y.dtype == dtype
    expected_rounded = np64(xs) @ gsoft_matrix(np64(Ls), np64(Rs)).T
    torch.testing.assert_close(y.double(), torch.from_numpy(expected_rounded), **tol(dtype))
    torch.testing.assert_close(y.double(), torch.from_numpy(expected), rtol=10 * tol(dtype)["rtol"], atol=10 * tol(dtype)["atol"])


def test_non_contiguous_input():
    r, b = 4, 3
    L, R = _rand_blocks(r, b, 2)
    base = torch.randn(r * b, 7, dtype=torch.float64)
    x = base.t()  # (7, 12), non-contiguous
    assert not x.is_contiguous()
    np.testing.assert_allclose(np64(gsops.gs_apply(x, L, R)), np64(x) @ gsoft_matrix(np64(L), np64(R)).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r,b", [(3, 2), (2, 3), (4, 1)])
def test_gradcheck(r, b):
    L, R = (B.requires_grad_() for B in _rand_blocks(r, b, 2))
    x = torch.randn(2, r * b, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gsops.gs_apply, (x, L, R))
    assert torch.autograd.gradcheck(lambda x, B1, B2: gsops.gs_chain(x, [B1, B2, B1]), (x, L, R))
    assert torch.autograd.gradcheck(gsops.block_diag_mm, (x, L))


def _dense_by_theorem(r, b):
    # 1 + ceil(log_b r), computed with integers (no float log)
    m, reach = 1, 1
    while reach < r:
        reach *= b
        m += 1
    return m


@pytest.mark.parametrize("r,b", [(4, 2), (8, 2), (9, 3), (10, 3), (16, 4), (5, 4), (27, 3), (6, 2), (3, 3)])
def test_theorem2_density(r, b):
    """Theorem 2: m = 1 + ceil(log_b r) random factors give a dense matrix; m - 1 leave zeros."""
    m = _dense_by_theorem(r, b)
    eye = torch.eye(r * b, dtype=torch.float64)
    A = gsops.gs_chain(eye, _rand_blocks(r, b, m))
    assert (A.abs() > 0).all(), f"m={m} factors should be dense"
    if m > 1:
        A_fewer = gsops.gs_chain(eye, _rand_blocks(r, b, m - 1))
        assert (A_fewer == 0).any(), f"m={m - 1} factors should leave structural zeros"
    # the structure agrees with the oracle's pattern
    pattern = gs_chain_matrix([np.ones((r, b, b))] * m)
    assert (pattern > 0).all()

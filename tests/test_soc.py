"""GS-SOC layers and the grouped convolution exponential against dense float64 oracles built with loops."""
import math

import numpy as np
import pytest
import torch

import gsops
from gsops.nn.soc import MaxMin
from gsops.ops import conv_exp as cops
from gsops.reference import conv_exp as cref
from gsops.tolerances import ORTHO_TOL, tol

D = torch.float64


# ---------------------------------------------------------------- oracles (explicit loops, numpy)
def dense_conv(L, H, W, groups):
    """Matrix of the 'same' zero-padded grouped convolution with kernel L, on row-major vec(X) (C, H, W)."""
    L = L.detach().cpu().numpy().astype(np.float64)
    C, c, k, _ = L.shape
    p = k // 2
    A = np.zeros((C * H * W, C * H * W))
    for co in range(C):
        g = co // c
        for ci in range(c):
            cin = g * c + ci
            for h in range(H):
                for w in range(W):
                    for a in range(k):
                        for b in range(k):
                            h2, w2 = h + a - p, w + b - p
                            if 0 <= h2 < H and 0 <= w2 < W:
                                A[(co * H + h) * W + w, (cin * H + h2) * W + w2] += L[co, ci, a, b]
    return torch.from_numpy(A)


def shuffle_matrix(n, k):
    """Dense P of the paired permutation: P[sigma(i), i] = 1, sigma from the formula of Appendix F."""
    P = np.zeros((n, n))
    for i in range(n):
        s = ((i // 2) % k) * (n // k) + 2 * (i // (2 * k)) + (i % 2)
        P[s, i] = 1.0
    return torch.from_numpy(P)


def jacobian(f, x):
    J = torch.autograd.functional.jacobian(f, x)
    n = x.numel()
    return J.reshape(-1, n)


def ortho_err(J):
    return (J.T @ J - torch.eye(J.shape[1], dtype=J.dtype)).abs().max().item()


# ---------------------------------------------------------------- skew kernel and conv_exp
@pytest.mark.parametrize("C,groups,k", [(4, 1, 3), (6, 2, 3), (4, 2, 1), (3, 1, 5)])
def test_conv_transpose_kernel_formula_and_skew_jacobian(C, groups, k):
    M = torch.randn(C, C // groups, k, k, dtype=D)
    T = cops.conv_transpose_kernel(M, groups)
    c = C // groups
    for i in range(C):
        g = i // c
        for j in range(c):
            for a in range(k):
                for b in range(k):
                    # ConvTranspose(M)[i, j, a, b] = M[j, i, k-a-1, k-b-1] within the group
                    assert T[i, j, a, b] == M[g * c + j, i - g * c, k - a - 1, k - b - 1]
    A = dense_conv(cops.skew_kernel(M, groups), 4, 5, groups)
    assert (A + A.T).abs().max().item() < 1e-12
    assert A.abs().max().item() > 0.1  # not trivially zero


@pytest.mark.parametrize("C,groups,k,H,W", [(4, 1, 3, 4, 3), (6, 3, 3, 3, 4), (4, 2, 5, 5, 5)])
def test_conv_exp_matches_dense_series_and_matrix_exp(C, groups, k, H, W):
    L = 0.4 * cref.skew_kernel(torch.randn(C, C // groups, k, k, dtype=D), groups) / math.sqrt(C * k)
    x = torch.randn(2, C, H, W, dtype=D)
    A = dense_conv(L, H, W, groups)
    X = x.reshape(2, -1).T
    # truncated series with 3 terms: sum_{i<=3} A^i / i!
    S, P = torch.eye(A.shape[0], dtype=D), torch.eye(A.shape[0], dtype=D)
    for i in range(1, 4):
        P = P @ A / i
        S = S + P
    y3 = gsops.conv_exp(x, L, 3, groups)
    torch.testing.assert_close(y3.reshape(2, -1).T, S @ X, **tol(D))
    # many terms: the matrix exponential, which is orthogonal
    E = torch.linalg.matrix_exp(A)
    y = gsops.conv_exp(x, L, 30, groups)
    torch.testing.assert_close(y.reshape(2, -1).T, E @ X, **tol(D))
    assert ortho_err(E) < ORTHO_TOL[D]
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), **tol(D))


@pytest.mark.parametrize("groups,k,terms", [(1, 3, 4), (2, 3, 3), (2, 1, 2), (1, 5, 1)])
def test_conv_exp_backward_matches_reference_autograd_and_gradcheck(groups, k, terms):
    L = (0.3 * cref.skew_kernel(torch.randn(4, 4 // groups, k, k, dtype=D), groups)).requires_grad_()
    x = torch.randn(2, 4, 3, 5, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, L: gsops.conv_exp(x, L, terms, groups), (x, L))
    y, y_ref = gsops.conv_exp(x, L, terms, groups), cref.conv_exp(x, L, terms, groups)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, L), g), torch.autograd.grad(y_ref, (x, L), g)):
        torch.testing.assert_close(a, b, **tol(D))


def test_conv_exp_zero_terms_is_identity_and_float32_close():
    L = cref.skew_kernel(torch.randn(4, 4, 3, 3), 1) * 0.05
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(gsops.conv_exp(x, L, 0), x)
    y32 = gsops.conv_exp(x, L, 8)
    y64 = gsops.conv_exp(x.double(), L.double(), 8)
    torch.testing.assert_close(y32.double(), y64, **tol(torch.float32))


def test_conv_exp_1x1_is_exact_matrix_exp():
    C, groups = 8, 2
    L = cref.skew_kernel(torch.randn(C, C // groups, 1, 1, dtype=D), groups)
    x = torch.randn(3, C, 2, 3, dtype=D)
    A = dense_conv(L, 2, 3, groups)
    E = torch.linalg.matrix_exp(A)
    y = cops.conv_exp_1x1(x, L, groups)
    torch.testing.assert_close(y.reshape(3, -1).T, E @ x.reshape(3, -1).T, **tol(D))


def test_conv_exp_bad_arguments():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="L.shape\\[0\\]=6"):
        gsops.conv_exp(x, torch.zeros(6, 6, 3, 3), 3)
    with pytest.raises(ValueError, match="kernel size k=2 must be odd"):
        gsops.conv_exp(x, torch.zeros(4, 4, 2, 2), 3)
    with pytest.raises(ValueError, match="groups=2"):
        gsops.conv_exp(x, torch.zeros(4, 4, 3, 3), 3, groups=2)
    with pytest.raises(ValueError, match="terms=-1 must be >= 0"):
        gsops.conv_exp(x, torch.zeros(4, 4, 3, 3), -1)
    with pytest.raises(TypeError, match="same dtype"):
        gsops.conv_exp(x, torch.zeros(4, 4, 3, 3, dtype=D), 3)
    with pytest.raises(ValueError, match="must be 4-D"):
        gsops.conv_exp(x[0], torch.zeros(4, 4, 3, 3), 3)


# ---------------------------------------------------------------- SOCConv2d
@pytest.mark.parametrize("channels,groups,k,stride,hw", [(4, 1, 3, 1, 4), (6, 2, 3, 1, 3), (2, 2, 3, 2, 4), (4, 2, 1, 1, 3)])
def test_socconv_jacobian_orthogonal(channels, groups, k, stride, hw):
    layer = gsops.SOCConv2d(channels, k, groups, train_terms=5, eval_terms=30, stride=stride).double().eval()
    x = torch.randn(1, channels, hw, hw, dtype=D)
    J = jacobian(layer, x)
    assert J.shape[0] == J.shape[1]
    assert ortho_err(J) < ORTHO_TOL[D]
    # the normalised skew kernel is what SOC exponentiates: its convolution is skew
    if k > 1:
        A = dense_conv(layer.normalised_kernel(), hw // stride, hw // stride, groups)
        assert (A + A.T).abs().max().item() < 1e-12


def test_socconv_exact_1x1_is_matrix_exp_of_skew_kernel():
    layer = gsops.SOCConv2d(8, 1, 4, exact=True, bias=False).double()
    x = torch.randn(2, 8, 3, 2, dtype=D)
    E = torch.linalg.matrix_exp(dense_conv(layer.skew_kernel().detach(), 3, 2, 4))
    for mode in (layer.train, layer.eval):  # exact in training too: no series, no truncation
        mode()
        torch.testing.assert_close(layer(x).detach().reshape(2, -1).T, E @ x.reshape(2, -1).T, **tol(D))
    assert ortho_err(E) < ORTHO_TOL[D]
    with pytest.raises(ValueError, match="exact=True needs kernel_size=1"):
        gsops.SOCConv2d(8, 3, exact=True)


def test_socconv_norm_preservation_and_training_series():
    layer = gsops.SOCConv2d(8, 3, 2, train_terms=6, eval_terms=30, bias=False).double()
    x = torch.randn(5, 8, 6, 7, dtype=D)
    layer.eval()
    torch.testing.assert_close(layer(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), **tol(D))
    # in training the series is truncated (6 terms): close to, not exactly, norm preserving
    layer.train()
    ratio = layer(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert (ratio - 1).abs().max().item() < 0.05
    assert int(layer.steps) == 1


def test_socconv_channel_change_is_one_lipschitz():
    # 3 -> 8 channels (zero channels appended) and 16 -> 6 (sliced): isometric resp. contractive
    up = gsops.SOCConv2d(3, 3, 1, eval_terms=30, out_channels=8, bias=False).double().eval()
    J = jacobian(up, torch.randn(1, 3, 3, 3, dtype=D))
    assert ortho_err(J) < ORTHO_TOL[D]  # semi-orthogonal: J^T J = I
    down = gsops.SOCConv2d(4, 3, 1, eval_terms=30, out_channels=6, stride=2, bias=False).double().eval()
    J = jacobian(down, torch.randn(1, 4, 4, 4, dtype=D))
    assert torch.linalg.matrix_norm(J, 2).item() <= 1 + 1e-10


def test_socconv_bad_arguments():
    with pytest.raises(ValueError, match="groups=4 must divide"):
        gsops.SOCConv2d(6, 3, groups=4)
    with pytest.raises(ValueError, match="kernel_size=4 must be odd"):
        gsops.SOCConv2d(4, 4)
    with pytest.raises(TypeError, match="channels must be an int"):
        gsops.SOCConv2d(4.0)
    layer = gsops.SOCConv2d(4, 3, stride=2)
    with pytest.raises(ValueError, match="stride=2 must divide x.shape\\[2\\]=5"):
        layer(torch.randn(1, 4, 5, 4))
    with pytest.raises(ValueError, match="x.shape\\[1\\]=3 must equal channels=4"):
        layer(torch.randn(1, 3, 4, 4))


# ---------------------------------------------------------------- ChShuffle, GSSOC
@pytest.mark.parametrize("n,k", [(8, 2), (16, 4), (12, 3), (8, 1)])
def test_chshuffle_matches_paired_perm_loops(n, k):
    x = torch.randn(2, n, 3, 2, dtype=D)
    out = gsops.ChShuffle(n, k)(x)
    expected = torch.empty_like(x)
    for i in range(n):
        s = ((i // 2) % k) * (n // k) + 2 * (i // (2 * k)) + (i % 2)
        expected[:, s] = x[:, i]
    assert torch.equal(out, expected)


def test_chshuffle_unpaired_and_errors():
    n, k = 12, 3
    x = torch.randn(1, n, 2, 2)
    out = gsops.ChShuffle(n, k, paired=False)(x)
    for i in range(n):
        assert torch.equal(out[:, (i % k) * (n // k) + i // k], x[:, i])
    with pytest.raises(ValueError, match="groups=2 must divide channels // 2=3"):
        gsops.ChShuffle(6, 2)
    with pytest.raises(ValueError, match="x.shape\\[1\\]=4 must equal channels=8"):
        gsops.ChShuffle(8, 2)(torch.randn(1, 4, 2, 2))


@pytest.mark.parametrize("groups", [(2, 2), (4, 1), (4, None), (2, 4)])
def test_gssoc_jacobian_orthogonal(groups):
    layer = gsops.GSSOC(8, 3, groups=groups, eval_terms=30).double().eval()
    J = jacobian(layer, torch.randn(1, 8, 3, 3, dtype=D))
    assert ortho_err(J) < ORTHO_TOL[D]


def test_gssoc_is_exp2_shuffle_exp1_shuffle():
    """GSSOC == E2 P2 E1 P1 x + biases with dense exponentials and loop-built shuffles."""
    C, H, W, g1, g2 = 8, 3, 2, 2, 4
    layer = gsops.GSSOC(C, 3, groups=(g1, g2), eval_terms=30).double().eval()
    with torch.no_grad():
        layer.conv1.bias.normal_()
        layer.conv2.bias.normal_()
    x = torch.randn(2, C, H, W, dtype=D)
    hw = H * W
    P1 = torch.kron(shuffle_matrix(C, g1), torch.eye(hw, dtype=D))
    P2 = torch.kron(shuffle_matrix(C, g2), torch.eye(hw, dtype=D))
    E1 = torch.linalg.matrix_exp(dense_conv(layer.conv1.normalised_kernel().detach(), H, W, g1))
    E2 = torch.linalg.matrix_exp(dense_conv(layer.conv2.skew_kernel().detach(), H, W, g2))
    b1 = layer.conv1.bias.detach().repeat_interleave(hw)
    b2 = layer.conv2.bias.detach().repeat_interleave(hw)
    X = x.reshape(2, -1).T
    Y = E2 @ (P2 @ (E1 @ (P1 @ X) + b1[:, None])) + b2[:, None]
    torch.testing.assert_close(layer(x).detach().reshape(2, -1).T, Y, **tol(D))


def test_gssoc_bad_groups():
    with pytest.raises(ValueError, match="must be a pair"):
        gsops.GSSOC(8, 3, groups=4)
    with pytest.raises(ValueError, match="groups\\[0\\]=3 must divide"):
        gsops.GSSOC(8, 3, groups=(3, None))
    with pytest.raises(ValueError, match="groups\\[1\\]=4 must divide out_channels // 2=6"):
        gsops.GSSOC(12, 3, groups=(2, 4))


# ---------------------------------------------------------------- activations
def test_maxmin_permuted_pairs_lipschitz_and_gradient_norm():
    x = torch.randn(3, 6, 2, 2, dtype=D, requires_grad=True)
    out = gsops.MaxMinPermuted()(x)
    expected = torch.empty_like(x)
    for i in range(3):
        a, b = x[:, 2 * i], x[:, 2 * i + 1]
        expected[:, 2 * i] = torch.where(a >= b, a, b)
        expected[:, 2 * i + 1] = torch.where(a >= b, b, a)
    assert torch.equal(out, expected)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx.norm(), g.norm(), **tol(D))  # gradient norm preserving
    f = gsops.MaxMinPermuted()
    for _ in range(20):
        u, v = torch.randn(2, 4, 3, 3, dtype=D), torch.randn(2, 4, 3, 3, dtype=D)
        assert (f(u) - f(v)).norm() <= (u - v).norm() + 1e-12
    with pytest.raises(ValueError, match="must be even"):
        f(torch.randn(1, 3, 2, 2))


def test_maxmin_halves():
    x = torch.randn(2, 6, 3, dtype=D)
    out = MaxMin()(x)
    for i in range(3):
        torch.testing.assert_close(out[:, i], torch.maximum(x[:, i], x[:, i + 3]), rtol=0, atol=0)
        torch.testing.assert_close(out[:, i + 3], torch.minimum(x[:, i], x[:, i + 3]), rtol=0, atol=0)

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


# ---------------------------------------------------------------- the GS paper's grouped SOC, from its definition
def skew_by_loops(M):
    """K[i, j, a, b] = M[i, j, a, b] - M[j, i, k-1-a, k-1-b] for one group's (c, c, k, k) kernel."""
    c, _, k, _ = M.shape
    K = np.zeros(M.shape)
    for i in range(c):
        for j in range(c):
            for a in range(k):
                for b in range(k):
                    K[i, j, a, b] = M[i, j, a, b] - M[j, i, k - 1 - a, k - 1 - b]
    return K


def fantastic_four_norm(K):
    """min of the spectral norms of the four matricisations of a (out, in, h, w) kernel (SOC's bound)."""
    o, i, h, w = K.shape
    mats = [K.transpose(0, 2, 1, 3).reshape(o * h, i * w), K.transpose(0, 3, 1, 2).reshape(o * w, i * h),
            K.reshape(o, i * h * w), K.transpose(1, 0, 2, 3).reshape(i, o * h * w)]
    return min(np.linalg.norm(A, 2) for A in mats)


def paper_normalised_kernel(weight, groups, correction):
    """Each group's skew kernel divided by that group's own bound, times the correction (numpy, float64)."""
    W = weight.detach().cpu().numpy().astype(np.float64)
    c = W.shape[1]
    out = np.zeros(W.shape)
    for g in range(groups):
        K = skew_by_loops(W[g * c:(g + 1) * c])
        out[g * c:(g + 1) * c] = correction * K / fantastic_four_norm(K)
    return torch.from_numpy(out)


def space_to_depth_matrix(C, H, W, s):
    """Dense S: channel c*s*s + a*s + b, pixel (i, j) of the output holds input pixel (s*i + a, s*j + b)."""
    Ho, Wo = H // s, W // s
    S = np.zeros((C * s * s * Ho * Wo, C * H * W))
    for c in range(C):
        for a in range(s):
            for b in range(s):
                for i in range(Ho):
                    for j in range(Wo):
                        S[(((c * s + a) * s + b) * Ho + i) * Wo + j, (c * H + s * i + a) * W + s * j + b] = 1.0
    return torch.from_numpy(S)


def _converge_bounds(layer):
    """Run the layer's power iteration to convergence, so its bounds equal the exact norms (SVD) of the oracle."""
    L = cops.skew_kernel(layer.weight.detach(), layer.groups)
    us, vs = layer._vectors()
    cops.power_iterate(L, layer.groups, us, vs, 500)


@pytest.mark.parametrize("channels,groups", [(8, 2), (8, 4), (12, 3)])
def test_grouped_soc_normalises_each_group_by_its_own_bound(channels, groups):
    torch.manual_seed(3)
    layer = gsops.SOCConv2d(channels, 3, groups, eval_terms=40, bias=False).double().eval()
    with torch.no_grad():  # groups of different sizes: one shared bound would shrink all but the largest
        for g in range(groups):
            layer.weight[g * channels // groups:(g + 1) * channels // groups] *= 0.5 + g
    _converge_bounds(layer)
    H, W = 4, 3
    x = torch.randn(2, channels, H, W, dtype=D)
    Ln = paper_normalised_kernel(layer.weight, groups, 0.7)
    E = torch.linalg.matrix_exp(dense_conv(Ln, H, W, groups))
    expected = (E @ x.reshape(2, -1).T).T.reshape(x.shape)
    torch.testing.assert_close(layer.normalised_kernel().detach(), Ln, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-8, atol=1e-8)
    # the bound of the largest group for every group is a different map: the check can tell them apart
    c = channels // groups
    bounds = [fantastic_four_norm(skew_by_loops(layer.weight.detach()[g * c:(g + 1) * c].numpy())) for g in range(groups)]
    E_max = torch.linalg.matrix_exp(dense_conv(0.7 * cops.skew_kernel(layer.weight.detach(), groups) / max(bounds),
                                               H, W, groups))
    assert ((E_max - E) @ x.reshape(2, -1).T).abs().max().item() > 1e-2


def _gssoc_by_definition(layer, x, stride, shuffle_input):
    """E2 P2 (slice(E1 pad(S (P1 x))) + b1) + b2 with dense float64 matrices; P1 on the raw input channels."""
    N, C, H, W = x.shape
    g1, g2 = layer.groups
    c1 = layer.conv1
    Ho, Wo = H // stride, W // stride
    hw = Ho * Wo
    X = x.reshape(N, -1).T
    if shuffle_input:
        X = torch.kron(shuffle_matrix(C, g1), torch.eye(H * W, dtype=D)) @ X
    X = space_to_depth_matrix(C, H, W, stride) @ X
    work, out = c1.work, c1.out_channels
    X = torch.cat((X, torch.zeros((work - C * stride ** 2) * hw, N, dtype=D)))  # zero channels
    E1 = torch.linalg.matrix_exp(dense_conv(paper_normalised_kernel(c1.weight, g1, 0.7), Ho, Wo, g1))
    Y = (E1 @ X)[: out * hw] + c1.bias.detach().repeat_interleave(hw)[:, None]
    if g2 is not None:
        P2 = torch.kron(shuffle_matrix(out, g2), torch.eye(hw, dtype=D))
        E2 = torch.linalg.matrix_exp(dense_conv(layer.conv2.skew_kernel().detach(), Ho, Wo, g2))
        Y = E2 @ (P2 @ Y) + layer.conv2.bias.detach().repeat_interleave(hw)[:, None]
    return Y.T.reshape(N, out, Ho, Wo)


@pytest.mark.parametrize("channels,groups,stride,out_channels,shuffled", [
    (4, (2, None), 2, None, True),   # strided: shuffle before space-to-depth
    (4, (2, 2), 1, 8, True),         # zero channels appended after the shuffle
    (3, (4, None), 1, 8, False),     # 3 channels, 4 groups: no input shuffle (as the paper's code)
    (4, (2, 4), 2, 8, True),         # strided, sliced to fewer channels, second exponential
])
def test_gssoc_shuffles_input_channels_before_space_to_depth(channels, groups, stride, out_channels, shuffled):
    torch.manual_seed(5)
    layer = gsops.GSSOC(channels, 3, groups=groups, eval_terms=40, stride=stride, out_channels=out_channels)
    layer = layer.double().eval()
    assert isinstance(layer.shuffle1, gsops.ChShuffle) == shuffled
    c1 = layer.conv1
    _converge_bounds(c1)
    with torch.no_grad():
        for b in (c1.bias, getattr(layer.conv2, "bias", None)):
            if b is not None:
                b.normal_()
    x = torch.randn(2, channels, 4, 4, dtype=D)
    expected = _gssoc_by_definition(layer, x, stride, shuffled)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-8, atol=1e-8)
    if shuffled and stride > 1:
        # shuffling the lifted channels instead is a different layer: the check can tell them apart
        lifted = c1._finish(c1._exp(gsops.ChShuffle(c1.work, groups[0])(c1._lift(x))))
        if layer.conv2 is not None:
            lifted = layer.conv2(layer.shuffle2(lifted))
        assert (lifted - expected).abs().max().item() > 1e-2


def test_gssoc_refuses_paired_shuffle_that_does_not_fit_the_input():
    with pytest.raises(ValueError, match="groups\\[0\\]=2 must divide channels // 2=3"):
        gsops.GSSOC(6, 3, groups=(2, None), stride=2)


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


# ---------------------------------------------------------------- state_dict format
def _without_format(sd):
    return {k: v for k, v in sd.items() if not k.endswith("format_version")}


@pytest.mark.parametrize("make", [lambda: gsops.GSSOC(8, 3, groups=(2, 4)), lambda: gsops.SOCConv2d(8, 3, 2)])
def test_grouped_layers_store_format_and_refuse_state_without_it(make):
    torch.manual_seed(0)
    src, dst = make().eval(), make().eval()
    sd = src.state_dict()
    assert any(k.endswith("format_version") and int(v) == 2 for k, v in sd.items())
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    x = torch.randn(1, 8, 3, 3)
    for bad, msg in [(_without_format(sd), "largest spectral bound over its groups"),
                     ({k: (torch.tensor(1) if k.endswith("format_version") else v) for k, v in sd.items()},
                      "format_version=1, this gsops reads format_version=2")]:
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=msg):
                dst.load_state_dict(bad, strict=strict)
            for k, v in dst.state_dict().items():  # refused before anything was copied
                assert torch.equal(v, before[k]), k
    dst.load_state_dict(sd)
    assert torch.equal(dst(x), src(x))


def test_ungrouped_and_exact_layers_have_no_format_key():
    # their function did not change: state without the key loads as before
    for layer in (gsops.SOCConv2d(8, 3, 1), gsops.SOCConv2d(8, 1, 4, exact=True), gsops.GSSOC(8, 3, groups=(1, 2))):
        sd = layer.state_dict()
        assert not any(k.endswith("format_version") for k in sd)
        layer.load_state_dict(sd)

"""gsops.ops.rotated_linear.adapted_linear_unchecked: a whole adapted Linear (the Cayley blocks from packed skew
parameters, the rotation, the frozen GEMM, scale and bias) as one autograd node, against an independent float64
dense computation (dense Cayley by a solve, dense Q, dense GEMM), and the checks it returns."""
import importlib

import numpy as np
import pytest
import torch

from gsops.nn.cayley_param import _skew_gather
from gsops.ops.rotated_linear import adapted_linear_unchecked
from gsops.tolerances import tol

from dense import perm_matrix, skew_from_packed


def _skew(p, b):
    """K from the packed strict upper triangle (row major), differentiable in p: p written above the
    diagonal, minus the transpose (the map of tests/dense.py's skew_from_packed, checked below)."""
    iu = torch.triu_indices(b, b, offset=1)
    A = p.new_zeros(*p.shape[:-1], b, b)
    A[..., iu[0], iu[1]] = p
    return A - A.transpose(-1, -2)


def test_the_skew_map_is_the_dense_one():
    p = torch.randn(2, 3, 10, dtype=torch.float64)
    np.testing.assert_array_equal(_skew(p, 5).numpy(), skew_from_packed(p.numpy(), 5))


def _cayley(K, terms):
    eye = torch.eye(K.shape[-1], dtype=K.dtype)
    if terms is None:  # (I + K)(I - K)^{-1}
        return torch.linalg.solve((eye - K).transpose(-1, -2), (eye + K).transpose(-1, -2)).transpose(-1, -2)
    M, power = eye.expand_as(K), eye.expand_as(K)
    for _ in range(terms):
        power = power @ K
        M = M + power
    return 2 * M - eye


def _dense(x, p, b, terms, W, bias, scale):
    blocks = _cayley(_skew(p, b), terms)
    if blocks.shape[0] == 1:
        Q = torch.block_diag(*blocks[0])
    else:
        R, L = blocks[0], blocks[1]
        r = R.shape[0]
        P = torch.tensor(perm_matrix(r, r * b), dtype=x.dtype)
        Q = P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R)
    y = x @ Q.T @ W.T
    if scale is not None:
        y = y * scale
    return (y if bias is None else y + bias), blocks


def _case(n, r, b, d_out, seed=0, size=0.3):
    g = torch.Generator().manual_seed(seed)
    d = r * b
    x = torch.randn(2, 3, d, generator=g, dtype=torch.float64)
    p = size * torch.randn(n, r, b * (b - 1) // 2, generator=g, dtype=torch.float64) / b ** 0.5
    W = torch.randn(d_out, d, generator=g, dtype=torch.float64) / d ** 0.5
    bias = torch.randn(d_out, generator=g, dtype=torch.float64)
    scale = 1 + 0.1 * torch.randn(d_out, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 3, d_out, generator=g, dtype=torch.float64)
    return x, p, W, bias, scale, grad


def _layout(b, dtype):
    index, sign = _skew_gather(b)
    return index, sign.to(dtype)


@pytest.mark.parametrize("n", [1, 2])  # OFT's B; GSOFT's R, L
@pytest.mark.parametrize("terms", [None, 1, 5])  # exact Cayley, the Cayley-Neumann series
@pytest.mark.parametrize("r,b", [(4, 4), (3, 5), (2, 8), (6, 3)])
@pytest.mark.parametrize("with_scale,with_bias", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_dense_float64_forward_backward_and_checks(n, terms, r, b, with_scale, with_bias, dtype):
    x, p, W, bias, scale, grad = _case(n, r, b, 11 if r * b != 16 else 16)
    bias = bias if with_bias else None
    scale = scale if with_scale else None
    ref = [t.clone().requires_grad_() if t is not None else None for t in (x, p, scale)]
    want, blocks = _dense(ref[0], ref[1], b, terms, W, bias, ref[2])
    want_grads = torch.autograd.grad(want, [t for t in ref if t is not None], grad)
    got_in = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, p, scale)]
    probe = [t for t in (got_in[2], got_in[1]) if t is not None]
    index, sign = _layout(b, dtype)
    y, checks = adapted_linear_unchecked(got_in[0], got_in[1], index, sign, b, terms, W.to(dtype),
                                         None if bias is None else bias.to(dtype), got_in[2], probe)
    t = tol(dtype)
    torch.testing.assert_close(y.double(), want.detach(), rtol=t["rtol"], atol=t["atol"])
    got_grads = torch.autograd.grad(y, [t_ for t_ in got_in if t_ is not None], grad.to(dtype))
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=10 * t["rtol"], atol=10 * t["atol"])
    # the checks: a float64 sum per probed tensor, then the series' orthogonality error
    assert checks.dtype == torch.float64 and not checks.requires_grad
    assert checks.shape == (len(probe) + (terms is not None),)
    for v, tensor in zip(checks, probe):
        assert float(v) == pytest.approx(float(tensor.detach().double().sum()), rel=1e-12, abs=1e-12)
    if terms is not None:
        Qd = blocks.detach().reshape(-1, b, b)
        err = (Qd.transpose(-1, -2) @ Qd - torch.eye(b, dtype=torch.float64)).abs().max()
        assert float(checks[-1]) == pytest.approx(float(err), rel=1e-3, abs=10 * t["atol"])


@pytest.mark.parametrize("terms", [None, 5])
def test_double_backward_matches_dense(terms):
    """create_graph=True: the gradients through the one node are themselves differentiable."""
    x, p, W, bias, scale, grad = _case(2, 4, 4, 16, seed=3)
    index, sign = _layout(4, torch.float64)

    def second_order(fn):
        ins = [t.clone().requires_grad_() for t in (x, p, scale)]
        y = fn(*ins)
        first = torch.autograd.grad((y * grad).sum(), ins, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), ins)

    got = second_order(lambda x_, p_, s_: adapted_linear_unchecked(x_, p_, index, sign, 4, terms, W, bias, s_)[0])
    want = second_order(lambda x_, p_, s_: _dense(x_, p_, 4, terms, W, bias, s_)[0])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol(torch.float64))


def test_non_finite_parameters_show_in_the_checks():
    x, p, W, bias, scale, _ = _case(1, 4, 4, 16, seed=4)
    p[0, 1, 2] = float("nan")
    scale[3] = float("inf")
    index, sign = _layout(4, torch.float64)
    _, checks = adapted_linear_unchecked(x, p, index, sign, 4, 5, W, bias, scale, [scale, p])
    assert np.isinf(float(checks[0])) and np.isnan(float(checks[1])) and not np.isfinite(float(checks[2]))


def test_adapter_node_follows_a_replaced_rotation():
    """The layer uses the rotation it holds at each call (e.g. one replaced by a copy with other parameters)."""
    import copy

    from gsops.nn.orthogonal import OrthogonalAdapter

    torch.manual_seed(0)
    layer = OrthogonalAdapter(torch.nn.Linear(16, 8), method="oft", block_size=4, n_factors=1)
    x = torch.randn(3, 16)
    before = layer(x)
    other = copy.deepcopy(layer.rotation)
    with torch.no_grad():
        other.factors.params.normal_(0, 0.2)
    layer.rotation = other
    got = layer(x)
    assert not torch.allclose(got, before)
    # the op path (no one node) gives the same numbers up to rounding
    W, Q = layer.base_layer.weight, torch.block_diag(*layer.rotation.blocks(torch.float64)[0])
    dense = (x.double() @ Q.T @ W.double().T) * layer.scale.double() + layer.base_layer.bias.double()
    torch.testing.assert_close(got.double(), dense, **tol(torch.float32))


def test_double_backward_with_the_bias_alone():
    x, p, W, bias, scale, grad = _case(1, 4, 4, 16, seed=5)
    index, sign = _layout(4, torch.float64)
    c = bias.clone().requires_grad_()
    y, _ = adapted_linear_unchecked(x, p, index, sign, 4, None, W, c, scale)
    (dc,) = torch.autograd.grad(y, c, grad, create_graph=True)
    torch.testing.assert_close(dc, grad.reshape(-1, 16).sum(0))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("tokens", [7, 40, 41])  # one chunk; 5 chunks of 8; 6 chunks, the last of 1
@pytest.mark.parametrize("wanted", ["all", "x", "p"])  # the gradients asked for
@pytest.mark.parametrize("forward", ["tokens", "weight"])  # the forward rotates x, or W (y = (W Q) x)
def test_token_chunks_match_dense_float64(monkeypatch, n, with_scale, tokens, wanted, forward):
    """The node runs chunk by chunk of tokens (block gradients summed over the chunks); with tiny chunks
    forced, every output and gradient (x, W, p, scale, bias) still matches the dense float64 computation,
    whether the forward rotates the tokens or the weight."""
    rl = importlib.import_module("gsops.ops.rotated_linear")

    monkeypatch.setattr(rl, "CHUNK_BYTES", 8 * 12 * 8)  # 8 tokens of d = 12 in float64
    monkeypatch.setattr(rl, "MIN_CHUNK", 1)
    monkeypatch.setattr(rl, "MERGE_TOKENS_PER_ROW", 0 if forward == "weight" else 10 ** 9)
    r, b = 3, 4
    assert rl.chunk_tokens(40, r * b, 8) == 8 and rl.chunk_tokens(7, r * b, 8) == 7
    assert rl.chunk_tokens(40, r * b, 8, w_bytes=rl.W_CACHE_BYTES + 1) == 40  # a large W: longer chunks
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, r * b, generator=g, dtype=torch.float64)
    p = 0.3 * torch.randn(n, r, b * (b - 1) // 2, generator=g, dtype=torch.float64)
    W = torch.randn(5, r * b, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    scale = (1 + 0.1 * torch.randn(5, generator=g, dtype=torch.float64)) if with_scale else None
    grad = torch.randn(tokens, 5, generator=g, dtype=torch.float64)
    assert rl._merges(tokens, W) == (forward == "weight")
    ins = [t.clone().requires_grad_(wanted == "all" or i == "xp".find(wanted))
           for i, t in enumerate((x, p, W, bias) + ((scale,) if with_scale else ()))]
    index, sign = _layout(b, torch.float64)
    y, _ = adapted_linear_unchecked(ins[0], ins[1], index, sign, b, None, ins[2], ins[3],
                                    ins[4] if with_scale else None)
    got = torch.autograd.grad(y, [t for t in ins if t.requires_grad], grad)
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in ins]
    want, _ = _dense(ref[0], ref[1], b, None, ref[2], ref[3], ref[4] if with_scale else None)
    torch.testing.assert_close(y, want, **tol(torch.float64))
    assert len(got) == (len(ins) if wanted == "all" else 1)
    for a, e in zip(got, torch.autograd.grad(want, [t for t in ref if t.requires_grad], grad)):
        torch.testing.assert_close(a, e, **tol(torch.float64))


def test_forward_rotates_the_weight_when_tokens_outnumber_its_rows():
    """``y = (W Q) x`` (Q applied to the d_out rows of W) where N >= 2 d_out, ``W (Q x)`` below; on both sides
    of the boundary the result matches the dense float64 product up to rounding, with the scale and the bias."""
    rl = importlib.import_module("gsops.ops.rotated_linear")

    g = torch.Generator().manual_seed(9)
    r, b, d_out = 4, 8, 48
    W = torch.randn(d_out, r * b, generator=g)
    index, sign = _layout(b, torch.float32)
    p = 0.2 * torch.randn(2, r, b * (b - 1) // 2, generator=g)
    bias, scale = torch.randn(d_out, generator=g), 1 + 0.1 * torch.randn(d_out, generator=g)
    for N, merged in ((2 * d_out, True), (2 * d_out - 1, False)):
        assert rl._merges(N, W) == merged
        x = torch.randn(N, r * b, generator=g)
        y, _ = adapted_linear_unchecked(x, p, index, sign, b, None, W, bias, scale)
        want, _ = _dense(x.double(), p.double(), b, None, W.double(), bias.double(), scale.double())
        torch.testing.assert_close(y.double(), want, **tol(torch.float32))


def test_results_never_share_the_scratch_buffers():
    """Outputs and gradients of one call are untouched by the next call (the node's scratch is only for its
    own intermediates), in and out of inference mode, and after the scratch is released."""
    rl = importlib.import_module("gsops.ops.rotated_linear")

    g = torch.Generator().manual_seed(8)
    r, b, N = 8, 8, 4096  # activations of 1 MiB: the scratch is used
    index, sign = _layout(b, torch.float32)
    W = torch.randn(r * b, r * b, generator=g)
    scale = 1 + 0.1 * torch.randn(r * b, generator=g)

    def call(seed):
        gg = torch.Generator().manual_seed(seed)
        x = torch.randn(N, r * b, generator=gg).requires_grad_()
        p = (0.1 * torch.randn(2, r, b * (b - 1) // 2, generator=gg)).requires_grad_()
        s = scale.clone().requires_grad_()
        y, _ = adapted_linear_unchecked(x, p, index, sign, b, None, W, None, s)
        grads = torch.autograd.grad(y, (x, p, s), torch.ones_like(y))
        return [t.detach() for t in (y, *grads)]

    first = call(1)
    kept = [t.clone() for t in first]
    with torch.inference_mode():
        x = torch.randn(N, r * b)
        p = torch.zeros(2, r, b * (b - 1) // 2)
        y, _ = adapted_linear_unchecked(x, p, index, sign, b, None, W, None, scale)
        torch.testing.assert_close(y, (x @ W.T) * scale, **tol(torch.float32))
    second = call(2)
    for a, k in zip(first, kept):
        assert torch.equal(a, k)
    assert all(not torch.equal(a, c) for a, c in zip(first, second))
    assert rl._scratch.buffers  # the intermediates went through the scratch
    rl.release_scratch()
    assert not rl._scratch.buffers
    for a, c in zip(call(2), second):
        assert torch.equal(a, c)

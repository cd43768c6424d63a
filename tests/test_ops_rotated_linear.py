"""gsops.ops.rotated_linear (``s * (W (Q x)) + c`` in one node) against an independent float64 dense
product, and the adapters' use of it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gsops
from gsops.ops.rotated_linear import fits as fused_fits
from gsops.tolerances import tol

from dense import perm_matrix


def _dense_q(factors):
    """Q from the blocks with torch.block_diag and the SPEC's permutation matrix (no gsops code)."""
    if len(factors) == 1:
        return torch.block_diag(*factors[0])
    R, L = factors
    r, b, _ = R.shape
    P = torch.tensor(perm_matrix(r, r * b), dtype=R.dtype)
    return P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R)


def _dense(x, factors, W, bias, scale):
    y = x @ _dense_q(factors).T @ W.T
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


def _case(r, b, d_out, lead, n_factors, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = r * b
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    factors = [torch.randn(r, b, b, generator=g, dtype=torch.float64) / b ** 0.5 for _ in range(n_factors)]
    W = torch.randn(d_out, d, generator=g, dtype=torch.float64) / d ** 0.5
    bias = torch.randn(d_out, generator=g, dtype=torch.float64)
    scale = 1 + 0.1 * torch.randn(d_out, generator=g, dtype=torch.float64)
    grad = torch.randn(*lead, d_out, generator=g, dtype=torch.float64)
    return x, factors, W, bias, scale, grad


@pytest.mark.parametrize("n_factors", [1, 2])
@pytest.mark.parametrize("r,b", [(4, 8), (8, 4), (3, 5), (6, 6), (1, 7)])
@pytest.mark.parametrize("with_scale,with_bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("square", [False, True])  # d_out == d: the output takes a spare buffer
def test_matches_dense_float64_forward_and_backward(n_factors, r, b, with_scale, with_bias, dtype, square):
    x, factors, W, bias, scale, grad = _case(r, b, r * b if square else 11, (2, 3), n_factors, dtype)
    bias = bias if with_bias else None
    scale = scale if with_scale else None
    leaves = [x, *factors] + [t for t in (bias, scale) if t is not None]
    ref_in = [t.clone().requires_grad_() for t in leaves]
    got_in = [t.to(dtype).requires_grad_() for t in leaves]

    def unpack(ts):
        it = iter(ts[1 + n_factors:])
        return ts[0], ts[1:1 + n_factors], (next(it) if with_bias else None), (next(it) if with_scale else None)

    rx, rf, rb, rs = unpack(ref_in)
    ref = _dense(rx, rf, W, rb, rs)
    ref_grads = torch.autograd.grad(ref, ref_in, grad)
    gx, gf, gb, gsc = unpack(got_in)
    got = gsops.ops.rotated_linear(gx, gf, W.to(dtype), gb, gsc)
    got_grads = torch.autograd.grad(got, got_in, grad.to(dtype))
    t = tol(dtype)
    torch.testing.assert_close(got, ref.to(dtype), **t)
    for a, e in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, e.to(dtype), rtol=t["rtol"] * 10, atol=t["atol"] * 10)


@pytest.mark.parametrize("n_factors", [1, 2])
def test_weight_gradient_and_transposed_weight(n_factors):
    """A weight that requires grad gets its gradient; a transposed view (Conv1D's layout) works."""
    x, factors, W, bias, scale, grad = _case(4, 6, 24, (5,), n_factors, torch.float64, seed=3)
    Wt = W.T.contiguous().requires_grad_()  # stored (d, d_out), used as its transpose
    Wr = W.clone().requires_grad_()
    got = gsops.ops.rotated_linear(x, factors, Wt.T, bias, scale)
    ref = _dense(x, factors, Wr, bias, scale)
    torch.testing.assert_close(got, ref, **tol(torch.float64))
    (dWt,) = torch.autograd.grad(got, [Wt], grad)
    (dW,) = torch.autograd.grad(ref, [Wr], grad)
    torch.testing.assert_close(dWt.T, dW, **tol(torch.float64))


def test_more_tokens_than_features_and_fewer():
    """Both ways of applying the scale in the backward (folded into W, or into the gradient)."""
    for lead in [(40,), (3,)]:
        x, factors, W, bias, scale, grad = _case(4, 4, 8, lead, 2, torch.float64, seed=5)
        s = scale.clone().requires_grad_()
        s_ref = scale.clone().requires_grad_()
        xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = gsops.ops.rotated_linear(xg, factors, W, bias, s)
        ref = _dense(xr, factors, W, bias, s_ref)
        g1 = torch.autograd.grad(got, [xg, s], grad)
        g2 = torch.autograd.grad(ref, [xr, s_ref], grad)
        for a, e in zip(g1, g2):
            torch.testing.assert_close(a, e, **tol(torch.float64))


def test_saves_the_input_and_with_the_scale_the_unscaled_output_only():
    x, factors, W, bias, scale, _ = _case(8, 8, 64, (32,), 2, torch.float32)
    x = x.float().requires_grad_()
    factors = [f.float().requires_grad_() for f in factors]
    W, bias = W.float(), bias.float()
    for s, expected in [(None, x.numel() * 4), (scale.float().requires_grad_(), (x.numel() + 32 * 64) * 4)]:
        persistent = {t.untyped_storage().data_ptr() for t in [W, bias, *factors] + ([s] if s is not None else [])}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in persistent:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gsops.ops.rotated_linear(x, factors, W, bias, s)
        assert sum(seen.values()) == expected


def test_bad_arguments_are_refused_by_name():
    x, factors, W, bias, scale, _ = _case(4, 4, 8, (3,), 2, torch.float64)
    with pytest.raises(ValueError, match="W"):
        gsops.ops.rotated_linear(x, factors, W[:, :8], bias, scale)
    with pytest.raises(ValueError, match="scale"):
        gsops.ops.rotated_linear(x, factors, W, bias, scale[:3])
    with pytest.raises(TypeError, match="float32 or float64"):
        gsops.ops.rotated_linear(x, factors, W.float(), bias, scale)
    with pytest.raises(ValueError, match="factors"):
        gsops.ops.rotated_linear(x, factors * 2, W, bias, scale)


def test_fits_only_the_eager_float_torch_path():
    x, factors, W, *_ = _case(4, 4, 8, (3,), 2, torch.float32)
    x, W, factors = x.float(), W.float(), [f.float() for f in factors]
    assert fused_fits(x, W, factors)
    assert not fused_fits(x.half(), W.half(), [f.half() for f in factors])
    assert not fused_fits(x, W.double(), factors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_fits(x, W, factors)


@pytest.mark.parametrize("method", ["gsoft", "oft", "double_gsoft"])
@pytest.mark.parametrize("scale", [True, False])
def test_adapter_runs_the_fused_node_and_matches_the_op_path(method, scale, monkeypatch):
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24) if method != "double_gsoft" else torch.nn.Linear(32, 32)
    model = torch.nn.Sequential(base)
    gsops.apply_(model, gsops.AdapterConfig(method=method, block_size=8, scale=scale, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 5, 32, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        y = layer(x)
        names = []
        stack = [y.grad_fn]
        while stack:
            n = stack.pop()
            if n is None:
                continue
            names.append(type(n).__name__)
            stack.extend(f for f, _ in n.next_functions)
        return y, torch.autograd.grad(y.square().sum(), [x] + params), names

    # one node with the Cayley blocks in it (one input rotation), else the fused rotated Linear, else the ops
    y, grads, names = run()
    assert ("_RotatedLinearBackward" if method == "double_gsoft" else "_AdaptedLinearBackward") in names
    monkeypatch.setattr("gsops.nn.orthogonal.adapted_fits", lambda *a: False)
    y1, grads1, names = run()
    assert "_RotatedLinearBackward" in names and "_AdaptedLinearBackward" not in names
    monkeypatch.setattr("gsops.nn.orthogonal.rotated_linear_fits", lambda *a: False)
    y2, grads2, names = run()
    assert "_RotatedLinearBackward" not in names
    for got in ((y1, grads1), (y2, grads2)):
        torch.testing.assert_close(y, got[0], **tol(torch.float32))
        for a, e in zip(grads, got[1]):
            torch.testing.assert_close(a, e, **tol(torch.float32))


@pytest.mark.parametrize("n_factors", [1, 2])
def test_double_backward_matches_dense(n_factors):
    """create_graph=True: the gradients are differentiable (a gradient penalty, a Hessian-vector product)."""
    x, factors, W, bias, scale, grad = _case(4, 4, 16, (3,), n_factors, torch.float64, seed=7)
    leaves = [x, *factors, scale]

    def second_order(fn):
        ins = [t.clone().requires_grad_() for t in leaves]
        y = fn(ins[0], ins[1:1 + n_factors], W, bias, ins[-1])
        first = torch.autograd.grad((y * grad).sum(), ins, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return torch.autograd.grad(penalty, ins)

    for a, e in zip(second_order(gsops.ops.rotated_linear), second_order(_dense)):
        torch.testing.assert_close(a, e, **tol(torch.float64))


def test_output_takes_in_place_ops():
    """The output is a tensor of its own: ``y.add_(...)`` (a residual, an in-place activation) works."""
    x, factors, W, bias, scale, grad = _case(4, 4, 16, (2, 3), 2, torch.float64, seed=8)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = gsops.ops.rotated_linear(xg, factors, W, bias, scale)
    y.add_(1.0).relu_()
    ref = _dense(xr, factors, W, bias, scale).add(1.0).relu()
    torch.testing.assert_close(y, ref, **tol(torch.float64))
    torch.testing.assert_close(torch.autograd.grad(y, xg, grad)[0], torch.autograd.grad(ref, xr, grad)[0],
                               **tol(torch.float64))


@pytest.mark.parametrize("method", ["gsoft", "oft"])
def test_adapter_on_meta_tensors(method):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, device="meta"))
    gsops.apply_(model, gsops.AdapterConfig(method=method, block_size=4, target_modules=["0"]))
    y = model(torch.randn(3, 16, device="meta", requires_grad=True))
    y.sum().backward()
    assert y.shape == (3, 16) and y.device.type == "meta"

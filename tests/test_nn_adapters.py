"""Adapter layers against an independent dense float64 oracle (numpy, explicit loops; see tests/dense.py).

Each method x (Linear, Conv2d 1x1, 3x3, 1x3, stride 2 + dilation): equal to the base layer at
init; after a random perturbation equal to the SPEC formula; Q orthogonal; parameter counts by
hand formula; merge -> unmerge -> merge round trips; BOFT equal to PEFT's BOFT layer.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gsops
from gsops.nn.adapters import OrthogonalAdapter, butterfly_index
from gsops.nn.sorsa import SORSAAdapter
from gsops.nn.loldu import LoLDUAdapter
from gsops.tolerances import ORTHO_TOL, tol

from dense import dense_q_np, lowrank_weight_np, np64, orthogonal_weight_np

B = 4  # block size used throughout
METHODS = ["gsoft", "double_gsoft", "oft", "boft", "sorsa", "loldu"]
RANK = 3

LAYERS = {
    "linear": lambda: nn.Linear(24, 12),
    "conv1x1": lambda: nn.Conv2d(8, 12, 1),
    "conv3x3": lambda: nn.Conv2d(8, 12, 3, padding=1),
    "conv1x3": lambda: nn.Conv2d(8, 12, (1, 3), padding=(0, 1)),
    "conv3x3_s2": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2),
    "conv3x3_reflect": lambda: nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect", bias=False),
}


def make_input(kind, dtype=torch.float64, batch=3):
    if kind == "linear":
        return torch.randn(batch, 5, 24, dtype=dtype)
    return torch.randn(batch, 8, 7, 6, dtype=dtype)


def make_adapter(method, base, **kw):
    if method == "sorsa":
        return SORSAAdapter(base, RANK)
    if method == "loldu":
        return LoLDUAdapter(base, RANK)
    kw.setdefault("block_size", B)
    return OrthogonalAdapter(base, method=method, **kw)


def perturb_(layer, std=0.3):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("base_layer."):
                continue
            if name in ("scale", "sigma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.add_(std * torch.randn_like(p))


# ------------------------------------------------------------------ independent oracle (tests/dense.py)
def oracle_weight(layer, method, W0):
    """The adapted (out, d_in) weight by the SPEC / paper formulas, float64 numpy."""
    if method in ("sorsa", "loldu"):
        return lowrank_weight_np(method, np64(W0).reshape(W0.shape[0], -1), layer, RANK)
    return orthogonal_weight_np(layer, method, W0)


def run_base(base, W_flat, x):
    """The base layer's own operation with a given weight (torch functional, float64)."""
    Wt = torch.from_numpy(W_flat).reshape(base.weight.shape)
    bias = None if base.bias is None else base.bias.detach().to(torch.float64)
    if isinstance(base, nn.Linear):
        return torch.nn.functional.linear(x, Wt, bias)
    if base.padding_mode != "zeros":
        x = torch.nn.functional.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return torch.nn.functional.conv2d(x, Wt, bias, base.stride, 0, base.dilation)
    return torch.nn.functional.conv2d(x, Wt, bias, base.stride, base.padding, base.dilation)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method, kind):
    base = LAYERS[kind]()
    x = make_input(kind, torch.float32)
    y0 = base(x)
    layer = make_adapter(method, copy.deepcopy(base))
    torch.testing.assert_close(layer(x), y0, **tol(torch.float32))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_matches_dense_oracle(method, kind):
    base = LAYERS[kind]().double()
    W0 = base.weight.detach().clone()
    layer = make_adapter(method, copy.deepcopy(base))
    perturb_(layer)
    x = make_input(kind)
    want = run_base(base, oracle_weight(layer, method, W0), x)
    torch.testing.assert_close(layer(x), want, **tol(torch.float64))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("n_factors", [1, 2, 3])
def test_boft_factors_match_oracle(n_factors, packed):
    base = nn.Linear(32, 8).double()
    layer = make_adapter("boft", copy.deepcopy(base), n_factors=n_factors, packed=packed)
    perturb_(layer)
    x = torch.randn(4, 32, dtype=torch.float64)
    want = run_base(base, oracle_weight(layer, "boft", base.weight), x)
    torch.testing.assert_close(layer(x), want, **tol(torch.float64))


def test_butterfly_index_example():
    # d=16, b=4, level 1: chunks of 8, half-blocks of 2 reordered 0,2,1,3
    g = butterfly_index(16, 4, 1).tolist()
    assert g == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    with pytest.raises(ValueError, match="block_size=3 must be even"):
        butterfly_index(12, 3, 1)


@pytest.mark.parametrize("cayley_method", ["exact", "neumann"])
@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "oft", "boft"])
def test_learned_q_orthogonal(method, cayley_method):
    std = 0.3 if cayley_method == "exact" else 0.02
    layer = make_adapter(method, nn.Linear(24, 12), cayley=cayley_method, neumann_terms=8)
    perturb_(layer, std)
    qs = layer.orthogonal_matrices(torch.float32)
    assert qs["in"].shape == (24, 24)
    for Q in qs.values():
        err = (Q.T @ Q - torch.eye(Q.shape[0])).abs().max()
        assert err < ORTHO_TOL[torch.float32], err
    if cayley_method == "exact":  # and the dense Q is the oracle's
        np.testing.assert_allclose(np64(layer.rotation.dense()), dense_q_np(layer.rotation, method), atol=1e-12)


def _count(method, d_in, d_out, b, scale=True, packed=True, m=2):
    blk = b * (b - 1) // 2 if packed else b * b
    s = d_out if scale else 0
    if method == "gsoft":
        return 2 * (d_in // b) * blk + s
    if method == "double_gsoft":
        return 2 * (d_in // b) * blk + 2 * (d_out // b) * blk + s
    if method == "oft":
        return (d_in // b) * blk + s
    if method == "boft":
        return m * (d_in // b) * blk + s
    if method == "sorsa":
        return RANK * (d_in + d_out + 1)
    return RANK + 1


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_parameter_counts(method, scale, packed):
    for kind in ("linear", "conv3x3"):
        base = LAYERS[kind]()
        d_in = 24 if kind == "linear" else 72
        kw = {} if method in ("sorsa", "loldu") else dict(scale=scale, packed=packed)
        layer = make_adapter(method, base, **kw)
        got = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer."))
        assert got == _count(method, d_in, 12, B, scale, packed), (kind, got)


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x3"])
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_round_trip(method, kind):
    base = LAYERS[kind]().double()
    layer = make_adapter(method, base)
    perturb_(layer)
    x = make_input(kind)
    W_train = layer.base_layer.weight.detach().clone()
    y = layer(x)
    assert layer.merge() and layer.merged
    W_merged = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(layer(x), y, **tol(torch.float64))
    with pytest.warns(UserWarning, match="already merged"):
        assert layer.merge() is False
    assert torch.equal(layer.base_layer.weight, W_merged)  # no double apply
    assert layer.unmerge() and not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, W_train, **tol(torch.float64))
    with pytest.warns(UserWarning, match="not merged"):
        assert layer.unmerge() is False
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, W_merged, **tol(torch.float64))
    torch.testing.assert_close(layer(x), y, **tol(torch.float64))


def test_unmerge_refuses_zero_scale():
    # unmerge undoes what was merged (a snapshot of the parameters): a zero scale merged into W cannot be undone
    layer = make_adapter("gsoft", nn.Linear(8, 4))
    with torch.no_grad():
        layer.scale[1] = 0.0
    layer.merge()
    W = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="zero entries"):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.base_layer.weight, W)


def test_float32_merge_round_trip():
    base = nn.Linear(64, 32)
    W0 = base.weight.detach().clone()
    layer = make_adapter("gsoft", base, block_size=8)
    perturb_(layer)
    x = torch.randn(6, 64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, **tol(torch.float32))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, **tol(torch.float32))


@pytest.mark.parametrize("method", METHODS)
def test_revert_restores_base(method):
    base = nn.Conv2d(8, 12, 3, padding=1).double()
    W0 = base.weight.detach().clone()
    layer = make_adapter(method, base)
    perturb_(layer)
    layer.merge()
    orig = layer.revert()
    assert orig is base
    torch.testing.assert_close(orig.weight, W0, **tol(torch.float64))


def test_gradients_flow_only_to_adapter():
    base = nn.Linear(16, 8)
    layer = make_adapter("gsoft", base)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    perturb_(layer, 0.1)
    layer(torch.randn(3, 16)).square().sum().backward()
    assert layer.rotation.factors.params.grad is not None and layer.rotation.factors.params.grad.abs().sum() > 0
    assert layer.scale.grad is not None and base.weight.grad is None


@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "oft", "boft"])
def test_gradcheck_float64(method):
    layer = make_adapter(method, nn.Linear(8, 8).double(), block_size=2)
    perturb_(layer, 0.2)
    x = torch.randn(2, 8, dtype=torch.float64)
    p = layer.rotation.factors.params
    # compare the autograd gradient of a scalar loss to central finite differences
    loss = lambda: layer(x).pow(2).sum()  # noqa: E731
    g = torch.autograd.grad(loss(), p)[0]
    eps = 1e-6
    flat = p.detach().view(-1)
    for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
        with torch.no_grad():
            flat[i] += eps
            up = loss().item()
            flat[i] -= 2 * eps
            dn = loss().item()
            flat[i] += eps
        assert abs((up - dn) / (2 * eps) - g.view(-1)[i].item()) < 1e-6 * max(1.0, abs(up))


def test_layer_errors_name_layer_and_numbers():
    with pytest.raises(ValueError, match=r"enc\.fc: block_size=5 must divide in_features=24"):
        OrthogonalAdapter(nn.Linear(24, 10), "gsoft", block_size=5, name="enc.fc")
    with pytest.raises(ValueError, match=r"block_size=4 must divide in_channels\*kh\*kw=18"):
        OrthogonalAdapter(nn.Conv2d(2, 4, 3), "oft", block_size=4)
    with pytest.raises(ValueError, match="out_features=10"):
        OrthogonalAdapter(nn.Linear(24, 10), "double_gsoft", block_size=4)
    with pytest.raises(ValueError, match=r"block_size\*2\*\*\(n_factors-1\)=16 to divide in_features=24"):
        OrthogonalAdapter(nn.Linear(24, 10), "boft", block_size=4, n_factors=3)
    with pytest.raises(ValueError, match="double_gsoft cannot wrap a Conv2d with groups=2"):
        OrthogonalAdapter(nn.Conv2d(4, 4, 1, groups=2), "double_gsoft", block_size=2)
    with pytest.raises(ValueError, match=r"block_size=4 must divide in_channels/groups\*kh\*kw=2"):
        OrthogonalAdapter(nn.Conv2d(4, 4, 1, groups=2), "oft", block_size=4)
    with pytest.raises(ValueError, match="rank=9 must be <= min"):
        SORSAAdapter(nn.Linear(8, 6), 9)
    with pytest.raises(TypeError, match="nn.Linear, nn.Conv2d or transformers' Conv1D"):
        LoLDUAdapter(nn.Conv1d(4, 4, 1), 2)


# ------------------------------------------------------------------ PEFT BOFT
def _peft_or_skip():
    try:
        import peft  # noqa: F401
        from peft import BOFTConfig, get_peft_model
    except Exception as e:  # pragma: no cover
        pytest.skip(f"peft cannot be imported: {e}")
    return BOFTConfig, get_peft_model


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 12)
        self.conv = nn.Conv2d(8, 6, 2, padding=1)

    def forward(self, x, z):
        return self.lin(x), self.conv(z)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("n_factors", [1, 2, 3])
def test_boft_equals_peft(n_factors, packed):
    BOFTConfig, get_peft_model = _peft_or_skip()
    from perf import peft_boft

    base = _Pair().double()
    cfg = BOFTConfig(boft_block_size=B, boft_n_butterfly_factor=n_factors, target_modules=["lin", "conv"],
                     boft_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n_factors == 1:
            pm = get_peft_model(copy.deepcopy(base), cfg)
        else:
            with peft_boft.cpu_fbd():
                pm = get_peft_model(copy.deepcopy(base), cfg)
    peft_boft.check_boft_factors(pm, n_factors, B)  # PEFT really built what we asked for
    ours = gsops.apply_(copy.deepcopy(base), gsops.AdapterConfig(
        method="boft", block_size=B, n_factors=n_factors, packed=packed, target_modules=["lin", "conv"]),
        verbose=False)
    for name in ("lin", "conv"):
        pl, ol = getattr(pm.base_model.model, name), getattr(ours, name)
        R, s = pl.boft_R["default"], pl.boft_s["default"]
        assert tuple(R.shape) == (n_factors, pl.in_features * (1 if name == "lin" else 4) // B, B, B)
        with torch.no_grad():
            R.copy_(0.3 * torch.randn_like(R))
            s.copy_(1 + 0.1 * torch.randn_like(s))
            # PEFT: K = 0.5 (A - A^T); ours unpacked: K = A - A^T; packed: the upper triangle of K
            K = 0.5 * (R - R.transpose(-1, -2))
            ol.rotation.factors.params.copy_(gsops.unskew(K) if packed else 0.5 * R)
            ol.scale.copy_(s.flatten())
    x = torch.randn(5, 32, dtype=torch.float64)
    z = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    if n_factors == 1:
        want = pm(x, z)
    else:
        with peft_boft.cpu_fbd():
            want = pm(x, z)
    got = ours(x, z)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(torch.float64))


@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "oft", "boft"])
def test_linear_is_input_centric(method, monkeypatch):
    """SPEC: for nn.Linear the input is rotated; neither W Q nor a dense Q is built in forward/backward."""
    layer = make_adapter(method, nn.Linear(24, 12))
    perturb_(layer, 0.1)

    def forbidden(*a, **k):
        raise AssertionError("dense W Q / Q built during a Linear forward")

    monkeypatch.setattr(layer, "adapted_weight", forbidden)
    for rot in (layer.rotation, layer.rotation_out):
        if rot is not None:
            monkeypatch.setattr(rot, "dense", forbidden)
    calls = []
    real = torch.nn.functional.linear

    def spy(x, W, b=None):
        calls.append(tuple(W.shape))
        return real(x, W, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    import gsops.nn.orthogonal as orth
    fused = orth.rotated_linear_unchecked  # the torch path: rotation and frozen GEMM in one node

    def spy_fused(x, factors, W, *rest):
        calls.append(tuple(W.shape))
        return fused(x, factors, W, *rest)

    monkeypatch.setattr(orth, "rotated_linear_unchecked", spy_fused)
    adapted = orth.adapted_linear_unchecked  # the same node with the Cayley blocks computed in it

    def spy_adapted(x, p, index, sign, b, terms, W, *rest):
        calls.append(tuple(W.shape))
        return adapted(x, p, index, sign, b, terms, W, *rest)

    monkeypatch.setattr(orth, "adapted_linear_unchecked", spy_adapted)
    layer(torch.randn(3, 24)).sum().backward()
    assert calls == [(12, 24)] and layer.rotation.factors.params.grad is not None

"""Property-based fuzzing of the adapter layers and model verbs (hypothesis).

Entry points: AdapterConfig, OrthogonalAdapter over nn.Linear and nn.Conv2d (gsoft, double_gsoft,
oft, boft; exact and Neumann Cayley), SORSAAdapter / LoLDUAdapter, and gsops.apply_ on small
models. Each drawn case either matches an independent float64 numpy computation (matrices built
with loops from the SPEC formulas, tests/dense.py) or raises ValueError/TypeError whose message
names the offending argument (and the layer). 200 examples per entry point; CI (env CI set)
replays the same examples every run.
"""
import copy
import os
import re

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (requirements-dev.txt)")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn

import gsops
from gsops import ops
from gsops.nn.loldu import LoLDUAdapter
from gsops.nn.sorsa import SORSAAdapter
from gsops.nn.adapters import OrthogonalAdapter
from gsops.tolerances import tol

from dense import lowrank_weight_np, np64, orthogonal_weight_np

EXAMPLES = 200
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ORTHO = ["gsoft", "double_gsoft", "oft", "boft"]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BAD_DTYPES = [torch.int64, torch.bool, torch.complex64]
NAME = "blk.7.attn"


# ------------------------------------------------------------------ helpers
def _expect(fn, exc, *names):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert any(n in msg for n in names), f"message {msg!r} names none of {names}"
    event(f"refused: {type(info.value).__name__}")
    return msg


def _perturb(layer, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("base_layer."):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(p + std * noise)


def _layout(x, layout):
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded" and x.dim() >= 2 and x.shape[0] > 0:
        return x[:1].expand(x.shape)
    if layout == "strided":
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def _input(shape, dtype, layout, values, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if values != "normal" and x.numel():
        x.view(-1)[(seed * 7919) % x.numel()] = float("nan") if values == "nan" else float("inf")
    if dtype.is_complex:
        x = x.to(dtype)
    elif dtype == torch.bool:
        x = x > 0
    elif not dtype.is_floating_point:
        x = torch.nan_to_num(x).round().to(dtype)
    else:
        x = x.to(dtype)
    return _layout(x, layout)


def _close(got, want, dtype, poisoned=None):
    """got (dtype) vs the float64 oracle, with a tolerance scaled by the outputs' magnitude."""
    want = torch.from_numpy(np.asarray(want, dtype=np.float64))
    assert got.dtype == dtype and tuple(got.shape) == tuple(want.shape), (got.dtype, got.shape, want.shape)
    got = got.detach().double()
    if poisoned is not None:
        assert torch.equal(~torch.isfinite(got), poisoned), "non-finite outputs must be exactly those the bad input reaches"
        got, want = got.masked_fill(poisoned, 0), want.masked_fill(poisoned, 0)
    t = tol(dtype)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=8 * t["rtol"], atol=8 * t["atol"] * scale)


# ------------------------------------------------------------------ AdapterConfig
BAD_VALUES = {
    "method": ["lora", "GSOFT", "", 3],
    "block_size": [0, -2, 2.0, True, "4", None],
    "n_factors": [0, -1, 1.5, False, "2"],
    "neumann_terms": [0, -3, 5.0, None],
    "rank": [0, -1, 2.5, "3"],
    "cayley": ["Exact", "taylor", 1, None],
    "scale": [1, "yes", None],
    "packed": [0, "no"],
    "target_modules": [[], ["("], [nn.LayerNorm], [3], "(", 7],
}
TARGETS = [None, ["q", "v"], [nn.Linear], [nn.Conv2d, "fc"], "fc", nn.Linear]


@st.composite
def config_kwargs(draw):
    method = draw(st.sampled_from(gsops.adapters.METHODS))
    low_rank = method in ("sorsa", "loldu")
    n_factors = 2 if method in ("gsoft", "double_gsoft") else draw(st.integers(1, 4))
    block_size = draw(st.integers(1, 12))
    if method == "boft" and n_factors > 1 and block_size % 2:
        block_size += 1
    kw = dict(method=method, block_size=block_size, n_factors=n_factors, neumann_terms=draw(st.integers(1, 10)),
              rank=draw(st.integers(1, 10)) if low_rank else None, cayley=draw(st.sampled_from(["exact", "neumann"])),
              scale=draw(st.booleans()), packed=draw(st.booleans()), target_modules=draw(st.sampled_from(TARGETS)))
    # corrupt 0, 1 or 2 fields (sometimes with values that are only wrong in combination: a rank for gsoft,
    # n_factors=3 for gsoft, an odd block_size for a multi-factor boft, a numpy integer)
    for field in draw(st.lists(st.sampled_from(sorted(BAD_VALUES) + ["combo"]), max_size=2)):
        if field == "combo":
            which = draw(st.sampled_from(["rank_for_orthogonal", "gsoft_factors", "odd_boft", "numpy_int", "no_rank"]))
            if which == "rank_for_orthogonal" and not low_rank:
                kw["rank"] = 4
            elif which == "gsoft_factors" and method in ("gsoft", "double_gsoft"):
                kw["n_factors"] = 3
            elif which == "odd_boft" and method == "boft":
                kw["n_factors"], kw["block_size"] = 2, 5
            elif which == "numpy_int":
                kw["block_size"] = np.int64(kw["block_size"]) if isinstance(kw["block_size"], int) else kw["block_size"]
            elif which == "no_rank" and low_rank:
                kw["rank"] = None
        else:
            kw[field] = draw(st.sampled_from(BAD_VALUES[field]))
    return kw


def _config_errors(method, block_size, n_factors, neumann_terms, rank, cayley, scale, packed, target_modules):
    """The set of arguments an AdapterConfig(...) with these values must name (empty: valid)."""
    bad = set()
    if method not in gsops.adapters.METHODS:
        bad.add("method")

    def int_ok(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

    for name, v in (("block_size", block_size), ("n_factors", n_factors), ("neumann_terms", neumann_terms)):
        if not int_ok(v):
            bad.add(name)
    for name, v in (("scale", scale), ("packed", packed)):
        if not isinstance(v, bool):
            bad.add(name)
    if cayley not in ("exact", "neumann"):
        bad.add("cayley")
    if method in ("gsoft", "double_gsoft") and int_ok(n_factors) and n_factors != 2:
        bad.add("n_factors")
    if method == "boft" and int_ok(n_factors) and n_factors > 1 and int_ok(block_size) and block_size % 2:
        bad.add("block_size")
    if method in ("gsoft", "double_gsoft", "oft", "boft") and int_ok(block_size) and block_size < 2:
        bad.add("block_size")  # 1x1 Cayley blocks: no trainable parameter
    if method in ("sorsa", "loldu"):
        if not int_ok(rank):
            bad.add("rank")
    elif method in gsops.adapters.METHODS and rank is not None:
        bad.add("rank")
    if target_modules is not None:
        ok = isinstance(target_modules, list) and len(target_modules) > 0 and all(
            (isinstance(t, str) and _valid_regex(t)) or t in (nn.Linear, nn.Conv2d) for t in target_modules)
        if not ok:
            bad.add("target_modules")
    return bad


def _valid_regex(s):
    try:
        re.compile(s)
        return True
    except re.error:
        return False


@SETTINGS
@given(config_kwargs())
def test_fuzz_adapter_config(kw):
    targets = kw["target_modules"]
    targets_norm = [targets] if isinstance(targets, (str, type)) else targets
    bad = _config_errors(**{**kw, "target_modules": targets_norm})
    if bad:
        _expect(lambda: gsops.AdapterConfig(**kw), (ValueError, TypeError), *bad)
        return
    cfg = gsops.AdapterConfig(**kw)
    event("valid config, round trip checked")
    assert isinstance(cfg.block_size, int) and cfg.block_size == int(kw["block_size"])
    again = gsops.AdapterConfig.from_dict(cfg.to_dict())  # JSON-safe round trip
    assert again == cfg and again.to_dict() == cfg.to_dict()


# ------------------------------------------------------------------ orthogonal adapters over nn.Linear
def _ortho_layer_errors(method, d_in, d_out, b, m, what_in="in_features", what_out="out_features"):
    """Messages of every rule (b, m) break for this layer; the constructor must name one of them."""
    errs = []
    if b < 2:
        errs.append(f"block_size={b} gives 1x1 Cayley blocks")
    elif d_in % b:
        errs.append(f"block_size={b} must divide {what_in}={d_in}")
    if method == "double_gsoft" and d_out % b:
        errs.append(f"block_size={b} must divide {what_out}={d_out}")
    if method in ("gsoft", "double_gsoft") and m != 2:
        errs.append(f"n_factors={m}")
    if method == "boft" and m > 1:
        if b % 2:
            errs.append(f"block_size={b} must be even for boft with n_factors={m}")
        elif d_in % (b * 2 ** (m - 1)):
            errs.append(f"block_size*2**(n_factors-1)={b * 2 ** (m - 1)} to divide {what_in}={d_in}")
    return errs


CAYLEY = st.sampled_from([("exact", 0.4)] * 3 + [("exact", 3.0), ("neumann", 0.01), ("neumann", 0.01), ("neumann", 0.6)])
LAYOUTS = st.sampled_from(["contiguous", "contiguous", "transposed", "expanded", "strided"])
VALUES = st.sampled_from(["normal"] * 5 + ["nan", "inf"])
XDTYPE = st.sampled_from(["same"] * 6 + ["other", "bad"])
FACTORS = st.sampled_from([2, 2, 2, 1, 3, 4])


def _xdtype(choice, wdtype, seed):
    if choice == "same":
        return wdtype
    if choice == "other":
        return [d for d in FLOATS if d != wdtype][seed % 3]
    return BAD_DTYPES[seed % len(BAD_DTYPES)]


def _refused_input_dtype(layer, x, xchoice):
    """For a non-float or a mismatched input dtype: check the layer refuses it, naming the rule, and say True."""
    if xchoice == "bad":
        _expect(lambda: layer(x), TypeError, f"{NAME}: input x must have a floating dtype")
        return True
    if xchoice == "other":
        _expect(lambda: layer(x), TypeError, f"{NAME}: input x has dtype")
        return True
    return False


@SETTINGS
@given(st.sampled_from(ORTHO), st.integers(1, 6), st.integers(1, 4), st.sampled_from([0] * 6 + [1, 3]),
       st.integers(1, 12), FACTORS, st.booleans(), st.booleans(), CAYLEY, st.sampled_from(FLOATS),
       st.lists(st.integers(0, 3), max_size=2), LAYOUTS, VALUES, XDTYPE, st.integers(0, 2 ** 16))
def test_fuzz_orthogonal_linear(method, b, r, extra, d_out, m, scale, packed, cay, wdtype, lead, layout, values,
                                xchoice, seed):
    if method in ("gsoft", "double_gsoft") and seed % 5:
        m = 2  # mostly the valid factor count
    if method == "boft" and m > 1 and seed % 4:  # mostly a valid butterfly: even b, 2^(m-1) b | d_in
        b, r = b + b % 2, r * 2 ** (m - 1)
    if method != "boft" and seed % 13 == 1:  # huge block counts: hundreds of 1-element blocks (Q = I)
        b, r = 1, 150 + seed % 250
    if method == "double_gsoft" and seed % 4:
        d_out = b * max(1, d_out // b)
    d_in = b * r + extra
    torch.manual_seed(seed)
    if seed % 23 == 0:  # a complex layer: refused by every adapter, naming the layer
        cplx = nn.Linear(d_in, d_out, dtype=torch.complex64)
        for cls in (lambda: OrthogonalAdapter(cplx, method=method, block_size=b, n_factors=m, name=NAME),
                    lambda: SORSAAdapter(cplx, 1, name=NAME), lambda: LoLDUAdapter(cplx, 1, name=NAME)):
            _expect(cls, TypeError, f"{NAME}: the layer's weight must have a floating dtype")
        return
    base = nn.Linear(d_in, d_out).to(wdtype).requires_grad_(False)
    cayley, std = cay
    make = lambda: OrthogonalAdapter(base, method=method, block_size=b, n_factors=m, scale=scale,  # noqa: E731
                                     packed=packed, cayley=cayley, neumann_terms=6, name=NAME)
    err = _ortho_layer_errors(method, d_in, d_out, b, m)
    if err:
        msg = _expect(make, ValueError, *err)
        assert msg.startswith(f"{NAME}: ")
        return
    layer = make()
    _perturb(layer, std, seed)
    W0 = base.weight.detach().clone()
    xdtype = _xdtype(xchoice, wdtype, seed)
    x = _input((*lead, d_in), xdtype, layout, values, seed)
    if _refused_input_dtype(layer, x, xchoice):
        return
    if cayley == "neumann":
        # a series that lost orthogonality makes the layer switch to the exact Cayley (the oracle follows)
        warnings.filterwarnings("ignore", message=".*lost orthogonality")
    y = layer(x)
    Wq = orthogonal_weight_np(layer, method, W0)
    x64 = np64(x)
    bad = ~np.isfinite(x64).all(-1, keepdims=True)  # a row with a NaN/inf reaches every output (W dense)
    want = np.where(bad, 0.0, x64) @ Wq.T + (0 if base.bias is None else np64(base.bias))
    poisoned = torch.from_numpy(np.broadcast_to(bad, want.shape).copy())
    _close(y, want, wdtype, poisoned)
    event(f"matched float64 oracle ({'non-finite input' if values != 'normal' else 'finite'}, "
          f"{'empty' if y.numel() == 0 else 'non-empty'})")
    if r >= 150:
        event("matched float64 oracle with >= 150 blocks")
    # a wrong feature size is refused, naming the layer and in_features
    if values == "normal" and layout == "contiguous":
        _expect(lambda: layer(torch.zeros(2, d_in + 1, dtype=wdtype)), ValueError, f"{NAME}: input x.shape[-1]")


# ------------------------------------------------------------------ orthogonal adapters over nn.Conv2d
@SETTINGS
@given(st.sampled_from(ORTHO), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 6),
       st.integers(1, 6), st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.integers(1, 2), st.booleans(),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2), st.sampled_from(["ok", "ok", "ok", "3d", "channels"]),
       VALUES, st.integers(0, 2 ** 16))
def test_fuzz_orthogonal_conv2d(method, c_in, kh, kw, c_out, b, m, stride, padding, dilation, packed, wdtype, batch,
                                shape_kind, values, seed):
    torch.manual_seed(seed)
    base = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, dilation=dilation)
    base = base.to(wdtype).requires_grad_(False)
    d_in = c_in * kh * kw
    if seed % 4:  # mostly a block size that fits
        divisors = [k for k in range(1, d_in + 1) if d_in % k == 0 and k <= 8]
        b = divisors[seed % len(divisors)]
        m = 2 if method in ("gsoft", "double_gsoft") else m
        if method == "double_gsoft":
            c_out = b * max(1, c_out // b)
            base = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, dilation=dilation)
            base = base.to(wdtype).requires_grad_(False)
    make = lambda: OrthogonalAdapter(base, method=method, block_size=b, n_factors=m, packed=packed,  # noqa: E731
                                     name=NAME)
    err = _ortho_layer_errors(method, d_in, c_out, b, m, "in_channels*kh*kw", "out_channels")
    if err:
        msg = _expect(make, ValueError, *err)
        assert msg.startswith(f"{NAME}: ")
        return
    layer = make()
    _perturb(layer, 0.4, seed)
    W0 = base.weight.detach().clone()
    H, Wd = dilation * (kh - 1) + 2, dilation * (kw - 1) + 3
    if shape_kind == "channels":
        x = _input((batch, c_in + 1, H, Wd), wdtype, "contiguous", "normal", seed)
        _expect(lambda: layer(x), ValueError, f"{NAME}: input x must be (N, C, H, W)")
        return
    shape = (c_in, H, Wd) if shape_kind == "3d" else (batch, c_in, H, Wd)
    x = _input(shape, wdtype, "contiguous", values, seed)
    y = layer(x)
    Wq = torch.from_numpy(orthogonal_weight_np(layer, method, W0)).reshape(base.weight.shape)
    x64 = x.detach().double()
    bad = ~torch.isfinite(x64)
    conv = lambda inp, w, bias: F.conv2d(inp, w, bias, stride, padding, dilation)  # noqa: E731
    bias = None if base.bias is None else base.bias.detach().double()
    want = conv(x64.masked_fill(bad, 0), Wq, bias)
    reach = conv(bad.double(), (Wq.abs() > 0).double(), None) > 0
    _close(y, want.numpy(), wdtype, reach)
    event("matched float64 oracle")


# ------------------------------------------------------------------ SORSA / LoLDU
@SETTINGS
@given(st.sampled_from(["sorsa", "loldu"]), st.sampled_from(["linear", "conv"]), st.integers(1, 8), st.integers(1, 8),
       st.integers(-1, 10), st.sampled_from([torch.float32, torch.float64]), st.lists(st.integers(0, 3), max_size=2),
       LAYOUTS, VALUES, XDTYPE, st.integers(0, 2 ** 16))
def test_fuzz_low_rank(method, kind, a, c, rank, wdtype, lead, layout, values, xchoice, seed):
    torch.manual_seed(seed)
    base = nn.Linear(a, c) if kind == "linear" else nn.Conv2d(a, c, (1, 2))
    base = base.to(wdtype).requires_grad_(False)
    W0 = np64(base.weight).reshape(c, -1).copy()  # np64 of a float64 tensor shares its memory
    if seed % 4:  # mostly a valid rank
        rank = 1 + seed % min(W0.shape)
    cls = SORSAAdapter if method == "sorsa" else LoLDUAdapter
    if rank < 1:
        _expect(lambda: cls(base, rank, name=NAME), ValueError, "rank")
        return
    if rank > min(W0.shape):
        msg = _expect(lambda: cls(base, rank, name=NAME), ValueError, f"rank={rank} must be <= min(out, in)")
        assert NAME in msg
        return
    layer = cls(base, rank, name=NAME)
    _perturb(layer, 0.1, seed)
    want_W = lowrank_weight_np(method, W0, layer, rank)
    xdtype = _xdtype(xchoice, wdtype, seed)
    shape = (*lead, a) if kind == "linear" else (*lead[:1], a, 2, 3)
    x = _input(shape, xdtype, layout if kind == "linear" else "contiguous", values, seed)
    if _refused_input_dtype(layer, x, xchoice):
        return
    y = layer(x)
    x64 = x.detach().double()
    bias = None if base.bias is None else base.bias.detach().double()
    if kind == "linear":
        bad = ~torch.isfinite(x64).all(-1, keepdim=True)
        want = F.linear(x64.masked_fill(bad, 0), torch.from_numpy(want_W), bias)
        reach = bad.expand(want.shape)
    else:
        Wt = torch.from_numpy(want_W).reshape(base.weight.shape)
        bad = ~torch.isfinite(x64)
        want = F.conv2d(x64.masked_fill(bad, 0), Wt, bias)
        reach = F.conv2d(bad.double(), (Wt.abs() > 0).double()) > 0
    _close(y, want.numpy(), wdtype, reach)
    event("matched float64 oracle")


# ------------------------------------------------------------------ apply_ on small models
def _hash(model):
    out = []
    for k, v in model.state_dict().items():
        out.append((k, v.detach().clone()))
    return out, [(n, type(m).__name__) for n, m in model.named_modules()], [p.requires_grad for p in model.parameters()]


def _same(a, b):
    return (len(a[0]) == len(b[0]) and all(k1 == k2 and torch.equal(v1, v2) for (k1, v1), (k2, v2) in zip(a[0], b[0]))
            and a[1] == b[1] and a[2] == b[2])


@SETTINGS
@given(st.lists(st.integers(1, 16), min_size=2, max_size=4), st.sampled_from(gsops.adapters.METHODS),
       st.integers(2, 8), st.integers(1, 3), st.integers(1, 6), st.booleans(), st.integers(0, 2 ** 16))
def test_fuzz_apply(dims, method, b, m, rank, conv_first, seed):
    torch.manual_seed(seed)
    if method in ("sorsa", "loldu"):
        kw = dict(rank=rank)
    else:
        m = 2 if method in ("gsoft", "double_gsoft") else m
        b = b + 1 if method == "boft" and m > 1 and b % 2 else b
        kw = dict(block_size=b, n_factors=m)
        if seed % 2:  # half the time every dimension fits the blocks
            span = b * (2 ** (m - 1) if method == "boft" else 1)
            dims = [span * max(1, d // span) for d in dims]
    layers = []
    if conv_first:
        layers += [nn.Conv2d(1, dims[0], 1), nn.Flatten(-3)]  # (N, 1, 1, 1) -> (N, dims[0])
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.Tanh()]
    model = nn.Sequential(*layers).double()
    cfg = gsops.AdapterConfig(method=method, target_modules=[nn.Linear, nn.Conv2d], strict=True, **kw)
    x = torch.randn(5, 1, 1, 1, dtype=torch.float64) if conv_first else torch.randn(5, dims[0], dtype=torch.float64)
    y0 = model(x)
    before = _hash(model)
    # which layer must be refused first (apply_ validates in module order)
    first_bad = None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        d_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * 1
        d_out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        if method in ("sorsa", "loldu"):
            bad = rank > min(d_in, d_out)
        else:
            what = "in_features" if isinstance(mod, nn.Linear) else "in_channels*kh*kw"
            bad = bool(_ortho_layer_errors(method, d_in, d_out, cfg.block_size, cfg.n_factors, what))
        if bad:
            first_bad = name
            break
    if first_bad is not None:
        msg = _expect(lambda: gsops.apply_(model, cfg, verbose=False), ValueError, f"{first_bad}: ")
        assert msg.startswith(f"{first_bad}: ")
        assert _same(_hash(model), before), "a refused apply_ changed the model"
        return
    gsops.apply_(model, cfg, verbose=False)
    event("applied; identity at init and revert checked")
    torch.testing.assert_close(model(x), y0, **tol(torch.float64))  # identity at init
    trainable = {id(p) for p in gsops.trainable_parameters(model)}
    assert trainable == {id(p) for _, p in gsops.adapters.adapter_parameters(model)}
    gsops.revert_(model)
    after = _hash(model)
    assert after[1] == before[1] and after[2] == before[2]
    for (k, v1), (_, v0) in zip(after[0], before[0]):
        if method in ("sorsa", "loldu"):  # the residual is rebuilt in float64: one rounding
            torch.testing.assert_close(v1, v0, **tol(torch.float64))
        else:
            assert torch.equal(v1, v0), k

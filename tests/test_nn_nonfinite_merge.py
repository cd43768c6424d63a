"""Adapter layers under stress: non-finite policy, merge safety, determinism.

Policy (see the gsops/nn/mergeable.py module docstring): a layer whose adapter parameters hold NaN/inf
raises ValueError naming the layer and the parameter before any op runs; inputs are scanned only
on opt-in (GSOPS_CHECK_INPUTS=1 / gsops.checks.set_check_inputs); GSOPS_CHECK_FINITE=0 /
gsops.set_check_finite(False) is the global opt-out; merge() always checks.
"""
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import gsops
import gsops.checks
from gsops.nn.loldu import LoLDUAdapter
from gsops.nn.sorsa import SORSAAdapter
from gsops.nn import adapters as adapters_mod
from gsops.nn.adapters import OrthogonalAdapter
from gsops.tolerances import MERGE_DRIFT_TOL, tol

METHODS = ["gsoft", "double_gsoft", "oft", "boft", "sorsa", "loldu"]


def make(method, base, name="enc.layer3.q"):
    if method == "sorsa":
        return SORSAAdapter(base, 3, name=name)
    if method == "loldu":
        return LoLDUAdapter(base, 3, name=name)
    return OrthogonalAdapter(base, method=method, block_size=4, name=name)


def own(layer):
    return [(n, p) for n, p in layer.named_parameters() if not n.startswith("base_layer.")]


def perturb_(layer, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in own(layer):
            p.add_((std * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))


def poke_(p, value, k=None):
    """Set one entry (the middle one by default) of a parameter of any layout to ``value``."""
    k = p.numel() // 2 if k is None else k
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), p.shape))
    with torch.no_grad():
        p[idx] = value


def _base(kind, dtype=torch.float32):
    torch.manual_seed(3)
    base = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(8, 8, 3, padding=1)
    return base.to(dtype).requires_grad_(False)


def _x(kind, dtype=torch.float32, n=3):
    return torch.randn(n, 16, dtype=dtype) if kind == "linear" else torch.randn(n, 8, 5, 5, dtype=dtype)


@pytest.fixture
def restore_switches():
    yield
    gsops.set_check_finite(True)
    gsops.checks.set_check_inputs(False)


# ------------------------------------------------------------------ non-finite parameters
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_parameter_raises_naming_layer_before_any_op(method, kind, bad, monkeypatch):
    layer = make(method, _base(kind))
    perturb_(layer)
    for pname, p in own(layer):
        saved = p.detach().clone()
        poke_(p, bad)
        calls = []
        for op in ("cayley", "gs_apply", "block_diag_mm", "skew"):
            real = getattr(adapters_mod.ops, op)
            monkeypatch.setattr(adapters_mod.ops, op, lambda *a, _r=real, _n=op, **k: calls.append(_n) or _r(*a, **k))
        with pytest.raises(ValueError, match=rf"enc\.layer3\.q: adapter parameter\(s\) \['{pname}'\] contain NaN or inf"):
            layer(_x(kind))
        assert calls == [], f"ops ran before the check: {calls}"
        monkeypatch.undo()
        with torch.no_grad():
            p.copy_(saved)
    assert torch.isfinite(layer(_x(kind))).all()


def test_diverged_training_step_stops_at_next_forward():
    """An inf in one batch gives NaN gradients; Adam writes NaN into the parameters; the next forward refuses."""
    layer = make("gsoft", _base("linear"), name="model.fc")
    opt = torch.optim.Adam([p for _, p in own(layer)], lr=1e-2)
    x = _x("linear")
    x[0, 0] = float("inf")  # inputs are not scanned by default: this forward runs
    loss = layer(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with pytest.raises(ValueError, match=r"model\.fc: adapter parameter\(s\) \['scale', 'rotation\.factors\.params'\]"):
        layer(_x("linear"))


@pytest.mark.parametrize("method", METHODS)
def test_global_opt_out_lets_nan_through(method, restore_switches):
    layer = make(method, _base("linear"))
    poke_(own(layer)[0][1], float("nan"), 0)
    gsops.set_check_finite(False)
    y = layer(_x("linear"))  # documented opt-out: no scan, the NaN propagates
    assert not torch.isfinite(y).all()


@pytest.mark.parametrize("method", METHODS)
def test_inputs_scanned_only_on_opt_in(method, restore_switches, monkeypatch):
    layer = make(method, _base("linear"))
    x = _x("linear")
    x[1, 2] = float("nan")
    assert not torch.isfinite(layer(x)).all()  # default: not scanned (cost)
    gsops.checks.set_check_inputs(True)
    with pytest.raises(ValueError, match=r"enc\.layer3\.q: input x contains NaN or inf"):
        layer(x)
    gsops.checks.set_check_inputs(False)
    # the environment switch, read when gsops.checks is (re)loaded
    monkeypatch.setenv("GSOPS_CHECK_INPUTS", "1")
    try:
        importlib.reload(gsops.checks)
        with pytest.raises(ValueError, match="input x contains NaN"):
            layer(x)
    finally:
        monkeypatch.delenv("GSOPS_CHECK_INPUTS")
        importlib.reload(gsops.checks)
    assert not gsops.checks.check_inputs_enabled()


@pytest.mark.parametrize("method", METHODS)
def test_merge_refuses_nonfinite_even_when_checks_are_off(method, restore_switches):
    layer = make(method, _base("linear"))
    poke_(own(layer)[-1][1], float("inf"), 0)
    gsops.set_check_finite(False)
    W = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"enc\.layer3\.q: adapter parameter"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, W)


def test_merge_refuses_fp16_overflow():
    layer = make("oft", _base("linear", torch.float16))
    with torch.no_grad():
        layer.scale.fill_(3e4)  # |W| * 3e4 * ... overflows float16 (max 65504) for some rows
        layer.base_layer.weight.mul_(100)
    W = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="merged weight is not finite in torch.float16"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, W)


# ------------------------------------------------------------------ merge safety
def _rel_drift(W, W0):
    return float((W.double() - W0.double()).abs().max() / W0.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method", METHODS)
def test_hundred_merge_unmerge_cycles_bounded_drift(method, kind, dtype):
    layer = make(method, _base(kind, dtype))
    perturb_(layer)
    W0 = layer.base_layer.weight.detach().clone()
    x = _x(kind, dtype)
    y0 = layer(x)
    drift1 = None
    for i in range(100):
        assert layer.merge() and layer.merged
        if i == 0:
            torch.testing.assert_close(layer(x), y0, **tol(dtype))
        assert layer.unmerge() and not layer.merged
        if i == 0:
            drift1 = _rel_drift(layer.base_layer.weight, W0)
    drift = _rel_drift(layer.base_layer.weight, W0)
    print(f"{method} {kind} {dtype}: relative drift after 1 cycle {drift1:.2e}, after 100 {drift:.2e}")
    assert drift <= MERGE_DRIFT_TOL[dtype], (drift, MERGE_DRIFT_TOL[dtype])
    # it saturates (a few roundings), it does not accumulate with the number of cycles
    assert drift <= 4 * drift1 + torch.finfo(dtype).eps, (drift1, drift)
    torch.testing.assert_close(layer(x), y0, **tol(dtype))


@pytest.mark.parametrize("method", METHODS)
def test_double_merge_and_unmerge_unmerged_are_warned_no_ops(method):
    layer = make(method, _base("linear", torch.float64))
    perturb_(layer)
    W_train = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"enc\.layer3\.q .*not merged; unmerge\(\) did nothing"):
        assert layer.unmerge() is False
    assert torch.equal(layer.base_layer.weight, W_train)
    layer.merge()
    W_merged = layer.base_layer.weight.detach().clone()
    for _ in range(3):
        with pytest.warns(UserWarning, match="already merged; merge\\(\\) did nothing"):
            assert layer.merge() is False
        assert torch.equal(layer.base_layer.weight, W_merged)  # never a double apply
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W_train, **tol(torch.float64))


def test_model_level_merge_twice_and_unmerge_unmerged():
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 8))
    gsops.apply_(model, gsops.AdapterConfig(block_size=4), verbose=False)
    perturb_(model[0])
    perturb_(model[2])
    with pytest.warns(UserWarning, match="were not merged"):
        gsops.unmerge_(model)
    gsops.merge_(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        gsops.merge_(model)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", METHODS)
def test_unmerge_undoes_what_was_merged_after_parameters_changed(method):
    """An optimizer step while merged must not make unmerge write a wrong base weight."""
    layer = make(method, _base("linear", torch.float64))
    perturb_(layer)
    W_train = layer.base_layer.weight.detach().clone()
    layer.merge()
    perturb_(layer, seed=7)  # e.g. a training step on a merged model
    after = {n: p.detach().clone() for n, p in own(layer)}
    with pytest.warns(UserWarning, match="changed while merged"):
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W_train, **tol(torch.float64))
    assert all(torch.equal(p, after[n]) for n, p in own(layer))  # the new values are kept


# ------------------------------------------------------------------ determinism
def _run(method, kind, backend, device="cpu"):
    torch.manual_seed(1234)
    layer = make(method, _base(kind)).to(device)
    perturb_(layer)
    x = _x(kind).to(device)
    with gsops.use_backend(backend):
        y = layer(x)
        y.square().sum().backward()
    return [y.detach().cpu()] + [p.grad.cpu().clone() for _, p in own(layer)]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method", METHODS)
def test_same_seed_bitwise_same_forward_backward_cpu(method, kind):
    a, b = _run(method, kind, "torch"), _run(method, kind, "torch")
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v), "CPU forward/backward is not bitwise reproducible"


@pytest.mark.parametrize("method", ["gsoft", "oft"])
def test_same_seed_same_result_triton_interpreter(method):
    from gsops import backends

    ok, reason = backends.runs_on("triton", torch.device("cpu"))
    if not ok:
        pytest.skip(f"triton backend does not run on CPU here: {reason}")
    a, b = _run(method, "linear", "triton"), _run(method, "linear", "triton")
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    ref = _run(method, "linear", "torch")
    for u, v in zip(a, ref):
        torch.testing.assert_close(u, v, **tol(torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("method", ["gsoft", "oft", "boft"])
def test_gpu_backends_repeatable(method, backend):
    """Same seed on the GPU: equal to tolerance on every backend; bitwise equality is reported, not required
    (the CUDA backend reduces block gradients with atomicAdd, whose order varies between runs)."""
    from gsops import backends

    ok, reason = backends.runs_on(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(f"{backend} backend unavailable on CUDA: {reason}")
    a, b = _run(method, "linear", backend, "cuda"), _run(method, "linear", backend, "cuda")
    bitwise = all(torch.equal(u, v) for u, v in zip(a, b))
    print(f"{method} {backend} on CUDA: bitwise repeatable = {bitwise}")
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol(torch.float32))
    for u, v in zip(a, _run(method, "linear", "torch")):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)

"""The adapters' training step reads no device value on the host (zero syncs), and keeps its guarantees.

Syncs are counted as calls of ``aten::_local_scalar_dense`` (what ``.item()``, ``float()``, ``bool()``
and ``.tolist()`` reach) with ``perf.timing.SyncCounter`` (the harness's `syncs` column) over one forward + backward.
"""
import warnings

import pytest
import torch
from torch import nn

import gsops
from gsops.nn import guard
from gsops.nn.adapters import MergeableAdapter, OrthogonalAdapter
from perf.timing import SyncCounter

ORTHOGONAL = ["gsoft", "double_gsoft", "oft", "boft"]


def _model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    if kind == "conv1d":  # transformers' GPT-2 layer (weight stored transposed)
        from transformers.pytorch_utils import Conv1D

        return nn.Sequential(Conv1D(32, 32), nn.ReLU(), Conv1D(32, 32))
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))


def _input(kind):
    return torch.randn(6, 32) if kind in ("linear", "conv1d") else torch.randn(2, 8, 5, 5)


def _config(method, cayley):
    if method in ("sorsa", "loldu"):
        return gsops.AdapterConfig(method=method, rank=2, target_modules=["0", "2"])
    return gsops.AdapterConfig(method=method, block_size=4, cayley=cayley, target_modules=["0", "2"])


def _perturb(model):
    with torch.no_grad():
        for p in gsops.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))


def test_the_counter_sees_a_sync():
    """The counting mode can fail: the public op checks its argument's values on the host."""
    K = gsops.skew(torch.randn(3, 6), 4)
    with SyncCounter() as c:
        gsops.cayley(K)
    assert c.count > 0


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
@pytest.mark.parametrize("method,cayley", [(m, c) for m in ORTHOGONAL for c in ("exact", "neumann")]
                         + [("sorsa", "exact"), ("loldu", "exact")])
def test_training_step_has_no_host_sync(method, cayley, kind):
    model = _model(kind)
    gsops.apply_(model, _config(method, cayley))
    _perturb(model)
    x = _input(kind)
    model(x).square().sum().backward()  # warm-up (first-call caches)
    assert gsops.checks.check_finite_enabled()
    with SyncCounter() as c:
        model(x).square().sum().backward()
    assert c.count == 0, f"{method}/{cayley}/{kind}: {c.count} host syncs in one training step"


def _deferred(monkeypatch):
    """Make the CPU readout behave as on CUDA: values are read one call later."""
    def readout(self):
        r = self.__dict__.get("_readout")
        if r is None:
            r = self.__dict__["_readout"] = guard.DeferredReadout(immediate_on_cpu=False)
        return r
    monkeypatch.setattr(MergeableAdapter, "_guard_readout", readout)


@pytest.mark.parametrize("method", ORTHOGONAL + ["sorsa"])
def test_nonfinite_parameter_refused_at_the_latest_one_call_later(method, monkeypatch):
    _deferred(monkeypatch)
    model = _model("linear")
    gsops.apply_(model, _config(method, "exact"))
    x = _input("linear")
    model(x)
    layer = model[0]
    p = next(iter(p for _, p in layer.adapter_named_parameters()))
    with torch.no_grad():
        p[(0,) * p.dim()] = float("nan")
    model(x)  # the readout of this call travels to the host ...
    with pytest.raises(ValueError, match=r"^0: adapter parameter\(s\) \[.*\] contain NaN or inf"):
        model(x)  # ... and is read here


def test_nonfinite_parameter_refused_in_the_same_call_on_cpu():
    model = _model("linear")
    gsops.apply_(model, _config("gsoft", "exact"))
    with torch.no_grad():
        model[2].scale[3] = float("inf")
    with pytest.raises(ValueError, match=r"^2: adapter parameter\(s\) \['scale'\]"):
        model(_input("linear"))


def _grow_until_switch(layer, x, steps=400):
    opt = torch.optim.Adam([p for _, p in layer.adapter_named_parameters()], lr=0.05)
    target = 3 * torch.randn(x.shape[0], layer.d_out, dtype=x.dtype)
    for step in range(steps):
        was_series = layer.rotation.factors.series
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x)
        if was_series and not layer.rotation.factors.series:
            return step, caught
        opt.zero_grad()
        (y - target).square().mean().backward()
        opt.step()
    raise AssertionError("the series never lost orthogonality")


def test_neumann_switch_on_cuda_comes_one_call_late_and_is_said_once(monkeypatch):
    _deferred(monkeypatch)
    torch.manual_seed(0)
    layer = OrthogonalAdapter(nn.Linear(16, 16, dtype=torch.float64), method="oft", block_size=8,
                              cayley="neumann", neumann_terms=3, name="enc.v")
    x = torch.randn(32, 16, dtype=torch.float64)
    step, caught = _grow_until_switch(layer, x)
    msgs = [str(w.message) for w in caught if "lost orthogonality" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("enc.v.rotation: cayley='neumann'")
    # the switch was decided from the previous call's measurement: that call's series was already past
    # the threshold, and this call (and every later one) uses the exact, orthogonal Cayley
    Q = layer.rotation.dense(torch.float64)
    assert float((Q.T @ Q - torch.eye(16, dtype=torch.float64)).abs().max()) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # no second warning


@pytest.mark.parametrize("method", ["gsoft", "oft", "sorsa"])
def test_nonfinite_parameter_refused_under_torch_compile(method):
    """The compiled graph keeps the check: the layer's judge runs at run time inside it."""
    torch._dynamo.reset()
    model = _model("linear")
    gsops.apply_(model, _config(method, "exact"))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = _input("linear")
    torch.testing.assert_close(compiled(x), model(x))
    p = next(iter(p for _, p in model[2].adapter_named_parameters()))
    with torch.no_grad():
        p[(0,) * p.dim()] = float("nan")
    with pytest.raises(ValueError, match=r"^2: adapter parameter\(s\) \[.*\] contain NaN or inf"):
        compiled(x)


def test_neumann_switch_under_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = OrthogonalAdapter(nn.Linear(16, 16), method="oft", block_size=8, cayley="neumann", neumann_terms=3,
                              name="enc.v")
    with torch.no_grad():
        layer.rotation.factors.params.normal_(0, 0.5)  # a series far from orthogonal
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)
    assert not layer.rotation.factors.series
    assert any("enc.v.rotation" in str(w.message) and "lost orthogonality" in str(w.message) for w in caught)
    y = compiled(x)  # recompiled on the exact path
    torch.testing.assert_close(y, layer(x))

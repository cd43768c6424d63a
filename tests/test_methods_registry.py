"""The method registry (gsops.methods) is the one source of each method's rules and construction.

Every registered method goes through apply_ / merge_ / unmerge_ / save / load / revert_;
a rule of an entry is what AdapterConfig, apply_ and the layer constructor all refuse
with; a method registered here, in this file alone, works with the model verbs.
"""
import copy

import pytest
import torch
from torch import nn

import gsops
from gsops.methods import MethodSpec, registry
from gsops.nn.adapters import OrthogonalAdapter
from gsops.nn.layers import adapter_param_dtype
from gsops.nn.mergeable import MergeableAdapter
from gsops.tolerances import tol


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def _config(spec, **kw):
    if "rank" in spec.params:
        kw.setdefault("rank", 2)
    if "block_size" in spec.params:
        kw.setdefault("block_size", 4)
    return gsops.AdapterConfig(method=spec.name, target_modules=["fc1", "fc2"], **kw)


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gsops.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("method", registry.names())
def test_every_registered_method_round_trips(method, tmp_path):
    spec = registry.get(method)
    base = _net()
    x = torch.randn(5, 16, dtype=torch.float64)
    want_base = base(x)
    model = gsops.apply_(copy.deepcopy(base), _config(spec), verbose=False)
    assert [type(m) for _, m in gsops.adapters.adapter_layers(model)] == [spec.adapter_type] * 2
    torch.testing.assert_close(model(x), want_base, **tol(torch.float64))  # identity at initialisation
    _perturb(model)
    y = model(x)
    assert (y - want_base).abs().max() > 1e-4  # the adapter really changes the function
    gsops.save_adapter(model, tmp_path / "a")
    loaded = gsops.load_adapter(_net(), tmp_path / "a")
    assert torch.equal(loaded(x), y)
    weights = [m.base_layer.weight.detach().clone() for _, m in gsops.adapters.adapter_layers(model)]
    gsops.merge_(model)
    torch.testing.assert_close(model(x), y, **tol(torch.float64))
    gsops.unmerge_(model)
    for (_, m), w in zip(gsops.adapters.adapter_layers(model), weights):
        torch.testing.assert_close(m.base_layer.weight, w, **tol(torch.float64))
    gsops.revert_(model)
    assert isinstance(model.fc1, nn.Linear)
    torch.testing.assert_close(model(x), want_base, **tol(torch.float64))


@pytest.mark.parametrize("method", registry.names("orthogonal"))
def test_block_size_rules_come_from_the_registry_entry(method, monkeypatch):
    spec = registry.get(method)
    why = spec.block_problem(None, 1, 2)
    with pytest.raises(ValueError) as e:
        gsops.AdapterConfig(method=method, block_size=1)
    assert str(e.value) == why and "block_size=1" in why
    with pytest.raises(ValueError) as e:
        OrthogonalAdapter(nn.Linear(8, 8), method, block_size=1, name="enc.q")
    assert str(e.value) == f"enc.q: {why}"
    # the entry is the only judge: a rule added to it is what the config, apply_ and the layer all refuse with
    made_before = gsops.AdapterConfig(method=method, block_size=4, strict=True, target_modules=["fc1"])
    real = spec.block_problem

    def stricter(base, block_size, n_factors):
        return "block_size=4 is refused by this test" if block_size == 4 else real(base, block_size, n_factors)

    monkeypatch.setattr(spec, "block_problem", stricter)
    with pytest.raises(ValueError, match="^block_size=4 is refused by this test$"):
        gsops.AdapterConfig(method=method, block_size=4)
    with pytest.raises(ValueError, match="^enc.q: block_size=4 is refused by this test$"):
        OrthogonalAdapter(nn.Linear(8, 8), method, block_size=4, name="enc.q")
    model = _net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="^fc1: block_size=4 is refused by this test$"):
        gsops.apply_(model, made_before, verbose=False)
    assert isinstance(model.fc1, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_boft_even_block_rule_is_one_message():
    spec = registry.get("boft")
    why = spec.block_problem(None, 3, 2)
    with pytest.raises(ValueError) as e:
        gsops.AdapterConfig(method="boft", block_size=3, n_factors=2)
    assert str(e.value) == why
    with pytest.raises(ValueError) as e:
        OrthogonalAdapter(nn.Linear(12, 12), "boft", block_size=3, n_factors=2)
    assert str(e.value) == f"layer: {why}"


# ------------------------------------------------------------------ a method defined in this file only
class ScaleAdapter(MergeableAdapter):
    """A toy method: ``y = diag(s) W x + c`` with a learned per-output scale ``s`` (init 1), nn.Linear only."""

    def __init__(self, base, name="layer", adapter_dtype=None):
        super().__init__()
        self.base_layer = base
        pdt = adapter_param_dtype(base.weight.dtype, adapter_dtype)
        self.s = nn.Parameter(torch.ones(base.out_features, dtype=pdt, device=base.weight.device))
        self.merged = False
        self.name = name
        self._guard_key()

    def forward(self, x):
        self.check_input(x)
        if self.merged:
            return self.base_layer(x)
        self.check_parameters_finite()
        W = self._flat_weight()
        return self._base_forward(x, W * self.s.to(W.dtype)[:, None])

    def _merged_weight(self):
        return self._flat_weight(torch.float64) * self.s.double()[:, None]

    def _unmerged_weight(self):
        return self._flat_weight(torch.float64) / self.s.double()[:, None]


class ToyScale(MethodSpec):
    name = "toy_scale"
    title = "toy scale"
    family = "toy"
    adapter_type = ScaleAdapter

    def layer_settings(self, name, layer, config, overrides=None):
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name}: toy_scale wraps nn.Linear only, got {type(layer).__name__}")
        return dict(overrides or {})

    def build(self, name, layer, config, settings):
        return ScaleAdapter(layer, name=name, adapter_dtype=config.adapter_torch_dtype)


@pytest.fixture
def toy():
    spec = registry.register(ToyScale())
    yield spec
    registry.unregister(spec.name)


def test_a_method_registered_in_a_test_works_with_the_verbs(toy, tmp_path):
    base = _net()
    x = torch.randn(5, 16, dtype=torch.float64)
    config = gsops.AdapterConfig(method="toy_scale", target_modules=["fc1"])
    model = gsops.apply_(copy.deepcopy(base), config, verbose=False)
    layers = gsops.adapters.adapter_layers(model)
    assert [n for n, _ in layers] == ["fc1"] and isinstance(layers[0][1], ScaleAdapter)
    assert gsops.adapter_summary(model).trainable == 8
    _perturb(model)
    s = layers[0][1].s.detach()
    h = torch.tanh(x @ (s[:, None] * base.fc1.weight).T + base.fc1.bias)  # the toy's definition, by hand
    want = base.fc2(h)
    torch.testing.assert_close(model(x), want, **tol(torch.float64))
    gsops.save_adapter(model, tmp_path / "toy")
    loaded = gsops.load_adapter(_net(), tmp_path / "toy")
    assert torch.equal(loaded(x), model(x))
    gsops.merge_(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, s[:, None] * base.fc1.weight, **tol(torch.float64))
    torch.testing.assert_close(model(x), want, **tol(torch.float64))
    gsops.unmerge_(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, base.fc1.weight, **tol(torch.float64))
    with pytest.raises(ValueError, match="toy_scale wraps nn.Linear only, got Conv2d"):
        gsops.apply_(nn.Sequential(nn.Conv2d(2, 2, 1)), gsops.AdapterConfig(method="toy_scale", target_modules=["0"]))
    gsops.revert_(model)
    assert type(model.fc1) is nn.Linear
    torch.testing.assert_close(model(x), base(x), **tol(torch.float64))


def test_registry_refuses_a_taken_name_and_an_unknown_method():
    with pytest.raises(ValueError, match="'gsoft' is already registered"):
        registry.register(type("Dup", (MethodSpec,), {"name": "gsoft"})())
    with pytest.raises(ValueError, match=r"method='toy_scale' must be one of \('gsoft'"):
        gsops.AdapterConfig(method="toy_scale")

"""torch.compile of an adapted model: compiled == eager (outputs and gradients), and graph breaks counted.

One small model per method is compiled once for the whole module
to keep the suite fast; the graph-break check reads dynamo's own counters of that compile.
"""
import copy

import pytest
import torch
from torch import nn

import gsops
from gsops.tolerances import tol

# (name, adapter config, torch.compile backend): inductor (the default, generates code) for GSOFT;
# aot_eager (dynamo + AOTAutograd through the ops' fake/autograd registrations, no codegen) for BOFT
# to keep the suite fast.
METHODS = [
    ("gsoft", dict(method="gsoft", block_size=4), "inductor"),
    ("boft", dict(method="boft", block_size=4, n_factors=2), "aot_eager"),
]


def _model(cfg):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    gsops.apply_(m, gsops.AdapterConfig(target_modules=["0"], **cfg), verbose=False)
    with torch.no_grad():  # move away from Q = I so a wrong rotation would show
        for p in gsops.trainable_parameters(m):
            p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def compiled_run():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    out = {}
    for name, cfg, backend in METHODS:
        dynamo.reset()
        counters.clear()
        eager = _model(cfg)
        comp = copy.deepcopy(eager)
        x = torch.randn(5, 16, dtype=torch.float64)
        ye = eager(x)
        ye.square().sum().backward()
        fn = torch.compile(comp, backend=backend)
        yc = fn(x)
        yc.square().sum().backward()
        ge = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
        gc = {n: p.grad for n, p in comp.named_parameters() if p.requires_grad}
        breaks = {str(k)[:300]: v for k, v in counters["graph_break"].items()}
        out[name] = (ye.detach(), yc.detach(), ge, gc, breaks, int(counters["stats"]["unique_graphs"]))
    return out


@pytest.mark.parametrize("name", [m for m, *_ in METHODS])
def test_compiled_equals_eager(compiled_run, name):
    ye, yc, ge, gc, _, _ = compiled_run[name]
    t = tol(torch.float64)
    torch.testing.assert_close(yc, ye, **t)
    assert set(ge) == set(gc) and ge
    for n in ge:
        assert gc[n] is not None, n
        torch.testing.assert_close(gc[n], ge[n], **t, msg=lambda m: f"{n}: {m}")
    # the adapter changes the output (so equality is not vacuous)
    assert any(g.abs().max() > 0 for g in ge.values())


@pytest.mark.parametrize("name", [m for m, *_ in METHODS])
def test_adapted_model_compiles_without_graph_breaks(compiled_run, name):
    *_, breaks, graphs = compiled_run[name]
    if breaks:
        pytest.xfail(
            f"{sum(breaks.values())} graph break(s), {graphs} graph(s) for one forward (source lines: "
            "python examples/compile_check.py); dynamo's reasons: "
            + " | ".join(f"{v}x {k}" for k, v in breaks.items())
        )
    assert graphs == 1

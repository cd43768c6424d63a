"""LipConvnet: Table 3 parameter counts, 1-Lipschitz outputs, certified accuracy against loops."""
import math

import pytest
import torch
from torch import nn

import gsops
from gsops.models import LipConvnet

D = torch.float64

# Table 3 of Gorbunov et al. (2024): LipConvnet-15 on 32x32x3 input, CIFAR-100, parameters in millions,
# with the number of decimals the paper prints.
TABLE3 = [
    ("soc", None, "24.1"),
    ("gssoc", (4, None), "6.81"),
    ("gssoc", (4, 1), "8.91"),
    ("gssoc", (4, 2), "7.86"),
    ("gssoc", (4, 4), "7.3"),
]


@pytest.mark.parametrize("conv,groups,paper", TABLE3)
def test_table3_parameter_counts(conv, groups, paper):
    with torch.device("meta"):
        model = LipConvnet(depth=15, base_channels=32, conv=conv, groups=groups or (4, None), num_classes=100)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    decimals = len(paper.split(".")[1])
    assert f"{n / 1e6:.{decimals}f}" == paper, n
    if conv == "soc":
        assert f"{n / 1e6:.2f}" == "24.07"  # the paper's Table 3 figure


def test_soc_count_by_hand():
    # SOC LipConvnet-15: per conv a (work, work, k, k) kernel + a bias of out channels; work = max(in*s^2, out).
    # level l: planes p = 32 * 2^l; blocks (in -> p, k3), (p -> p, k3), (p -> 2p, stride 2, k3; k1 at level 5).
    expected = 0
    cin = 3
    for level in range(5):
        p = 32 * 2 ** level
        for i, (stride, k) in enumerate([(1, 3), (1, 3), (2, 1 if level == 4 else 3)]):
            cout = p * stride
            work = max(cin * stride * stride, cout)
            expected += work * work * k * k + cout
            cin = cout
    expected += 1024 * 1024 + 100
    with torch.device("meta"):
        model = LipConvnet(15, 32, "soc", num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("conv,groups", [("soc", None), ("gssoc", (4, 2))])
def test_lipconvnet_is_one_lipschitz(conv, groups):
    torch.manual_seed(1)
    model = LipConvnet(5, 8, conv, groups or (4, None), num_classes=10).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=D)
    d = 1e-2 * torch.randn_like(x)
    out, out2 = model(x), model(x + d)
    assert out.shape == (3, 10)
    ratio = (out2 - out).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert ratio.max().item() <= 1 + 1e-8
    assert ratio.min().item() > 0


def test_lipconvnet_trains_one_step():
    model = LipConvnet(5, 8, "gssoc", (4, 1), num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_lipconvnet_bad_arguments():
    with pytest.raises(ValueError, match="depth=7 must be a multiple of 5"):
        LipConvnet(7)
    with pytest.raises(ValueError, match="conv='bcop' must be"):
        LipConvnet(5, 8, "bcop")
    with pytest.raises(ValueError, match="input_size=16 must be a multiple of 32"):
        LipConvnet(5, 8, input_size=16)
    with pytest.raises(ValueError, match="must have shape \\(N, 3, 32, 32\\)"):
        LipConvnet(5, 8, num_classes=10)(torch.randn(1, 3, 16, 16))


# ---------------------------------------------------------------- certified accuracy
class Logits(nn.Module):
    """A 1-Lipschitz 'model' whose logits are its input (margins known by construction)."""

    def forward(self, x):
        return x * 1.0


def certified_by_loops(logits, y, eps, lip=1.0):
    hits = 0
    for i in range(logits.shape[0]):
        true = float(logits[i, y[i]])
        best_other = max(float(logits[i, j]) for j in range(logits.shape[1]) if j != int(y[i]))
        if true - best_other > math.sqrt(2) * eps * lip:
            hits += 1
    return hits / logits.shape[0]


def test_certified_accuracy_hand_computed():
    logits = torch.tensor([
        [3.0, 1.0, 0.0],   # y=0 margin 2.0
        [0.0, 0.5, 0.4],   # y=1 margin 0.1
        [1.0, 1.0, 0.0],   # y=0 margin 0 (tie): never certified
        [0.0, 2.0, 1.0],   # y=0 wrong: margin -2
        [0.0, 0.0, 0.3],   # y=2 margin 0.3
    ], dtype=D)
    y = torch.tensor([0, 1, 0, 0, 2])
    model = Logits().train()
    for eps in (0.0, 0.05, 0.1, 0.2, 1.0, 2.0):
        got = gsops.certified_accuracy(model, logits, y, eps)
        assert got == certified_by_loops(logits, y, eps)
    # at eps = 0.1: margins 2.0 and 0.3 exceed sqrt(2)*0.1 = 0.1414, margin 0.1 does not
    assert gsops.certified_accuracy(model, logits, y, 0.1) == 2 / 5
    assert gsops.certified_accuracy(model, logits, y, 0.1, lipschitz=3.0) == certified_by_loops(logits, y, 0.1, 3.0)
    assert model.training  # restored


def test_certified_accuracy_random_and_batched():
    logits = torch.randn(37, 7, dtype=D)
    y = torch.randint(0, 7, (37,))
    for eps in (0.0, 0.3):
        got = gsops.certified_accuracy(Logits(), logits, y, eps, batch_size=8)
        assert got == certified_by_loops(logits, y, eps)


def test_certified_accuracy_bad_arguments():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="eps=-0.1 must be"):
        gsops.certified_accuracy(Logits(), x, y, -0.1)
    with pytest.raises(ValueError, match="y must have shape \\(N,\\)"):
        gsops.certified_accuracy(Logits(), x, y[:2], 0.1)
    with pytest.raises(TypeError, match="y must be an integer"):
        gsops.certified_accuracy(Logits(), x, y.double(), 0.1)
    with pytest.raises(ValueError, match="lipschitz=0 must be"):
        gsops.certified_accuracy(Logits(), x, y, 0.1, lipschitz=0)


def test_gssoc_lipconvnet_refuses_state_without_format_and_stays_unchanged():
    torch.manual_seed(0)
    src = LipConvnet(5, 8, "gssoc", (4, 2), num_classes=10)
    dst = LipConvnet(5, 8, "gssoc", (4, 2), num_classes=10)
    sd = src.state_dict()
    n_grouped = sum(isinstance(m, gsops.GSSOC) for m in src.modules())
    assert sum(k.endswith("format_version") for k in sd) == 2 * n_grouped  # GSSOC and its grouped conv1
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    old = {k: v for k, v in sd.items() if not k.endswith("format_version")}
    with pytest.raises(RuntimeError, match="cannot load GSSOC state at 'features.0.0.'"):
        dst.load_state_dict(old)
    # only the last layer in the old format: the layers before it are not loaded either
    mixed = {k: v for k, v in sd.items() if not k.startswith("features.4.0.format_version")}
    with pytest.raises(RuntimeError, match="cannot load GSSOC state at 'features.4.0.'"):
        dst.load_state_dict(mixed)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k
    dst.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dst.eval()(x), src.eval()(x))
    # an SOC network has no grouped layer and no format key
    assert not any(k.endswith("format_version") for k in LipConvnet(5, 8, "soc", num_classes=10).state_dict())

"""The torch stand-in for PEFT BOFT's fbd_cuda extension (perf/peft_boft.py).

Oracles: torch.block_diag with autograd, and an independent float64 dense
computation of BOFT's formula built with explicit loops.
"""
import pytest
import torch
from torch import nn

from perf import peft_boft

peft = pytest.importorskip("peft", reason="peft is a test dependency of the BOFT baseline")
from peft.tuners.boft import layer as boft_layer  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_peft_extension():
    previous = boft_layer._FBD_CUDA
    yield
    boft_layer._FBD_CUDA = previous


@pytest.mark.parametrize("z,n,b", [(1, 1, 1), (1, 4, 3), (2, 3, 4), (3, 5, 2)])
def test_forward_matches_torch_block_diag(z, n, b):
    blocks = torch.randn(z, n, b, b, dtype=torch.float64)
    out = peft_boft.block_diag_forward(blocks)
    expected = torch.stack([torch.block_diag(*blocks[k]) for k in range(z)])
    assert out.shape == (z, n * b, n * b)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("z,n,b", [(1, 4, 3), (2, 3, 4), (3, 2, 5)])
def test_backward_matches_block_diag_autograd(z, n, b):
    blocks = torch.randn(z, n, b, b, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(z, n * b, n * b, dtype=torch.float64)  # nonzero off the blocks too
    expected = torch.stack([torch.block_diag(*blocks[k]) for k in range(z)])
    (g_expected,) = torch.autograd.grad(expected, blocks, grad_out)
    g = peft_boft.block_diag_backward(grad_out, blocks.detach())
    assert g.shape == blocks.shape
    torch.testing.assert_close(g, g_expected, rtol=0, atol=0)


def test_peft_fastblockdiag_uses_standin_and_gradchecks():
    peft_boft.enable_cpu_fbd()
    assert peft_boft.standin_enabled()
    blocks = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    out = boft_layer.FastBlockDiag.apply(blocks)
    torch.testing.assert_close(out, torch.stack([torch.block_diag(*blocks[k]) for k in range(2)]))
    assert torch.autograd.gradcheck(boft_layer.FastBlockDiag.apply, (blocks,))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="blocks must have shape"):
        peft_boft.block_diag_forward(torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match="grad_output must have shape"):
        peft_boft.block_diag_backward(torch.randn(1, 4, 4), torch.randn(1, 2, 3, 3))


class _Tiny(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def _dense_boft_output(layer, x):
    """BOFT's y = s * ((x M) W^T) + c, M = prod_i P_i BD_i P_i^T, each block (I - S)(I + S)^{-1}, S = (R - R^T)/2."""
    R = layer.boft_R["default"].detach().double()
    s = layer.boft_s["default"].detach().double().reshape(-1)
    P = layer.boft_P.double()
    m, n, b, _ = R.shape
    d = n * b
    eye = torch.eye(b, dtype=torch.float64)
    M = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        BD = torch.zeros(d, d, dtype=torch.float64)
        for j in range(n):
            S = 0.5 * (R[i, j] - R[i, j].T)
            BD[j * b:(j + 1) * b, j * b:(j + 1) * b] = (eye - S) @ torch.linalg.inv(eye + S)
        M = P[i] @ BD @ P[i].T @ M
    W = layer.base_layer.weight.detach().double()
    c = layer.base_layer.bias.detach().double()
    return s * ((x.double() @ M) @ W.T) + c


def test_peft_boft_keeps_requested_factors_and_matches_dense():
    from peft import BOFTConfig, get_peft_model

    peft_boft.enable_cpu_fbd()
    torch.manual_seed(1)
    model = get_peft_model(
        _Tiny(16, 6),
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["lin"], init_weights=False),
    ).double()
    peft_boft.check_boft_factors(model, 3, block_size=4)
    (_, layer), = peft_boft.boft_layers(model)
    assert tuple(layer.boft_R["default"].shape) == (3, 4, 4, 4)
    x = torch.randn(5, 16, dtype=torch.float64)
    y = model(x)
    torch.testing.assert_close(y, _dense_boft_output(layer, x), rtol=1e-10, atol=1e-10)
    y.square().sum().backward()
    g = layer.boft_R["default"].grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_check_boft_factors_catches_silent_reduction(monkeypatch):
    from peft import BOFTConfig, get_peft_model

    boft_layer._FBD_CUDA = None
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)  # what PEFT sees when its build fails
    model = get_peft_model(
        _Tiny(16, 6), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["lin"])
    )
    with pytest.raises(ValueError, match="1 butterfly factor.*n_factors=3"):
        peft_boft.check_boft_factors(model, 3)
    peft_boft.check_boft_factors(model, 1)  # what PEFT actually built


def test_check_boft_factors_needs_a_boft_layer():
    with pytest.raises(ValueError, match="no PEFT BOFT layer"):
        peft_boft.check_boft_factors(_Tiny(4, 4), 2)

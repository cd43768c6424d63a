"""Triton grouped convolution exponential vs the torch reference (CUDA tensors on a GPU, else the
interpreter on CPU, tiny shapes)."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from gsops.reference import conv_exp as cref  # noqa: E402
from gsops.tolerances import tol  # noqa: E402
from triton_kernels.conv_exp import conv_exp_triton  # noqa: E402


@pytest.mark.parametrize("dtype,C,groups,k,H,W,terms", [
    (torch.float32, 4, 2, 3, 3, 5, 3),
    (torch.float64, 3, 1, 3, 4, 3, 4),
    (torch.float64, 4, 4, 1, 2, 3, 2),
])
def test_triton_conv_exp_matches_reference_fwd_bwd(dtype, C, groups, k, H, W, terms, device):
    L = 0.3 * cref.skew_kernel(torch.randn(C, C // groups, k, k, dtype=dtype), groups)
    L = L.to(device).requires_grad_()
    x = torch.randn(1, C, H, W, dtype=dtype).to(device).requires_grad_()
    y = conv_exp_triton(x, L, terms, groups)
    y_ref = cref.conv_exp(x, L, terms, groups)
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    g = torch.randn_like(y)
    gx, gL = torch.autograd.grad(y, (x, L), g)
    gx_ref, gL_ref = torch.autograd.grad(y_ref, (x, L), g)
    torch.testing.assert_close(gx, gx_ref, **tol(dtype))
    torch.testing.assert_close(gL, gL_ref, **tol(dtype))


def test_triton_conv_exp_through_dispatch_when_backend_loads(device):
    import gsops
    from gsops import backends

    ok, reason = backends.runs_on("triton", device)
    if not ok:
        pytest.skip(f"the Triton backend does not load here: {reason}")
    L = 0.3 * cref.skew_kernel(torch.randn(4, 2, 3, 3), 2).to(device)
    x = torch.randn(1, 4, 3, 3).to(device)
    with gsops.use_backend("triton"):
        y = gsops.conv_exp(x, L, 3, 2)
    torch.testing.assert_close(y, cref.conv_exp(x, L, 3, 2), **tol(torch.float32))

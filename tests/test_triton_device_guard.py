"""The Triton backend's device guard: every tensor of a launch on one device (an error naming the
arguments otherwise, before any kernel runs), and launches made with the tensors' CUDA device current."""
import pytest
import torch

pytest.importorskip("triton")

from gsops import backends  # noqa: E402

ok, _reason = backends.load("triton")
if not ok:
    pytest.skip(f"the triton backend does not load here: {_reason}", allow_module_level=True)

from gsops.backends import triton_backend as tb  # noqa: E402


def test_mixed_devices_are_refused_naming_the_arguments(device):
    r, b = 2, 4
    x, L = torch.randn(3, r * b, device=device), torch.randn(r, b, b, device=device)
    R_meta = torch.randn(r, b, b, device="meta")
    with pytest.raises(ValueError, match=rf"gs_apply: R is on meta but x is on {device}"):
        tb.gs_apply(x, L, R_meta)
    with pytest.raises(ValueError, match=rf"gs_apply_backward: x is on meta but grad is on {device}"):
        tb.gs_apply_backward(x, x.to("meta"), L, L)
    with pytest.raises(ValueError, match=rf"gs_chain: blocks\[1\] is on meta but x is on {device}"):
        tb.gs_chain(x, [L, R_meta])
    with pytest.raises(ValueError, match=rf"cayley_exact_backward: Q is on meta but grad is on {device}"):
        tb.cayley_exact_backward(L, R_meta)


def test_conv_exp_on_the_triton_backend_refuses_mixed_devices(device):
    from gsops.ops import conv_exp  # noqa: F401 - registers the op
    from gsops.ops import dispatch

    impl = dispatch.impl("conv_exp", "triton")
    x = torch.randn(1, 4, 3, 3, device=device)
    with pytest.raises(ValueError, match=rf"conv_exp: L is on meta but x is on {device}"):
        impl(x, torch.randn(4, 2, 3, 3, device="meta"), 2, 2)


def test_guarded_launch_still_computes(device):
    r, b = 2, 4
    x, L, R = torch.randn(3, r * b, device=device), torch.randn(r, b, b, device=device), torch.randn(r, b, b, device=device)
    from gsops import reference as ref

    torch.testing.assert_close(tb.gs_apply(x, L, R), ref.gs_apply(x, L, R), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_the_tensors_device_not_the_current_one():
    r, b = 2, 16
    x = torch.randn(5, r * b, device="cuda:1")
    L, R = torch.randn(r, b, b, device="cuda:1"), torch.randn(r, b, b, device="cuda:1")
    from gsops import reference as ref

    with torch.cuda.device(0):
        y = tb.gs_apply(x, L, R)
    assert y.device == x.device
    torch.testing.assert_close(y, ref.gs_apply(x, L, R), rtol=1e-5, atol=1e-5)

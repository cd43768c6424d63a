"""Bad input: each rule raises before computing, with a message naming the argument."""
import pytest
import torch

import gsops

x12 = torch.randn(2, 12)
B43 = torch.randn(4, 3, 3)


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda: gsops.perm(5, 12), ValueError, r"k=5 must divide n=12"),
        (lambda: gsops.perm(0, 12), ValueError, r"k=0 must be >= 1"),
        (lambda: gsops.perm(2.0, 12), TypeError, r"k must be an int"),
        (lambda: gsops.perm(True, 12), TypeError, r"k must be an int"),
        (lambda: gsops.permute(x12, 5), ValueError, r"k=5 must divide x.shape\[-1\]=12"),
        (lambda: gsops.permute(torch.arange(12), 3), TypeError, r"x must have a floating dtype"),
        (lambda: gsops.permute([1.0, 2.0], 1), TypeError, r"x must be a torch.Tensor"),
        (lambda: gsops.paired_perm(2, 7), ValueError, r"n=7 must be even"),
        (lambda: gsops.paired_perm(4, 12), ValueError, r"k=4 must divide n // 2=6"),
        (lambda: gsops.block_diag_mm(x12, torch.randn(4, 3, 2)), ValueError, r"B must have shape \(r, b, b\)"),
        (lambda: gsops.block_diag_mm(x12, torch.randn(12, 3)), ValueError, r"B must be 3-D"),
        (lambda: gsops.block_diag_mm(x12, torch.randn(5, 3, 3)), ValueError, r"x.shape\[-1\]=12 must equal r\*b of B=15"),
        (lambda: gsops.block_diag_mm(x12, B43.to(torch.int64)), TypeError, r"B must have a floating dtype"),
        (lambda: gsops.block_diag_mm(x12.to(torch.int32), B43), TypeError, r"x must have a floating dtype"),
        (lambda: gsops.block_diag_mm(torch.randn(()), B43), ValueError, r"x must have at least 1 dimension"),
        (lambda: gsops.block_diag_mm(x12, torch.full((4, 3, 3), float("nan"))), ValueError, r"B contains NaN or inf"),
        (lambda: gsops.block_diag_mm(x12, torch.randn(0, 3, 3)), ValueError, r"B must have at least one block"),
        (lambda: gsops.gs_chain(x12, []), ValueError, r"blocks must contain at least one"),
        (lambda: gsops.gs_chain(x12, B43), TypeError, r"blocks must be a list"),
        (lambda: gsops.gs_chain(x12, [B43, torch.randn(3, 4, 4)]), ValueError, r"blocks\[1\] has 3 blocks, expected r=4"),
        (lambda: gsops.gs_chain(x12, [B43, torch.randn(4, 2, 2)]), ValueError, r"blocks\[1\] has block size 2, expected b=3"),
        (lambda: gsops.gs_apply(x12, torch.randn(2, 6, 6), B43), ValueError, r"L has 2 blocks, expected r=4"),
        (lambda: gsops.gs_apply(torch.randn(2, 10), B43, B43), ValueError, r"x.shape\[-1\]=10 must equal r\*b"),
        (lambda: gsops.gs_apply(x12, B43, torch.full((4, 3, 3), float("inf"))), ValueError, r"R contains NaN or inf"),
        (lambda: gsops.gs_dense(B43, torch.randn(4, 2, 2)), ValueError, r"L has block size 3, expected b=2"),
        (lambda: gsops.skew(torch.randn(5), 4), ValueError, r"params.shape\[-1\]=5 must equal b\*\(b-1\)/2=6 for b=4"),
        (lambda: gsops.skew(torch.randn(6), 0), ValueError, r"b=0 must be >= 1"),
        (lambda: gsops.unskew(torch.randn(3, 4)), ValueError, r"K must have square trailing dimensions"),
        (lambda: gsops.cayley(torch.randn(3, 3)), ValueError, r"K must be skew-symmetric"),
        (lambda: gsops.cayley(torch.zeros(3, 3), method="pade"), ValueError, r"method='pade' must be 'exact' or 'neumann'"),
        (lambda: gsops.cayley(torch.zeros(3, 3), method="neumann", terms=0), ValueError, r"terms=0 must be >= 1"),
        (lambda: gsops.cayley(torch.full((3, 3), float("nan"))), ValueError, r"K contains NaN or inf"),
        (lambda: gsops.cayley(torch.zeros(3, 3, dtype=torch.int64)), TypeError, r"K must have a floating dtype"),
        (lambda: gsops.gs_project(torch.randn(12, 10), 3), ValueError, r"W must be square"),
        (lambda: gsops.gs_project(torch.randn(12, 12), 5), ValueError, r"block_size=5 must divide W.shape\[0\]=12"),
        (lambda: gsops.gs_project(torch.randn(2, 12, 12), 3), ValueError, r"W must be 2-D"),
    ],
)
def test_bad_input_names_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_mixed_devices_are_refused():
    meta = torch.empty(4, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"same device: x on cpu, B on meta"):
        gsops.block_diag_mm(x12, meta)


def test_finite_check_can_be_switched_off():
    bad = torch.full((4, 3, 3), float("nan"))
    gsops.set_check_finite(False)
    try:
        assert torch.isnan(gsops.block_diag_mm(x12, bad)).all()
    finally:
        gsops.set_check_finite(True)


def test_forced_backend_that_cannot_run_raises():
    with gsops.use_backend("cuda"):
        with pytest.raises(gsops.BackendUnavailable, match="GSOPS_BACKEND=cuda cannot run"):
            gsops.gs_apply(x12, B43, B43)
    with pytest.raises(ValueError, match="backend='fast' must be one of"):
        with gsops.use_backend("fast"):
            pass


def test_bad_backend_env(monkeypatch):
    monkeypatch.setenv("GSOPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="GSOPS_BACKEND='gpu' must be one of"):
        gsops.gs_apply(x12, B43, B43)

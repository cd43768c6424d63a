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
from gsops.triton_kernels.conv_exp import conv_exp_backward, conv_exp_forward  # noqa: E402


@pytest.mark.parametrize("dtype,C,groups,k,H,W,terms", [
    (torch.float32, 4, 2, 3, 3, 5, 3),
    (torch.float64, 3, 1, 3, 4, 3, 4),
    (torch.float64, 4, 4, 1, 2, 3, 2),
])
def test_triton_conv_exp_matches_reference_fwd_bwd(dtype, C, groups, k, H, W, terms, device):
    L = 0.3 * cref.skew_kernel(torch.randn(C, C // groups, k, k, dtype=dtype), groups)
    L = L.to(device).requires_grad_()
    x = torch.randn(1, C, H, W, dtype=dtype).to(device).requires_grad_()
    with torch.no_grad():  # the kernels against the torch backend's forward and backward formula
        y, zs = conv_exp_forward(x, L, terms, groups)
        y_ref, zs_ref = cref.conv_exp_forward(x, L, terms, groups)
        torch.testing.assert_close(y, y_ref, **tol(dtype))
        torch.testing.assert_close(zs, zs_ref, **tol(dtype))
        g = torch.randn_like(y)
        for got, want in zip(conv_exp_backward(g, x, L, zs, terms, groups),
                             cref.conv_exp_backward(g, x, L, zs_ref, terms, groups)):
            torch.testing.assert_close(got, want, **tol(dtype))
    import gsops  # the custom op on the triton backend against torch autograd of the naive series

    with gsops.use_backend("triton"):
        y = gsops.conv_exp(x, L, terms, groups)
    y_ref = cref.conv_exp(x, L, terms, groups)
    torch.testing.assert_close(y, y_ref, **tol(dtype))
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


_TTIR_CHILD = r"""
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gsops.triton_kernels.conv_exp import _conv_exp_step_kernel as k
sig = {"z_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "acc_ptr": "*fp32", "C": "i32", "H": "i32", "W": "i32",
       "scale": "fp32", "CG": "constexpr", "K": "constexpr", "BLOCK": "constexpr", "ACC": "constexpr"}
c = triton.compile(ASTSource(fn=k, signature=sig, constexprs=dict(CG=2, K=3, BLOCK=256, ACC=tl.float32)),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(json.dumps({"ttir": c.asm["ttir"]}))
"""


def test_conv_exp_activation_offsets_are_64_bit():
    """N*C*H*W >= 2^31 elements must not wrap: every pointer offset into the activations (z, out,
    acc) is int64 in the compiled kernel (its TTIR, compiled for sm_90 without a GPU: a 2^31-element
    launch is beyond what the interpreter can run)."""
    import json
    import re
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _TTIR_CHILD], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=300, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines and ("ptxas" in proc.stderr or "libcuda" in proc.stderr):
        pytest.skip(f"the CUDA tool chain bundled with triton is unusable here: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    ttir = json.loads(lines[-1])["ttir"]
    # the first offset added to each activation pointer (the compiler may add a small int32 column
    # offset after it): %p = tt.splat %z_ptr ...; %q = tt.addptr %p, %off : ..., tensor<256xi64>
    splats = set(re.findall(r"%([\w.]+) = tt\.splat %(?:z_ptr|out_ptr|acc_ptr) ", ttir))
    first = [(m.group(1), m.group(2)) for m in re.finditer(r"tt\.addptr %([\w.]+), %[\w.]+ : [^,]+, tensor<\d+x(i\d+)>", ttir)
             if m.group(1) in splats]
    assert len(splats) >= 3 and len(first) >= 3, ttir[-3000:]
    assert all(t == "i64" for _, t in first), first

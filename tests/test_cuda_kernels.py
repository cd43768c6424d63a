"""The compiled CUDA kernels (gsops._C, csrc/) against dense float64 oracles and the reference path.

On a GPU: the extension built by ``pip install --no-build-isolation .``, CUDA tensors.
Without one: with the same binding and kernels built for the CPU CUDA emulator
(``python tools/cuda_emu/run.py --extension``) and installed as ``gsops._C``
(``python tools/cuda_emu/loader.py EXT -m pytest tests/test_cuda_kernels.py``), every test
here runs on CPU tensors, the device the module names in ``gsops._C.device_type``;
tests/test_csrc_emulated.py does that in CI. Otherwise the module skips with the reason.
"""
import os

import numpy as np
import pytest
import torch

from dense import block_diag, cayley as dense_cayley, gs_chain_matrix, gsoft_matrix, np64
from gsops import backends
from gsops.tolerances import ORTHO_TOL, tol

_ok, _reason = backends.load("cuda")
if _ok:
    from gsops import _C

    DEV = _C.device_type  # "cuda"; "cpu" for the emulator build
else:
    DEV = "cuda"
EMULATED = DEV == "cpu"
if not EMULATED and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device, or the CPU emulator build installed as gsops._C "
                "(python tools/cuda_emu/loader.py EXT -m pytest ...)", allow_module_level=True)
if not _ok:
    pytest.skip(f"the CUDA extension is not available: {_reason}", allow_module_level=True)

import gsops  # noqa: E402
from gsops.backends import cuda_backend as cb  # noqa: E402
from gsops.ops import dispatch  # noqa: E402
from gsops.reference import gs as ref_gs  # noqa: E402
from gsops.reference import conv_exp as cref  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKS = [1, 2, 3, 8, 16, 32, 64, 128]
_ops = torch.ops.gsops_cuda


def _r_for(b):
    return {1: 7, 2: 5, 3: 6, 8: 4, 16: 3, 32: 4, 64: 2, 128: 3}[b]


def close(got, want, dtype, what=""):
    """``got`` within tol(dtype) of the float64 ``want``, the absolute part scaled by max |want|."""
    want = torch.as_tensor(np.asarray(want) if not torch.is_tensor(want) else want.detach().cpu(), dtype=torch.float64)
    got = got.detach().to("cpu", torch.float64)
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    t = tol(dtype)
    torch.testing.assert_close(got, want, rtol=t["rtol"], atol=t["atol"] * scale, msg=what)


def rand(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).to(DEV, dtype)


# ----------------------------------------------------------------------------- fused GS apply

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", BLOCKS)
def test_gs_apply_forward_backward(b, dtype):
    r = _r_for(b)
    d = r * b
    x = rand(3, 37, d, dtype=dtype)  # 111 tokens: not a multiple of any tile
    L, R = rand(r, b, b, dtype=dtype, scale=b ** -0.5), rand(r, b, b, dtype=dtype, scale=b ** -0.5)
    g = rand(3, 37, d, dtype=dtype)
    Q = gsoft_matrix(np64(L), np64(R))
    close(cb.gs_apply(x, L, R), np64(x) @ Q.T, dtype, f"gs_apply b={b}")
    dx, dL, dR = cb.gs_apply_backward(g, x, L, R)
    _, wL, wR = ref_gs.gs_apply_backward(g.double().cpu(), x.double().cpu(), L.double().cpu(), R.double().cpu())
    close(dx, np64(g) @ Q, dtype, f"gs_apply dx b={b}")
    close(dL, wL, dtype, f"gs_apply dL b={b}")
    close(dR, wR, dtype, f"gs_apply dR b={b}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [1, 3, 16, 128])
def test_gs_chain_and_block_diag_mm(b, dtype):
    r = _r_for(b)
    d = r * b
    x = rand(1, 5, d, dtype=dtype)  # batch 1
    blocks = [rand(r, b, b, dtype=dtype, scale=b ** -0.5) for _ in range(3)]
    g = rand(1, 5, d, dtype=dtype)
    A = gs_chain_matrix([np64(B) for B in blocks])
    close(cb.gs_chain(x, blocks), np64(x) @ A.T, dtype, "gs_chain")
    dx, dBs = cb.gs_chain_backward(g, x, blocks)
    _, wBs = ref_gs.gs_chain_backward(g.double().cpu(), x.double().cpu(), [B.double().cpu() for B in blocks])
    close(dx, np64(g) @ A, dtype, "gs_chain dx")
    for j, (a, w) in enumerate(zip(dBs, wBs)):
        close(a, w, dtype, f"gs_chain dB[{j}]")
    D = block_diag(np64(blocks[0]))
    close(cb.block_diag_mm(x, blocks[0]), np64(x) @ D.T, dtype, "block_diag_mm")
    dx, dB = cb.block_diag_mm_backward(g, x, blocks[0])
    close(dx, np64(g) @ D, dtype, "block_diag_mm dx")


# (r, b): band groups (r % b == 0, several groups), whole rows, both block gradients in one launch (in shared
# memory; b = 32: R's in registers), one per launch (a 1280-feature row of b = 32; a 1024-feature row of b = 64,
# half of each accumulator in registers), none on chip (a 1280-feature row of b = 64: the two-pass fallback of
# the backward)
PAIR_SHAPES = [(8, 4), (6, 3), (5, 8), (3, 16), (32, 32), (40, 32), (16, 64), (20, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,b", PAIR_SHAPES)
def test_one_pass_pair_forward_transposed_and_backward(r, b, dtype):
    """gs_pair (both output layouts), its transposed pass and gs_pair_grad against the dense float64 product;
    the backward plan is the one the launcher reports, and two runs give the same bits (no atomics)."""
    d = r * b
    n = 21 if d <= 256 else 5
    x, g = rand(n, d, dtype=dtype), rand(n, d, dtype=dtype)
    L, R = rand(r, b, b, dtype=torch.float32, scale=b ** -0.5), rand(r, b, b, dtype=torch.float32, scale=b ** -0.5)
    assert _C.gs_pair_supported(r, b)
    Q = gsoft_matrix(np64(L), np64(R))
    chain = gs_chain_matrix([np64(R), np64(L)])  # L P R
    close(_ops.gs_pair(x, R, L, False, False), np64(x) @ Q.T, dtype, "gs_pair")
    close(_ops.gs_pair(x, R, L, True, False), np64(x) @ chain.T, dtype, "gs_pair linear_out")
    close(_ops.gs_pair(g, R, L, False, True), np64(g) @ Q, dtype, "gs_pair transposed")
    close(_ops.gs_pair(g, R, L, True, True), np64(g) @ chain, dtype, "gs_pair linear_out transposed")
    per_launch = _C.gs_pair_grad_factors(r, b)
    if not EMULATED or "GSOPS_EMU_SMEM_OPTIN_KB" not in os.environ:  # the plans of an sm_90 part
        assert per_launch == {(40, 32): 1, (16, 64): 1, (20, 64): 0}.get((r, b), 2)
    _, wL, wR = ref_gs.gs_apply_backward(g.double().cpu(), x.double().cpu(), L.double(), R.double())
    out = cb._pair_backward(g, x, R, L, False)
    if per_launch == 0:
        assert out is None  # gs_apply_backward takes the two-pass kernels
        with pytest.raises(RuntimeError, match="fits 0 block-gradient accumulator"):
            _ops.gs_pair_grad(g, x, R, L, False, True, True, False)
        return
    dx, dL, dR = out
    close(dx, np64(g) @ Q, dtype, "gs_pair_grad dx")
    close(dL, wL, dtype, "gs_pair_grad dL")
    close(dR, wR, dtype, "gs_pair_grad dR")
    again = cb._pair_backward(g, x, R, L, False)
    for a, w in zip(again, out):
        assert torch.equal(a, w)
    if per_launch == 1:
        with pytest.raises(RuntimeError, match="fits 1 block-gradient accumulator"):
            _ops.gs_pair_grad(g, x, R, L, False, True, True, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("r,b", [(4, 3), (3, 16), (2, 8), (24, 32)])
def test_one_pass_chain_over_whole_rows(r, b, m, dtype):
    """gs_chain_rows: m factors with P between them in one pass, against the dense float64 chain."""
    d = r * b
    x = rand(7, d, dtype=dtype)
    blocks = [rand(r, b, b, dtype=torch.float32, scale=b ** -0.5) for _ in range(m)]
    assert _C.gs_chain_rows_supported(r, b)
    A = gs_chain_matrix([np64(B) for B in blocks])
    close(_ops.gs_chain_rows(x, torch.stack(blocks)), np64(x) @ A.T, dtype, f"gs_chain_rows m={m}")


# (r, b, m): every block gradient in one launch ((24, 32): one of them in registers); (32, 32): two per launch
# (one in registers), (20, 48): one (three launches), (16, 64): one, half of it in registers
CHAIN_GRAD_SHAPES = [(4, 3, 3), (3, 16, 3), (2, 8, 5), (48, 16, 3), (64, 16, 3), (24, 32, 3), (32, 32, 3),
                     (20, 48, 3), (16, 64, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,b,m", CHAIN_GRAD_SHAPES)
def test_one_pass_chain_backward_over_whole_rows(r, b, m, dtype):
    """gs_chain_rows_grad (what gs_chain_backward runs for three or more factors): dx and every block gradient
    against the float64 reference, the factor groups the launcher reports, and the same bits twice (no atomics)."""
    d = r * b
    n = 19 if d <= 256 else 9  # several token tiles of the accumulators
    x, g = rand(n, d, dtype=dtype), rand(n, d, dtype=dtype)
    blocks = [rand(r, b, b, dtype=torch.float32, scale=b ** -0.5) for _ in range(m)]
    per = _C.gs_chain_rows_grad_factors(r, b, m)
    if not EMULATED or "GSOPS_EMU_SMEM_OPTIN_KB" not in os.environ:  # the plans of an sm_90 part
        assert per == {(32, 32, 3): 2, (20, 48, 3): 1, (16, 64, 3): 1}.get((r, b, m), m)
    A = gs_chain_matrix([np64(B) for B in blocks])
    _, want = ref_gs.gs_chain_backward(g.double().cpu(), x.double().cpu(), [B.double() for B in blocks])
    dx, dBs = cb.gs_chain_backward(g, x, blocks)
    close(dx, np64(g) @ A, dtype, "gs_chain_rows_grad dx")
    for f, (got, w) in enumerate(zip(dBs, want)):
        close(got, w, dtype, f"gs_chain_rows_grad dB_{f}")
    dx2, dBs2 = cb.gs_chain_backward(g, x, blocks)
    assert torch.equal(dx, dx2) and all(torch.equal(a, w) for a, w in zip(dBs, dBs2))
    splits = _C.gs_chain_rows_grad_splits(n, r, b)
    W = torch.stack(blocks)
    if per < m:
        with pytest.raises(RuntimeError, match=f"fits {per} block-gradient accumulator"):
            _ops.gs_chain_rows_grad(g, x, W, (1 << m) - 1, True, splits)
    _, part = _ops.gs_chain_rows_grad(g, x, W, 1 << (m - 1), False, splits)  # the last factor alone, no dx
    close(part[0].sum(0), want[m - 1], dtype, "gs_chain_rows_grad the last factor alone")
    dx_only, none = _ops.gs_chain_rows_grad(g, x, W, 0, True, splits)  # dx alone
    close(dx_only, np64(g) @ A, dtype, "gs_chain_rows_grad dx alone")
    assert none.shape == (0, splits, r, b, b)


@pytest.mark.skipif(not EMULATED, reason="the emulator models a part with less shared memory per block")
def test_plans_follow_the_shared_memory_of_the_device(monkeypatch):
    """On a part with 163 KiB of opt-in shared memory per block (sm_80) the one-pass plans shrink instead of
    failing at launch, and the kernels still give the dense float64 results."""
    sm90 = [_C.gs_chain_rows_grad_factors(24, 32, 3), _C.gs_pair_grad_factors(40, 32), _C.gs_pair_supported(170, 128)]
    monkeypatch.setenv("GSOPS_EMU_SMEM_OPTIN_KB", "163")
    sm80 = [_C.gs_chain_rows_grad_factors(24, 32, 3), _C.gs_pair_grad_factors(40, 32), _C.gs_pair_supported(170, 128)]
    assert sm90 == [3, 1, True] and sm80 == [2, 1, False]  # a 21760-feature row: two float32 tiles are 170 KiB
    test_one_pass_chain_backward_over_whole_rows(24, 32, 3, torch.float16)
    test_one_pass_pair_forward_transposed_and_backward(40, 32, torch.float32)  # one accumulator per launch, split


def test_one_pass_pair_refuses_what_does_not_fit_and_names_the_argument():
    x = torch.randn(2, 12, device=DEV)
    R = torch.randn(3, 4, 4, device=DEV)
    with pytest.raises(RuntimeError, match="R and L must have the same shape"):
        _ops.gs_pair(x, R, torch.randn(2, 6, 6, device=DEV), False, False)
    with pytest.raises(RuntimeError, match=r"x.shape\[-1\]=12 must equal r\*b=8"):
        _ops.gs_pair(x, torch.randn(2, 4, 4, device=DEV), torch.randn(2, 4, 4, device=DEV), False, False)
    with pytest.raises(RuntimeError, match="nothing asked"):
        _ops.gs_pair_grad(x, x, R, R, False, False, False, False)
    with pytest.raises(RuntimeError, match=r"blocks must have shape \(m, r, b, b\)"):
        _ops.gs_chain_rows(x, R)
    W = torch.randn(3, 3, 4, 4, device=DEV)
    with pytest.raises(RuntimeError, match="grads=8 must be a bit mask of the m=3 factors"):
        _ops.gs_chain_rows_grad(x, x, W, 8, True, 1)
    with pytest.raises(RuntimeError, match="nothing asked"):
        _ops.gs_chain_rows_grad(x, x, W, 0, False, 1)
    with pytest.raises(RuntimeError, match="splits=0 must be >= 1"):
        _ops.gs_chain_rows_grad(x, x, W, 1, True, 0)
    assert _C.gs_chain_rows_grad_factors(250, 128, 3) == 0
    assert _C.gs_chain_rows_grad_factors(4, 3, 32) == 32 and _C.gs_chain_rows_grad_factors(4, 3, 33) == 0
    row = torch.zeros(1, 250 * 128, device=DEV)
    with pytest.raises(RuntimeError, match="fits 0 block-gradient accumulator"):  # a row that does not fit
        _ops.gs_chain_rows_grad(row, row, torch.zeros(1, 250, 128, 128, device=DEV), 0, True, 1)
    assert not _C.gs_chain_rows_supported(250, 128)
    assert not _C.gs_pair_supported(250, 128)  # a whole row of 32000 features does not fit one CUDA block
    big = torch.zeros(250, 128, 128, device=DEV)
    with pytest.raises(RuntimeError, match="does not fit a CUDA block's shared memory"):
        _ops.gs_pair(torch.zeros(1, 250 * 128, device=DEV), big, big, False, False)


def test_block_gradient_over_many_tokens():
    """Several token chunks per block (atomic reduction across CUDA blocks)."""
    r, b = 4, 16
    x, g = rand(5000, r * b, dtype=torch.float32), rand(5000, r * b, dtype=torch.float32)
    B = rand(r, b, b, dtype=torch.float32)
    _, dB = cb.block_diag_mm_backward(g, x, B)
    want = torch.einsum("nri,nrj->rij", g.double().reshape(-1, r, b), x.double().reshape(-1, r, b))
    torch.testing.assert_close(dB.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_ops_on_the_cuda_backend_match_the_reference(dtype):
    r, b = 4, 16
    x = rand(2, 9, r * b, dtype=dtype).requires_grad_()
    L = rand(r, b, b, dtype=dtype, scale=0.25).requires_grad_()
    R = rand(r, b, b, dtype=dtype, scale=0.25).requires_grad_()
    outs = {}
    for backend in ("cuda", "torch"):
        with dispatch.use_backend(backend):
            y = gsops.ops.gs_apply(x, L, R)
            gx, gL, gR = torch.autograd.grad(y.float().square().sum(), (x, L, R))
        outs[backend] = (y, gx, gL, gR)
    for a, w in zip(outs["cuda"], outs["torch"]):
        close(a, w.double(), dtype, "public gs_apply cuda vs torch")


def test_binding_checks_name_the_argument():
    x = torch.randn(4, 12, device=DEV)
    B = torch.randn(3, 4, 4, device=DEV)
    if not EMULATED:  # under the emulator the kernels' device is the CPU: no tensor is on a wrong device
        with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
            _ops.block_diag_perm(x.cpu(), B, 0, 0, False)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        _ops.block_diag_perm(torch.randn(12, 4, device=DEV).t(), B, 0, 0, False)
    with pytest.raises(RuntimeError, match=r"x.shape\[-1\]=12 must equal r\*b=8"):
        _ops.block_diag_perm(x, torch.randn(2, 4, 4, device=DEV), 0, 0, False)
    with pytest.raises(RuntimeError, match="blocks block size b=129"):
        _ops.block_diag_perm(torch.randn(1, 129, device=DEV), torch.randn(1, 129, 129, device=DEV), 0, 0, False)
    with pytest.raises(RuntimeError, match="in_mode=3"):
        _ops.block_diag_perm(x, B, 3, 0, False)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        _ops.block_diag_perm(x.double(), B, 0, 0, False)
    with pytest.raises(RuntimeError, match="K must have shape"):
        _ops.cayley_forward(torch.randn(3, 4, 5, device=DEV))
    with pytest.raises(RuntimeError, match="kernel size .* must be odd"):
        _ops.conv_exp_forward(torch.randn(1, 4, 5, 5, device=DEV), torch.randn(4, 4, 2, 2, device=DEV), 3, 1, False)


def test_opcheck_on_the_registered_ops():
    x, B = torch.randn(6, 12, device=DEV), torch.randn(3, 4, 4, device=DEV)
    torch.library.opcheck(_ops.block_diag_perm, (x, B, 1, 2, False), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(_ops.block_diag_perm_grad_blocks, (x, x, 3, 4, 1, 2), test_utils=("test_schema", "test_faketensor"))
    A = torch.randn(5, 8, 8, device=DEV)
    torch.library.opcheck(_ops.cayley_forward, (A - A.transpose(1, 2),), test_utils=("test_schema", "test_faketensor"))
    R = torch.randn(3, 4, 4, device=DEV)
    torch.library.opcheck(_ops.gs_pair, (x, R, R, False, True), test_utils=("test_schema", "test_faketensor"))
    for want in ((True, True, True), (False, True, False)):
        torch.library.opcheck(_ops.gs_pair_grad, (x, x, R, R, True, *want), test_utils=("test_schema", "test_faketensor"))
    W = torch.randn(3, 3, 4, 4, device=DEV)
    torch.library.opcheck(_ops.gs_chain_rows, (x, W), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(_ops.gs_chain_rows_grad, (x, x, W, 5, True, 2), test_utils=("test_schema", "test_faketensor"))
    xc, w = torch.randn(1, 4, 5, 5, device=DEV), torch.randn(4, 2, 3, 3, device=DEV)
    torch.library.opcheck(_ops.conv_exp_forward, (xc, w, 3, 2, False), test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- batched Cayley

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", BLOCKS)
def test_cayley_forward_backward(b, dtype):
    A = torch.randn(2, 3, b, b, dtype=torch.float64)
    K = ((A - A.transpose(-1, -2)) / b ** 0.5).to(DEV, dtype)
    Q = cb.cayley_exact(K)
    Qd = dense_cayley(np64(K))
    close(Q, Qd, dtype, f"cayley b={b}")
    Q64 = Q.double()
    eye = torch.eye(b, dtype=torch.float64, device=DEV)
    assert float((Q64.transpose(-1, -2) @ Q64 - eye).abs().max()) <= ORTHO_TOL[dtype] * max(1, b / 16)
    G = rand(2, 3, b, b, dtype=dtype)
    M = (Qd + np.eye(b)) / 2
    Mt = np.swapaxes(M, -1, -2)
    close(cb.cayley_exact_backward(G, Q), 2 * Mt @ np64(G) @ Mt, dtype, f"cayley dK b={b}")


def test_cayley_public_op_gradient_matches_reference():
    A = torch.randn(16, 32, 32, device=DEV) * 0.2
    K = (A - A.transpose(1, 2)).requires_grad_()
    outs = {}
    for backend in ("cuda", "torch"):
        with dispatch.use_backend(backend):
            Q = gsops.ops.cayley(K)
            (gK,) = torch.autograd.grad((Q * torch.arange(32.0, device=DEV)).sum(), K)
        outs[backend] = (Q, gK)
    for a, w in zip(outs["cuda"], outs["torch"]):
        close(a, w.double(), torch.float32, "cayley cuda vs torch")


# ----------------------------------------------------------------------------- grouped convolution exponential

CONV_SHAPES = [  # (N, C, H, W, groups, k): fused path (fits shared memory) ...
    (2, 8, 7, 5, 2, 3), (1, 4, 6, 6, 1, 3), (3, 16, 5, 5, 4, 1), (1, 6, 4, 9, 3, 3),
    (1, 64, 40, 40, 1, 3),  # ... and the stepped path (3*64*40*40 floats exceed shared memory)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_exp_forward_backward(shape, dtype):
    N, C, H, W, groups, k = shape
    terms = 6
    x64 = torch.randn(N, C, H, W, dtype=torch.float64)
    M64 = 0.3 * torch.randn(C, C // groups, k, k, dtype=torch.float64) / (C // groups * k * k) ** 0.5
    L64 = cref.skew_kernel(M64, groups)
    x = x64.to(DEV, dtype).requires_grad_()
    L = L64.to(DEV, dtype).requires_grad_()
    with dispatch.use_backend("cuda"):  # the custom op on the cuda backend's forward and backward kernels
        y = gsops.conv_exp(x, L, terms, groups)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd = x.detach().cpu().double().requires_grad_()
    Ld = L.detach().cpu().double().requires_grad_()
    yd = cref.conv_exp(xd, Ld, terms, groups)
    yd.backward(gy.cpu().double())
    close(y, yd, dtype, "conv_exp")
    close(x.grad, xd.grad, dtype, "conv_exp dx")
    close(L.grad, Ld.grad, dtype, "conv_exp dL")


# ----------------------------------------------------------------------------- layers on the cuda backend

def _grads_on(backend, model, x):
    model.zero_grad()
    with dispatch.use_backend(backend):
        y = model(x)
        y.float().square().mean().backward()
    return [y.detach()] + [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _assert_backends_agree(model, x, dtype, what):
    """Output and every parameter gradient: cuda backend vs the torch reference backend."""
    got, want = _grads_on("cuda", model, x), _grads_on("torch", model, x)
    assert len(got) == len(want) > 1
    for i, (a, w) in enumerate(zip(got, want)):
        close(a, w.double(), dtype, f"{what}: {'output' if i == 0 else f'gradient {i}'}")


def _perturb_adapters(model):
    with torch.no_grad():  # away from the identity the adapters start at
        for p in gsops.trainable_parameters(model):
            p.add_(0.2 * torch.randn_like(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("method,b", [("gsoft", 16), ("double_gsoft", 8), ("oft", 32), ("boft", 16)])
def test_adapted_model_on_the_cuda_backend_matches_the_torch_backend(method, b, dtype):
    """What a user runs: apply_ on an MLP, then forward and backward through the adapter layers,
    custom ops and autograd with the cuda backend vs the reference backend."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    gsops.apply_(model, gsops.AdapterConfig(method=method, block_size=b), verbose=False)
    _perturb_adapters(model)
    _assert_backends_agree(model.to(DEV, dtype), rand(3, 11, 64, dtype=dtype), dtype, f"{method} b={b}")


def test_adapted_conv_on_the_cuda_backend_matches_the_torch_backend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1))
    gsops.apply_(model, gsops.AdapterConfig(method="gsoft", block_size=8, target_modules=[torch.nn.Conv2d]),
                 verbose=False)
    _perturb_adapters(model)
    _assert_backends_agree(model.to(DEV), rand(2, 8, 5, 6, dtype=torch.float32), torch.float32, "conv gsoft")


def test_gs_soc_layer_on_the_cuda_backend_matches_the_torch_backend():
    torch.manual_seed(0)
    layer = gsops.GSSOC(8, 3, groups=(4, 2)).to(DEV)
    _assert_backends_agree(layer, rand(2, 8, 6, 6, dtype=torch.float32), torch.float32, "GSSOC")

"""How gsops/backends/cuda_backend.py composes the gsops_cuda kernels, checked on CPU.

The compiled kernels need a GPU (tests/test_cuda_kernels.py); the composition
(permutation modes of every factor, the input backward as the transposed
kernel with inverse permutations, the block gradients, M from Q, the conv
exponential's adjoint) is plain Python and is checked here: a subprocess
registers CPU stand-ins for the ``gsops_cuda`` ops, defined independently from
their documented meaning (``y = P^out diag(B) P^in x`` with ``P`` from
:mod:`gsops.perm`), loads the backend against them and compares every
registered function with the reference path and with dense float64 matrices.
A subprocess keeps the stand-ins out of this test session's backends.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys, types
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])  # tests/ for dense.py
from dense import gsoft_matrix, gs_chain_matrix, block_diag, cayley as dense_cayley, np64
from gsops.perm import gather_index
from gsops.reference import conv_exp as cref
from gsops.tolerances import tol

# ---- CPU stand-ins for torch.ops.gsops_cuda.* (their documented meaning, not the backend's code)
lib = torch.library.Library("gsops_cuda", "DEF")
lib.define("block_diag_perm(Tensor x, Tensor blocks, int in_mode, int out_mode, bool transpose_blocks) -> Tensor")
lib.define("block_diag_perm_grad_blocks(Tensor dy, Tensor x, int r, int b, int in_mode, int out_mode) -> Tensor")
lib.define("gs_pair(Tensor x, Tensor R, Tensor L, bool linear_out, bool transposed) -> Tensor")
lib.define("gs_pair_grad(Tensor dy, Tensor x, Tensor R, Tensor L, bool linear_out, bool want_dx, bool want_l, "
           "bool want_r) -> (Tensor, Tensor, Tensor)")
lib.define("gs_chain_rows(Tensor x, Tensor blocks) -> Tensor")
lib.define("gs_chain_rows_grad(Tensor dy, Tensor x, Tensor blocks, int grads, bool want_dx, int splits) -> (Tensor, Tensor)")
lib.define("cayley_forward(Tensor K) -> (Tensor, Tensor)")
lib.define("cayley_backward(Tensor M, Tensor G) -> Tensor")
lib.define("conv_exp_forward(Tensor x, Tensor weight, int terms, int groups, bool adjoint) -> Tensor")
lib.define("conv_exp_weight_grad(Tensor x, Tensor dy, Tensor weight, int terms, int groups) -> Tensor")

def P_mode(x, mode, r):  # P^mode x along the last dim; 1: P = perm(r, d), 2: P^T
    d = x.shape[-1]
    if mode == 0:
        return x
    return x[..., gather_index(r, d, inverse=(mode == 2))]

def bdp(x, blocks, in_mode, out_mode, transpose_blocks):
    r, b, _ = blocks.shape
    B = blocks.double()
    if transpose_blocks:
        B = B.transpose(1, 2)
    z = torch.einsum("nrj,rij->nri", P_mode(x.double(), in_mode, r).reshape(-1, r, b), B).reshape(x.shape)
    return P_mode(z, out_mode, r).to(x.dtype)

def bgrad(dy, x, r, b, in_mode, out_mode):
    inv = {0: 0, 1: 2, 2: 1}
    g = P_mode(dy.double(), inv[out_mode], r).reshape(-1, r, b)
    xi = P_mode(x.double(), in_mode, r).reshape(-1, r, b)
    return torch.einsum("nri,nrj->rij", g, xi).float()

def pair(x, R, L, linear_out, transposed):  # P^T L P R x (L P R x); transposed: its transpose applied to x
    out = 0 if linear_out else 2
    if transposed:
        return bdp(bdp(x, L, {0: 0, 2: 1}[out], 2, True), R, 0, 0, True)
    return bdp(bdp(x, R, 0, 0, False), L, 1, out, False)

def pair_grad(dy, x, R, L, linear_out, want_dx, want_l, want_r):
    # partial sums over two token splits, the first dimension of the block gradients
    r, b, _ = R.shape
    out = 0 if linear_out else 2
    n = x.reshape(-1, r * b).shape[0]
    parts = ([], [])
    for lo, hi in ((0, n // 2), (n // 2, n)):
        xs, gs = x.reshape(n, -1)[lo:hi], dy.reshape(n, -1)[lo:hi]
        du = bdp(gs, L, {0: 0, 2: 1}[out], 2, True)
        parts[0].append(bgrad(gs, bdp(xs, R, 0, 0, False), r, b, 1, out))
        parts[1].append(bgrad(du, xs, r, b, 0, 0))
    dx = pair(dy, R, L, linear_out, True) if want_dx else x.new_empty(0)
    dl = torch.stack(parts[0]) if want_l else torch.empty(0)
    dr = torch.stack(parts[1]) if want_r else torch.empty(0)
    return dx, dl, dr

def chain_rows(x, W):  # B_m P ... P B_1 x
    y = x
    for j in range(W.shape[0]):
        y = bdp(y, W[j], 0 if j == 0 else 1, 0, False)
    return y

def chain_rows_grad(dy, x, W, grads, want_dx, splits):
    # dx and, per token split, the block gradients of the factors in the bit mask (in increasing order)
    m, r, b, _ = W.shape
    n = x.reshape(-1, r * b).shape[0]
    fs = [f for f in range(m) if grads >> f & 1]
    parts = [[] for _ in fs]
    bounds = [(n * s // splits, n * (s + 1) // splits) for s in range(splits)]
    for lo, hi in bounds:
        acts = [x.reshape(n, -1)[lo:hi]]
        for j in range(m - 1):
            acts.append(bdp(acts[-1], W[j], 0 if j == 0 else 1, 0, False))
        gj = dy.reshape(n, -1)[lo:hi]
        for j in range(m - 1, -1, -1):
            if j in fs:
                parts[fs.index(j)].append(bgrad(gj, acts[j], r, b, 0 if j == 0 else 1, 0))
            gj = bdp(gj, W[j], 0, 0 if j == 0 else 2, True)
    if want_dx:
        g = dy
        for j in range(m - 1, -1, -1):
            g = bdp(g, W[j], 0, 0 if j == 0 else 2, True)
        dx = g
    else:
        dx = x.new_empty(0)
    return dx, torch.stack([torch.stack(p) for p in parts]) if fs else torch.empty(0, splits, r, b, b)

def cayley_fwd(K):
    eye = torch.eye(K.shape[-1], dtype=torch.float64)
    M = torch.linalg.inv(eye - K.double())
    return (2 * M - eye).to(K.dtype), M.float()

def cayley_bwd(M, G):
    Mt = M.double().transpose(-1, -2)
    return (2 * Mt @ G.double() @ Mt).to(G.dtype)

def conv_fwd(x, w, terms, groups, adjoint):
    ww = cref.conv_transpose_kernel(w, groups) if adjoint else w
    return cref.conv_exp(x.double(), ww.double(), terms, groups).to(x.dtype)

def conv_wgrad(x, dy, w, terms, groups):
    # the reference's weight gradient (runs inside a custom op's backward, below autograd); the script
    # compares the composed result with torch autograd of the naive series
    _, zs = cref.conv_exp_forward(x.double(), w.double(), terms, groups)
    return cref.conv_exp_backward(dy.double(), x.double(), w.double(), zs, terms, groups)[1].float()

for name, fn in [("block_diag_perm", bdp), ("block_diag_perm_grad_blocks", bgrad), ("gs_pair", pair),
                 ("gs_pair_grad", pair_grad), ("gs_chain_rows", chain_rows), ("gs_chain_rows_grad", chain_rows_grad),
                 ("cayley_forward", cayley_fwd),
                 ("cayley_backward", cayley_bwd), ("conv_exp_forward", conv_fwd), ("conv_exp_weight_grad", conv_wgrad)]:
    lib.impl(name, fn, "CPU")

fake = types.ModuleType("gsops._C")
fake.max_block = 128
fake.device_type = "cpu"  # the stand-ins run on CPU tensors
fake.__file__ = "<CPU stand-ins>"
# plans of the one-pass pair: every path of the composition is taken by some shape of the loop below
fake.gs_pair_supported = lambda r, b: b != 5  # (1, 5): the two-pass kernels, forward and backward
fake.gs_chain_rows_supported = lambda r, b: b not in (5, 8)  # b = 8: the pair, then block_diag_perm
fake.gs_pair_grad_factors = lambda r, b: 2 if b <= 2 else (1 if b <= 4 else 0)  # b = 8: two-pass backward
fake.gs_pair_grad_splits = lambda n, r, b: 2
# the whole-row chain backward: every factor in one launch (b <= 2), one per launch (b = 3), none (b = 4: the pair)
fake.gs_chain_rows_grad_factors = lambda r, b, m: m if b <= 2 else (1 if b == 3 else 0)
fake.gs_chain_rows_grad_splits = lambda n, r, b: 3 if n >= 3 else 1
sys.modules["gsops._C"] = fake

import gsops
from gsops.backends import cuda_backend as cb
from gsops.ops import dispatch
from gsops import backends, reference as ref
from gsops.reference import gs as ref_gs
from gsops.reference.cayley import cayley_exact_backward as ref_cayley_backward

def close(got, want, dtype=torch.float32, what=""):
    want = torch.as_tensor(want, dtype=torch.float64)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    t = tol(dtype)
    torch.testing.assert_close(got.double(), want, rtol=t["rtol"], atol=t["atol"] * scale, msg=what)

torch.manual_seed(0)
checks = 0
for r, b in [(3, 4), (4, 3), (1, 5), (5, 1), (2, 8), (6, 2)]:
    d = r * b
    x = torch.randn(2, 7, d)
    L, R, B3 = torch.randn(r, b, b), torch.randn(r, b, b), torch.randn(r, b, b)
    g = torch.randn(2, 7, d)
    tag = f"r={r} b={b}"
    Q = gsoft_matrix(np64(L), np64(R))
    close(cb.gs_apply(x, L, R), np64(x) @ Q.T, what="gs_apply " + tag)
    dx, dL, dR = cb.gs_apply_backward(g, x, L, R)
    wx, wL, wR = ref_gs.gs_apply_backward(g.double(), x.double(), L.double(), R.double())
    close(dx, np64(g) @ Q, what="gs_apply dx " + tag)
    close(dL, wL, what="gs_apply dL " + tag)
    close(dR, wR, what="gs_apply dR " + tag)
    blocks = [R, L, B3]
    A = gs_chain_matrix([np64(t) for t in blocks])
    close(cb.gs_chain(x, blocks), np64(x) @ A.T, what="gs_chain " + tag)
    dx, dBs = cb.gs_chain_backward(g, x, blocks)
    wx, wBs = ref_gs.gs_chain_backward(g.double(), x.double(), [t.double() for t in blocks])
    close(dx, np64(g) @ A, what="gs_chain dx " + tag)
    for j, (a, w) in enumerate(zip(dBs, wBs)):
        close(a, w, what=f"gs_chain dB[{j}] " + tag)
    D = block_diag(np64(L))
    close(cb.block_diag_mm(x, L), np64(x) @ D.T, what="block_diag_mm " + tag)
    dx, dB = cb.block_diag_mm_backward(g, x, L)
    close(dx, np64(g) @ D, what="block_diag_mm dx " + tag)
    close(dB, ref_gs.block_diag_mm_backward(g.double(), x.double(), L.double())[1], what="block_diag_mm dB " + tag)
    checks += 13

for b in [1, 2, 3, 8]:
    A = torch.randn(4, b, b)
    K = A - A.transpose(1, 2)
    Q = cb.cayley_exact(K)
    close(Q, dense_cayley(np64(K)), what=f"cayley b={b}")
    G = torch.randn(4, b, b)
    close(cb.cayley_exact_backward(G, Q), ref_cayley_backward(G.double(), Q.double()), what=f"cayley dK b={b}")
    checks += 2

for C, groups, k in [(4, 1, 3), (6, 3, 3), (8, 4, 1)]:
    x = torch.randn(2, C, 5, 4, requires_grad=True)
    Lk = (0.2 * torch.randn(C, C // groups, k, k)).requires_grad_()
    with dispatch.use_backend("cuda"):  # the custom op with the cuda backend's forward and backward kernels
        y = gsops.conv_exp(x, Lk, 4, groups)
    gy = torch.randn_like(y)
    y.backward(gy)
    xd, Ld = x.detach().double().requires_grad_(), Lk.detach().double().requires_grad_()
    yd = cref.conv_exp(xd, Ld, 4, groups)
    yd.backward(gy.double())
    close(y, yd, what=f"conv_exp C={C} groups={groups} k={k}")
    close(x.grad, xd.grad, what="conv_exp dx")
    close(Lk.grad, Ld.grad, what="conv_exp dL")
    checks += 3

# float64 / oversized blocks: supports() says why, a forced cuda raises with that reason, auto on CPU
# tensors takes the reference path; no kernel falls back by itself
x64, L64 = torch.randn(3, 8, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
assert "float64" in cb.supports("gs_apply", x64, L64, L64)
with dispatch.use_backend("cuda"):
    try:
        gsops.gs_apply(x64, L64, L64)
        raise AssertionError("forced cuda accepted float64")
    except backends.BackendUnavailable as e:
        assert "float64" in str(e) and "gs_apply" in str(e), e
big = torch.randn(1, 129, 129)
assert "b=129" in cb.supports("cayley_exact", big)
with dispatch.use_backend("cuda"):
    try:
        gsops.cayley(big - big.transpose(1, 2))
        raise AssertionError("forced cuda accepted b=129")
    except backends.BackendUnavailable as e:
        assert "b=129" in str(e), e
    try:
        gsops.cayley(0.1 * (big - big.transpose(1, 2))[:, :4, :4], method="neumann")
        raise AssertionError("forced cuda ran cayley_neumann")
    except backends.BackendUnavailable as e:
        assert "no kernel for cayley_neumann" in str(e), e
with dispatch.use_backend("cuda"):  # the public ops reach the cuda kernels through the custom ops
    x, L, R = torch.randn(2, 12), torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    close(gsops.gs_apply(x, L, R), ref.gs_apply(x.double(), L.double(), R.double()), what="gsops.gs_apply on cuda")
checks += 4

for op in ["block_diag_mm", "block_diag_mm_backward", "gs_chain", "gs_chain_backward", "gs_apply",
           "gs_apply_backward", "cayley_exact", "cayley_exact_backward", "conv_exp", "conv_exp_backward"]:
    assert dispatch.impl(op, "cuda") is cb.KERNELS[op] is getattr(cb, op), op
print(f"OK {checks + 9} checks")
'''


def test_cuda_backend_composition_on_cpu_stand_ins():
    env = dict(os.environ, OMP_NUM_THREADS="1", GSOPS_BACKEND="auto")
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "tests")], capture_output=True, text=True, timeout=300, env=env,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("OK "), res.stdout + res.stderr

"""The one-pass Triton GS kernels (triton_kernels.gs_apply: gs_onepass, gs_chunked, gs_row and their backwards).

Both tilings are covered: closed b x b super groups (``r % b == 0``, the permutation a transpose
on chip) and whole rows (``r % b != 0``, a gather on chip), with odd token counts, b < 16 (no
tensor-core dot), b not a power of two, r not a power of two, several token tiles per program and
token splits.  Oracles: dense float64 matrices (tests/dense.py) for values and input gradients,
the reference differentiated by torch autograd in float64 for block gradients.
"""
import numpy as np
import pytest
import torch

import gsops
from gsops import reference as ref

from dense import gs_chain_matrix, gsoft_matrix, np64
from triton_checks import assert_triton_gs_apply_matches_reference

pytest.importorskip("triton")

# (b, r, tokens)
SHAPES = [
    (24, 48, 5),   # band, b not a power of two, r = 2b
    (8, 24, 7),    # band, b < 16, r = 3b (not a power of two)
    (16, 16, 3),   # band with one super group (r = b)
    (4, 12, 33),   # band, k = 3 super groups, b < 16
    (24, 4, 9),    # whole rows, r < b, b not a power of two
    (8, 12, 11),   # whole rows, b does not divide r
    (32, 6, 17),   # whole rows, r not a power of two
    (5, 7, 3),     # whole rows, both odd
]


@pytest.fixture
def float64_big_tiles(monkeypatch):
    """float64 tiles as large as the half-precision ones: the on-chip limits are a GPU resource rule
    (smaller for wider dot inputs); the arithmetic is checked in float64 on every tiling."""
    from gsops.triton_kernels import gs_apply as G

    monkeypatch.setitem(G.ONEPASS_MAX_TILE, 8, G.ONEPASS_MAX_TILE[2])
    monkeypatch.setitem(G.ONEPASS_FUSED_BWD_TILE, 8, G.ONEPASS_FUSED_BWD_TILE[2])
    monkeypatch.setitem(G.CHUNK_MAX_TILE, 8, G.CHUNK_MAX_TILE[2])


def _blocks(r, b, dtype=torch.float64):
    return torch.randn(r, b, b, dtype=torch.float64).to(dtype)


def _grads_float64(fn, x, blocks, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, *blocks)]
    fn(*leaves).backward(g.double())
    return [t.grad for t in leaves]


def _check_onepass_float64(x, L, R, g, linear_out=False, grad_tol=1e-11):
    """gs_onepass and its backward against the dense float64 matrix (``P^T L P R``, or ``L P R`` with
    ``linear_out``) for values and dx, and against the float64 reference under autograd for dL, dR."""
    from gsops.triton_kernels import gs_apply as G

    if linear_out:
        A = gs_chain_matrix([np64(R), np64(L)])
        fn = lambda x, a, c: ref.gs_chain(x, [c, a])  # noqa: E731
    else:
        A = gsoft_matrix(np64(L), np64(R))
        fn = ref.gs_apply
    torch.testing.assert_close(G.gs_onepass(x, L, R, linear_out=linear_out), torch.from_numpy(np64(x) @ A.T),
                               rtol=1e-11, atol=1e-11)
    dx, dL, dR = G.gs_onepass_backward(g, x, L, R, linear_out=linear_out)
    torch.testing.assert_close(dx, torch.from_numpy(np64(g) @ A), rtol=1e-11, atol=1e-11)
    _, rL, rR = _grads_float64(fn, x, (L, R), g)
    torch.testing.assert_close(dL, rL, rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(dR, rR, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("b,r,n", SHAPES)
def test_onepass_plan_covers_shape(b, r, n):
    from gsops.triton_kernels.gs_apply import onepass_plan

    plan = onepass_plan(r, b)  # 2-byte dot inputs
    assert plan is not None and plan.band == (r % b == 0)
    # every feature belongs to exactly one super group, on the input and on the output side
    feats_in, feats_out = [], []
    for s in range(plan.n_super):
        for j in range(plan.n_rows):
            for v in range(b):
                feats_in.append(j * plan.row_stride + s * b + v)
                feats_out.append(v * r + s * b + j)
    assert sorted(feats_in) == list(range(r * b)) == sorted(feats_out)


@pytest.mark.parametrize("b,r,n", SHAPES)
def test_onepass_forward_backward_float64(b, r, n, float64_big_tiles):
    L, R = _blocks(r, b), _blocks(r, b)
    x = torch.randn(n, r * b, dtype=torch.float64)
    g = torch.randn(n, r * b, dtype=torch.float64)
    _check_onepass_float64(x, L, R, g)
    _check_onepass_float64(x, L, R, g, linear_out=True)  # the two-factor chain L P R x


_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype,b,r,n", [(dt, b, r, 13) for dt in _DTYPES for b, r in [(24, 48), (8, 12), (16, 2)]]
                         + [(dt, 64, 3, 7) for dt in _DTYPES] + [(torch.bfloat16, 64, 64, 7)])
def test_onepass_dtypes_through_public_ops(dtype, b, r, n):
    """gs_apply on the triton backend (the one-pass kernels, b = 64 included) in each dtype against the
    float32 reference."""
    torch.manual_seed(1)
    L = torch.linalg.qr(torch.randn(r, b, b, dtype=torch.float64))[0].to(dtype)
    R = torch.linalg.qr(torch.randn(r, b, b, dtype=torch.float64))[0].to(dtype)
    x = torch.randn(n, r * b).to(dtype)
    g = torch.randn(n, r * b).to(dtype)
    assert_triton_gs_apply_matches_reference(x, L, R, g)


def test_onepass_gpu_launch_plan_loops_and_splits(monkeypatch, float64_big_tiles):
    """The GPU launch plan (several token tiles per program, token splits of the block gradients,
    a ragged last tile) run under the interpreter by pretending not to interpret."""
    import gsops.triton_kernels.gs_apply as G

    monkeypatch.setattr(G, "_interpreting", lambda: False)
    monkeypatch.setattr(G, "_n_sm", lambda device: 1)
    b, r, n = 8, 16, 700  # band, 2 super groups; 11 token tiles of 64
    block_n, tiles, progs = G._onepass_launch_plan(G.onepass_plan(r, b, 8), n, 4)
    assert tiles > 1 and progs > 1 and n % block_n and (tiles * progs - 1) * block_n >= n  # an empty last tile too
    L, R = _blocks(r, b), _blocks(r, b)
    x = torch.randn(n, r * b, dtype=torch.float64)
    g = torch.randn(n, r * b, dtype=torch.float64)
    _check_onepass_float64(x, L, R, g, grad_tol=1e-10)


def test_onepass_non_contiguous_and_empty(float64_big_tiles):
    from gsops.triton_kernels import gs_apply as G

    b, r = 8, 12
    L, R = _blocks(r, b), _blocks(r, b)
    base = torch.randn(r * b, 10, dtype=torch.float64)
    x = base.t()[::2]  # (5, 96) with strides (2, 10): features not contiguous
    A = gsoft_matrix(np64(L), np64(R))
    torch.testing.assert_close(G.gs_onepass(x, L, R), torch.from_numpy(np64(x) @ A.T), rtol=1e-11, atol=1e-11)
    e = torch.empty(0, r * b, dtype=torch.float64)
    assert G.gs_onepass(e, L, R).shape == (0, r * b)
    dx, dL, dR = G.gs_onepass_backward(e, e, L, R)
    assert dx.shape == (0, r * b) and not dL.any() and not dR.any()


def test_shapes_without_plan_use_two_launch_path_and_say_so(monkeypatch):
    from gsops.triton_kernels import gs_apply as G

    b, r = 128, 128  # a 128 x 128 super group does not fit on chip
    assert G.onepass_plan(r, b) is None
    with pytest.raises(ValueError, match="ONEPASS_MAX_TILE"):
        G.gs_onepass(torch.randn(1, r * b), torch.randn(r, b, b), torch.randn(r, b, b))
    assert G.onepass_plan(48, 96) is None  # whole rows of 48 x 96 features, padded to 64 x 128: too big as well
    monkeypatch.setitem(G.ONEPASS_MAX_TILE, 8, 64)  # the two-launch path, checked on a small float64 shape
    b, r = 8, 12
    assert G.onepass_plan(r, b, 8) is None and G.onepass_plan(r, b) is not None
    x = torch.randn(2, r * b, dtype=torch.float64)
    L, R = _blocks(r, b), _blocks(r, b)
    A = gsoft_matrix(np64(L), np64(R))
    g = torch.randn(2, r * b, dtype=torch.float64)
    with gsops.use_backend("triton"):
        torch.testing.assert_close(G.gs_apply(x, L, R), torch.from_numpy(np64(x) @ A.T), rtol=1e-10, atol=1e-10)
        dx, dL, dR = G.gs_apply_backward(g, x, L, R)
    torch.testing.assert_close(dx, torch.from_numpy(np64(g) @ A), rtol=1e-10, atol=1e-10)
    _, rL, rR = _grads_float64(ref.gs_apply, x, (L, R), g)
    torch.testing.assert_close(dL, rL, rtol=1e-10, atol=1e-10)


def test_plan_limits_by_dot_input_size():
    """Which shapes run in one pass on a GPU (compile-checked limits): half data up to 1024 padded
    features, float32 up to 256, float64 up to 128; the backward splits above 256 (half, float32)."""
    from gsops.triton_kernels.gs_apply import dot_bytes, onepass_plan

    assert dot_bytes(torch.bfloat16, torch.float32) == 2 and dot_bytes(torch.float32, torch.float32) == 4
    assert dot_bytes(torch.float16, torch.float64) == 8
    assert onepass_plan(128, 32).band and not onepass_plan(128, 32).fused_backward  # d=4096, b=32
    assert onepass_plan(256, 16).fused_backward                                   # d=4096, b=16
    assert onepass_plan(32, 24) is not None and onepass_plan(24, 32) is not None   # d=768 whole rows
    assert onepass_plan(64, 64) is None and onepass_plan(12, 64) is None           # b=64: not this tiling
    assert onepass_plan(256, 16, 4).fused_backward and onepass_plan(128, 32, 4) is None
    assert onepass_plan(256, 16, 8) is None and onepass_plan(24, 8, 8).fused_backward


@pytest.mark.parametrize("m", [2, 3])
def test_gs_chain_uses_onepass_pair(m, float64_big_tiles):
    b, r, n = 8, 12, 5
    blocks = [_blocks(r, b) for _ in range(m)]
    x = torch.randn(n, r * b, dtype=torch.float64)
    g = torch.randn(n, r * b, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, *blocks)]
    with gsops.use_backend("triton"):
        y = gsops.gs_chain(leaves[0], leaves[1:])
    y.backward(g)
    C = gs_chain_matrix([np64(B) for B in blocks])
    torch.testing.assert_close(y.detach(), torch.from_numpy(np64(x) @ C.T), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(leaves[0].grad, torch.from_numpy(np64(g) @ C), rtol=1e-11, atol=1e-11)
    theirs = _grads_float64(lambda x, *bl: ref.gs_chain(x, list(bl)), x, blocks, g)
    for mine, t in zip(leaves[1:], theirs[1:]):
        torch.testing.assert_close(mine.grad, t, rtol=1e-11, atol=1e-11)
    assert np.isfinite(C).all()


def test_paths_of_the_benchmark_grid():
    """Which kernel each shape of the traffic grid runs (half data): b = 64 and chains of 3 factors in one pass
    where a super group or a row fits; the backward of a 4096-feature band super group (b = 64) keeps the
    two-launch fallback (its block-gradient accumulators, 2 b^3 floats, do not fit on chip)."""
    from gsops.triton_kernels import gs_apply as G

    assert G.pair_path(64, 64) == "chunked" and G.pair_path(128, 64) == "chunked"     # d=4096, 8192
    assert G.pair_path(12, 64) == "row" and G.pair_path(16, 64) == "row"              # d=768, 1024
    assert G.pair_path(256, 16) == "onepass" and G.pair_path(1, 128) == "onepass"
    assert G.pair_path(4, 256) == "two-launch"                                        # b = 256, r = 4
    assert G.pair_backward_path(16, 64) == "row" and G.row_backward_groups(16, 64, 2) == [[0], [1]]
    assert G.pair_backward_path(64, 64) == "two-launch"
    assert G.chain_path(48, 16, 3) == "row" and G.row_backward_groups(48, 16, 3) == [[0, 1, 2]]
    assert G.chain_path(32, 32, 3) == "row" and G.row_backward_groups(32, 32, 3) == [[0, 1], [2]]
    assert G.chain_path(256, 16, 3) == "pair+steps" and G.chain_path(64, 64, 3) == "pair+steps"
    assert G.chain_path(48, 16, 5) == "pair+steps"                                     # more than MAX_CHAIN
    assert G.row_plan(16, 64).ks == 2 and G.row_plan(5, 128).ks == 4 and G.row_plan(48, 16).ks == 1


# b = 64: a band super group of 4096 features (chunked), whole rows (r = 2, 3: one pass; r = 12: the row kernel,
# blocks in 2 pieces); b = 128 whole rows (the row kernel, blocks in 4 pieces)
@pytest.mark.parametrize("b,r,n", [(64, 64, 7), (64, 2, 3), (64, 3, 1), (64, 12, 2), (128, 5, 1)])
def test_large_blocks_one_pass_float64(b, r, n, float64_big_tiles):
    from gsops.triton_kernels import gs_apply as G

    L, R = _blocks(r, b), _blocks(r, b)
    x = torch.randn(n, r * b, dtype=torch.float64)
    g = torch.randn(n, r * b, dtype=torch.float64)
    A = gsoft_matrix(np64(L), np64(R))
    assert G.pair_path(r, b, 8) in (("chunked",) if r % b == 0 else ("onepass", "row"))
    torch.testing.assert_close(G.gs_apply(x, L, R), torch.from_numpy(np64(x) @ A.T), rtol=1e-11, atol=1e-11)
    if r % b == 0:  # the transposed chunk kernel: dx = Q^T dy in one pass
        torch.testing.assert_close(G.gs_chunked(g, L, R, transposed=True), torch.from_numpy(np64(g) @ A),
                                   rtol=1e-11, atol=1e-11)
    else:  # the public launchers, backward included (the float64 reference for the block gradients)
        dx, dL, dR = G.gs_apply_backward(g, x, L, R)
        torch.testing.assert_close(dx, torch.from_numpy(np64(g) @ A), rtol=1e-11, atol=1e-11)
        _, rL, rR = _grads_float64(ref.gs_apply, x, (L, R), g)
        torch.testing.assert_close(dL, rL, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dR, rR, rtol=1e-10, atol=1e-10)


# the chunk kernel on small band shapes: several super groups, b not a power of two (masked rows), one chunk
@pytest.mark.parametrize("b,r,n", [(16, 32, 5), (24, 48, 3), (32, 32, 1)])
@pytest.mark.parametrize("linear_out", [False, True])
def test_chunk_kernel_float64(b, r, n, linear_out, float64_big_tiles):
    from gsops.triton_kernels import gs_apply as G

    L, R = _blocks(r, b), _blocks(r, b)
    x = torch.randn(n, r * b, dtype=torch.float64)
    A = gs_chain_matrix([np64(R), np64(L)]) if linear_out else gsoft_matrix(np64(L), np64(R))
    torch.testing.assert_close(G.gs_chunked(x, L, R, linear_out=linear_out), torch.from_numpy(np64(x) @ A.T),
                               rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(G.gs_chunked(x, L, R, linear_out=linear_out, transposed=True),
                               torch.from_numpy(np64(x) @ A), rtol=1e-11, atol=1e-11)


def _check_chain_float64(blocks, x, g):
    from gsops.triton_kernels import gs_apply as G

    C = gs_chain_matrix([np64(B) for B in blocks])
    torch.testing.assert_close(G.gs_chain(x, blocks), torch.from_numpy(np64(x) @ C.T), rtol=1e-10, atol=1e-10)
    dx, dBs = G.gs_chain_backward(g, x, blocks)
    torch.testing.assert_close(dx, torch.from_numpy(np64(g) @ C), rtol=1e-10, atol=1e-10)
    theirs = _grads_float64(lambda x, *bl: ref.gs_chain(x, list(bl)), x, blocks, g)
    for mine, t in zip(dBs, theirs[1:]):
        torch.testing.assert_close(mine, t, rtol=1e-10, atol=1e-10)


# whole rows: band (r % b == 0, r > b), b < 16, odd shapes, r = b, b = 64 (blocks in two pieces)
@pytest.mark.parametrize("b,r,m,n", [(8, 24, 3, 7), (4, 12, 4, 1), (5, 7, 3, 3), (16, 16, 3, 9), (24, 4, 4, 2),
                                     (64, 12, 3, 1)])
def test_chain_of_m_factors_one_pass_float64(b, r, m, n, float64_big_tiles):
    from gsops.triton_kernels import gs_apply as G

    assert G.chain_path(r, b, m, 8) == "row"
    blocks = [_blocks(r, b) for _ in range(m)]
    x = torch.randn(n, r * b, dtype=torch.float64)
    g = torch.randn(n, r * b, dtype=torch.float64)
    _check_chain_float64(blocks, x, g)


def test_chain_backward_in_groups_of_factors(monkeypatch, float64_big_tiles):
    """Block-gradient accumulators for two factors per kernel: a 3-factor chain's backward is two kernels."""
    from gsops.triton_kernels import gs_apply as G

    b, r, m = 8, 12, 3  # 16 x 8 x 8 accumulator elements per factor
    monkeypatch.setattr(G, "ROW_MAX_GRAD_ELEMS", 2 * 16 * 8 * 8)
    assert G.row_backward_groups(r, b, m, 8) == [[0, 1], [2]]
    blocks = [_blocks(r, b) for _ in range(m)]
    _check_chain_float64(blocks, torch.randn(5, r * b, dtype=torch.float64), torch.randn(5, r * b, dtype=torch.float64))


def test_chain_longer_than_a_row_kernel_and_without_row_plan(monkeypatch, float64_big_tiles):
    """m > MAX_CHAIN factors, and a row too large for the row kernel: the pair in one pass plus block steps."""
    from gsops.triton_kernels import gs_apply as G

    b, r = 8, 12
    blocks = [_blocks(r, b) for _ in range(G.MAX_CHAIN + 1)]
    assert G.chain_path(r, b, len(blocks), 8) == "pair+steps"
    _check_chain_float64(blocks, torch.randn(3, r * b, dtype=torch.float64), torch.randn(3, r * b, dtype=torch.float64))
    monkeypatch.setitem(G.ONEPASS_MAX_TILE, 8, 64)
    assert G.row_plan(r, b, 8) is None and G.chain_path(r, b, 3, 8) == "pair+steps"
    blocks = blocks[:3]
    _check_chain_float64(blocks, torch.randn(3, r * b, dtype=torch.float64), torch.randn(3, r * b, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chain_of_three_dtypes_against_reference(dtype):
    """gs_chain (3 factors, the row kernel) on the triton backend against the float32 reference, per dtype."""
    from gsops.tolerances import tol

    torch.manual_seed(3)
    r, b = 12, 16
    blocks = [torch.linalg.qr(torch.randn(r, b, b, dtype=torch.float64))[0].to(dtype) for _ in range(3)]
    x = torch.randn(7, r * b).to(dtype)
    g = torch.randn(7, r * b).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, *blocks)]
    with gsops.use_backend("triton"):
        y = gsops.gs_chain(leaves[0], leaves[1:])
    y.backward(g)
    ref_leaves = [t.float().requires_grad_() for t in (x, *blocks)]
    y_ref = ref.gs_chain(ref_leaves[0], ref_leaves[1:])
    y_ref.backward(g.float())
    torch.testing.assert_close(y.float(), y_ref.detach(), **tol(dtype))
    for mine, theirs in zip(leaves, ref_leaves):
        scale = theirs.grad.abs().max()
        torch.testing.assert_close(mine.grad.float() / scale, theirs.grad / scale, **tol(dtype))


def test_chunk_and_row_kernels_with_the_gpu_launch_plan(monkeypatch, float64_big_tiles):
    """The GPU launch plans of the chunk and row kernels (16-token tiles, several per program, token splits of
    the row backward, a ragged last tile) under the interpreter by pretending not to interpret; non-contiguous
    inputs and no tokens."""
    import gsops.triton_kernels.gs_apply as G

    monkeypatch.setattr(G, "_interpreting", lambda: False)
    monkeypatch.setattr(G, "_n_sm", lambda device: 1)
    b, r, n = 16, 32, 150  # chunked band, 2 super groups; 10 token tiles of 16
    L, R = _blocks(r, b), _blocks(r, b)
    x = torch.randn(r * b, 2 * n, dtype=torch.float64).t()[::2]  # (n, d), features not contiguous
    A = gsoft_matrix(np64(L), np64(R))
    torch.testing.assert_close(G.gs_chunked(x, L, R), torch.from_numpy(np64(x) @ A.T), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(G.gs_chunked(x, L, R, transposed=True), torch.from_numpy(np64(x) @ A),
                               rtol=1e-11, atol=1e-11)
    b, r, n = 8, 12, 700
    blocks = [_blocks(r, b) for _ in range(3)]
    _check_chain_float64(blocks, torch.randn(n, r * b, dtype=torch.float64), torch.randn(n, r * b, dtype=torch.float64))
    e = torch.empty(0, r * b, dtype=torch.float64)
    assert G.gs_row(e, blocks).shape == (0, r * b)
    assert G.gs_chunked(torch.empty(0, 512, dtype=torch.float64), L, R).shape == (0, 512)
    dx, dBs = G.gs_row_backward(e, e, blocks)
    assert dx.shape == (0, r * b) and len(dBs) == 3 and not any(d.any() for d in dBs)

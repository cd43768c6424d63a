"""Property-based fuzzing of the public ops (hypothesis).

Each drawn case either matches the float64 loop-built oracle or raises ValueError/TypeError whose
message names the offending argument. Never a crash, hang or silent wrong answer.
"""
import os

import numpy as np
import pytest
import torch
pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (requirements-dev.txt)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gsops
from gsops.tolerances import NEUMANN_REFUSE_ERROR, tol
from dense import block_diag, gs_chain_matrix, gsoft_matrix, np64, sigma, skew_from_packed

EXAMPLES = 200
# CI replays the same examples every run (reproducible); locally each run explores new ones.
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BAD = [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8]
DTYPES = st.sampled_from(FLOATS + BAD)
# mostly small blocks; sometimes many 1-element blocks (huge block counts)
RB = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 6)),
    st.tuples(st.integers(200, 1500), st.just(1)),
)
LEAD = st.lists(st.integers(0, 3), min_size=0, max_size=2)  # includes 0-size batches
LAYOUT = st.sampled_from(["contiguous", "transposed", "expanded"])
VALUES = st.sampled_from(["normal", "normal", "normal", "nan", "inf"])


def _make(shape, dtype, layout, values):
    x = torch.randn(shape, dtype=torch.float64)
    if values != "normal" and x.numel():
        x.view(-1)[0] = float("nan") if values == "nan" else float("inf")
    if dtype.is_complex:
        x = x.to(dtype)
    elif dtype == torch.bool:
        x = x > 0
    elif not dtype.is_floating_point:
        x = x.round().to(dtype)
    else:
        x = x.to(dtype)
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded" and x.dim() >= 1:
        x = x[..., :1, :].expand(x.shape) if x.dim() >= 2 and x.shape[-2] > 0 else x
    return x


def _expect_error(fn, exc, name):
    with pytest.raises(exc) as info:
        fn()
    assert name in str(info.value), f"message {info.value!r} does not name {name!r}"


def _compare(got, expected_np, dtype):
    expected = torch.from_numpy(np.asarray(expected_np, dtype=np.float64))
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, equal_nan=True, **_loose(dtype))


def _apply_oracle(x, A):
    """x @ A.T where a non-finite input poisons exactly the outputs that structurally depend on it
    (a dense matmul would spread NaN through the structural zeros of A)."""
    x64 = np64(x)
    bad = ~np.isfinite(x64)
    y = np.where(bad, 0.0, x64) @ A.T
    reach = (bad.astype(np.float64) @ (np.abs(A.T) > 0)) > 0
    return np.where(reach, np.nan, y)


def _compare_apply(got, x, A, dtype):
    expected = _apply_oracle(x, A)
    poisoned = np.isnan(expected)
    assert np.array_equal(~np.isfinite(np64(got)), poisoned), "non-finite outputs must be exactly the poisoned ones"
    _compare(got.masked_fill(torch.from_numpy(poisoned), 0), np.where(poisoned, 0.0, expected), dtype)


def _loose(dtype):
    t = tol(dtype)
    # a few rounding steps in half precision; the oracle sees the rounded inputs
    return {"rtol": 4 * t["rtol"], "atol": 4 * t["atol"]}


def _block_case(draw_rb, lead, xdtype, bdtype, layout, values, bvalues, x_extra=0):
    r, b = draw_rb
    d = r * b
    x = _make((*lead, 2, d + x_extra) if layout != "contiguous" else (*lead, d + x_extra), xdtype, layout, values)
    B = _make((r, b, b), bdtype, "contiguous", bvalues)
    if B.dtype.is_floating_point:
        B = B / max(b, 1) ** 0.5
    return x, B


@SETTINGS
@given(RB, LEAD, DTYPES, DTYPES, LAYOUT, VALUES, VALUES, st.sampled_from([0, 0, 0, 1]))
def test_fuzz_block_diag_mm(rb, lead, xdtype, bdtype, layout, values, bvalues, x_extra):
    x, B = _block_case(rb, lead, xdtype, bdtype, layout, values, bvalues, x_extra)
    call = lambda: gsops.block_diag_mm(x, B)  # noqa: E731
    if xdtype in BAD:
        return _expect_error(call, TypeError, "x")
    if bdtype in BAD:
        return _expect_error(call, TypeError, "B")
    if bvalues != "normal":
        return _expect_error(call, ValueError, "B contains NaN or inf")
    if x_extra:
        return _expect_error(call, ValueError, "x.shape[-1]")
    _compare_apply(gsops.block_diag_mm(x, B), x, block_diag(np64(B)), xdtype)


@SETTINGS
@given(RB, LEAD, st.sampled_from(FLOATS), DTYPES, LAYOUT, VALUES, st.integers(1, 3), st.booleans())
def test_fuzz_gs_apply_and_chain(rb, lead, xdtype, bdtype, layout, values, m, mismatch):
    r, b = rb
    if r * b > 64 and m > 1:
        m = 1  # keep the dense oracle small for huge block counts
    x, L = _block_case(rb, lead, xdtype, bdtype, layout, values, "normal")
    R = _make((r, b, b), bdtype, "contiguous", "normal")
    other = _make((r + 1, b, b), bdtype, "contiguous", "normal") if mismatch else R
    if bdtype in BAD:
        _expect_error(lambda: gsops.gs_apply(x, L, R), TypeError, "R")
        return _expect_error(lambda: gsops.gs_chain(x, [L] * m), TypeError, "blocks[0]")
    if mismatch:
        _expect_error(lambda: gsops.gs_apply(x, other, R), ValueError, "L has")
        return _expect_error(lambda: gsops.gs_chain(x, [R, other]), ValueError, "blocks[1]")
    if r * b <= 64:
        _compare_apply(gsops.gs_apply(x, L, R), x, gsoft_matrix(np64(L), np64(R)), xdtype)
    blocks = [L, R, L][:m]
    _compare_apply(gsops.gs_chain(x, blocks), x, gs_chain_matrix([np64(B) for B in blocks]), xdtype)


@SETTINGS
@given(st.integers(-2, 40), st.integers(-2, 60), st.sampled_from([int, float, bool]))
def test_fuzz_perm(k, n, kind):
    kk = kind(k)
    if kind is not int:
        return _expect_error(lambda: gsops.perm(kk, n), TypeError, "k must be an int")
    if k < 1:
        return _expect_error(lambda: gsops.perm(k, n), ValueError, f"k={k}")
    if n < 1:
        return _expect_error(lambda: gsops.perm(k, n), ValueError, f"n={n}")
    if n % k:
        return _expect_error(lambda: gsops.perm(k, n), ValueError, f"k={k} must divide n={n}")
    assert gsops.perm(k, n).tolist() == sigma(k, n)
    x = torch.randn(3, n, dtype=torch.float64)
    P = np.zeros((n, n))
    for i, s in enumerate(sigma(k, n)):
        P[s, i] = 1
    np.testing.assert_array_equal(np64(gsops.permute(x, k)), np64(x) @ P.T)


@SETTINGS
@given(st.integers(1, 9), LEAD, DTYPES, VALUES, st.floats(0, 3), st.sampled_from(["exact", "neumann"]))
def test_fuzz_skew_and_cayley(b, lead, dtype, values, scale, method):
    p = _make((*lead, b * (b - 1) // 2), dtype, "contiguous", values)
    if dtype in BAD:
        return _expect_error(lambda: gsops.skew(p, b), TypeError, "params")
    K = gsops.skew(p * scale if values == "normal" else p, b)
    np.testing.assert_array_equal(np64(K), skew_from_packed(np64(p * scale if values == "normal" else p), b))
    torch.testing.assert_close(gsops.unskew(K), p * scale if values == "normal" else p, rtol=0, atol=0, equal_nan=True)
    call = lambda: gsops.cayley(K, method=method, terms=4)  # noqa: E731
    if values != "normal" and K.numel() and not torch.isfinite(K).all():
        return _expect_error(call, ValueError, "K contains NaN or inf")
    Kd = np64(K)
    if method == "neumann" and K.numel():
        norm = np.linalg.norm(Kd, ord=2, axis=(-2, -1)).max() if Kd.size else 0.0
        bound = 2 * norm ** 5 / (1 - norm) if norm < 1 else np.inf  # terms=4 (SPEC)
        if bound >= 4 * NEUMANN_REFUSE_ERROR:
            return _expect_error(call, ValueError, "method='neumann'")
        if bound > NEUMANN_REFUSE_ERROR / 4:
            return  # too close to the refusal threshold to assert either way
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Q = call()
        # within the series' own error bound (SPEC), plus rounding
        bound = bound + 4 * tol(dtype)["atol"]
        exact = (np.eye(b) + Kd) @ np.linalg.inv(np.eye(b) - Kd)
        assert np.abs(np64(Q) - exact).max() <= bound * b + 1e-12
        return
    Q = call()
    expected = (np.eye(b) + Kd) @ np.linalg.inv(np.eye(b) - Kd) if Kd.size else np.zeros(Kd.shape)
    _compare(Q, expected, dtype)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 5), st.sampled_from([torch.float64, torch.float32] + BAD), st.integers(-1, 1), VALUES)
def test_fuzz_gs_project(r, b, dtype, extra_cols, values):
    d = r * b
    W = _make((d, d + extra_cols), dtype, "contiguous", values)
    call = lambda: gsops.gs_project(W, b)  # noqa: E731
    if dtype in BAD:
        return _expect_error(call, TypeError, "W")
    if extra_cols:
        return _expect_error(call, ValueError, "W must be square")
    if values != "normal":
        return _expect_error(call, ValueError, "W contains NaN or inf")
    L, R = call()
    # optimality certificate: the projection of a class member is itself, and the residual of W
    # is orthogonal to the fitted matrix (first-order condition of a least-squares fit that
    # contains all scalings of its own solution)
    A = gsoft_matrix(np64(L), np64(R))
    resid = np64(W) - A
    assert abs((resid * A).sum()) <= 1e-3 * max(1.0, np.linalg.norm(A) ** 2)

"""Micro-benchmarks: batched Cayley vs ``torch.linalg.solve``; GS apply vs the dense product vs a plain copy.

Each benchmark is a set-up function returning ``{name: callable}`` so the same
code runs in the harness (:func:`run_micro`) and under pytest-benchmark
(``perf/test_bench_micro.py``).
"""
from __future__ import annotations

import time

import torch

import gsops
from gsops.reference import gs_dense


# torch.linalg.solve has no float16/bfloat16 kernel (CPU or CUDA): its baseline runs in float32 then
HALF = (torch.float16, torch.bfloat16)


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ``torch.linalg.solve`` baseline computes in for inputs of ``dtype``."""
    return torch.float32 if dtype in HALF else dtype


def solve_note(dtype: torch.dtype) -> str:
    return (f"computed in float32 (torch.linalg.solve has no {str(dtype).replace('torch.', '')} kernel)"
            if dtype in HALF else "")


def cayley_setup(r: int, b: int, device, dtype, backward: bool = True) -> dict:
    """Cayley of ``r`` skew ``b x b`` blocks: gsops.cayley vs ``torch.linalg.solve`` (``Q = (I + K)(I - K)^{-1}``).

    For float16/bfloat16 ``K`` the solve baseline upcasts to float32 (see :func:`solve_note`)."""
    g = torch.Generator().manual_seed(0)
    A = (0.1 * torch.randn(r, b, b, generator=g)).to(device=device, dtype=dtype)
    A = (A - A.transpose(-1, -2)).requires_grad_(backward)
    sdt = solve_dtype(dtype)
    eye = torch.eye(b, device=device, dtype=sdt)
    gQ = torch.randn(r, b, b, generator=g).to(device=device, dtype=dtype)

    def run_gsops():
        Q = gsops.cayley(A)
        if backward:
            Q.backward(gQ)
            A.grad = None

    def run_solve():
        # X (I - K) = (I + K)  =>  X = (I + K)(I - K)^{-1}
        K = A.to(sdt)
        Q = torch.linalg.solve(eye - K, eye + K, left=False).to(dtype)
        if backward:
            Q.backward(gQ)
            A.grad = None

    return {"gsops.cayley": run_gsops, "torch.linalg.solve": run_solve}


def gs_apply_setup(tokens: int, d: int, b: int, device, dtype) -> dict:
    """Forward ``Q x`` for ``tokens`` rows: gsops.gs_apply vs ``x @ Q^T`` with dense Q vs ``x.clone()``."""
    r = d // b
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype)
    L = torch.linalg.qr(torch.randn(r, b, b, generator=g, dtype=torch.float64))[0]
    R = torch.linalg.qr(torch.randn(r, b, b, generator=g, dtype=torch.float64))[0]
    QT = gs_dense(L, R).T.contiguous().to(device=device, dtype=dtype)
    L, R = L.to(device=device, dtype=dtype), R.to(device=device, dtype=dtype)
    return {
        "gsops.gs_apply": lambda: gsops.gs_apply(x, L, R),
        "dense x @ Q^T": lambda: x @ QT,
        "copy x.clone()": lambda: x.clone(),
    }


def _time(fn, device, min_time: float, min_reps: int = 5, max_reps: int = 1000) -> tuple[float, int]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    probe = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max_reps, max(min_reps, min_time / probe)))
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], reps


def run_micro(device, dtype, quick: bool = False, sizes=None) -> list[dict]:
    """Rows: benchmark, shape, implementation, median ms, and for GS apply GB/s and fraction of copy bandwidth."""
    device = torch.device(device)
    min_time = 0.2 if quick else 1.0
    rows = []
    cay = sizes.get("cayley") if sizes else None
    cay = cay or ([(32, 32)] if quick else [(32, 32), (128, 32), (64, 64)])
    for r, b in cay:
        for name, fn in cayley_setup(r, b, device, dtype).items():
            t, n = _time(fn, device, min_time)
            rows.append(dict(benchmark="cayley fwd+bwd", shape=f"r={r} b={b}", impl=name, ms=1e3 * t, reps=n,
                             note=solve_note(dtype) if name == "torch.linalg.solve" else ""))
    gsz = sizes.get("gs_apply") if sizes else None
    gsz = gsz or ([(4096, 1024, 32)] if quick else [(4096, 1024, 32), (1024, 4096, 64)])
    for tokens, d, b in gsz:
        moved = 2 * tokens * d * torch.tensor([], dtype=dtype).element_size()  # read x + write y
        res = {}
        for name, fn in gs_apply_setup(tokens, d, b, device, dtype).items():
            res[name] = _time(fn, device, min_time)
        copy_bw = moved / res["copy x.clone()"][0]
        for name, (t, n) in res.items():
            bw = moved / t
            rows.append(dict(benchmark="GS apply fwd", shape=f"tokens={tokens} d={d} b={b}", impl=name, ms=1e3 * t,
                             reps=n, gbps=bw / 1e9, copy_fraction=bw / copy_bw))
    return rows

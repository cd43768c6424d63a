"""Correctness at real shapes and kernel timings on a GPU: the measuring parts of ``./run.sh gpu``.

    python -m perf.gpu_checks correctness --backend cuda --dtypes bf16,fp16,fp32 --out rows.jsonl
    python -m perf.gpu_checks correctness --backend triton --big --out big.jsonl    # one case past 2^31 elements
    python -m perf.gpu_checks timings --out timings.json
    ... --tiny: CPU shapes for the dry run (Triton interpreter, the CUDA emulator build)

Correctness: ``gs_apply`` forward and backward of one backend against float64 oracles on the
same device (the dense ``Q = P^T L P R`` for ``y`` and ``dx``, the reference backward in float64
for ``dL``/``dR``), 16k tokens x 4096 features (4080 for b = 24) and, for b in ``ODD_BLOCKS``, an odd
token count, b in {8, 16, 24, 32, 64, 128},
float32/float16/bfloat16. Every output is allocated from memory first filled with NaN (the CUDA
caching allocator hands the freed block back), and each case runs twice: a forward or input
gradient that differs bit for bit between the runs is reported (a race); the block gradients
use atomics on the cuda backend and are compared to the tolerance only. Batched Cayley is checked
against ``torch.linalg.solve`` in float64. Rows are written one JSON line at a time, so a killed
run keeps what it measured.

Timings (CUDA events, median): each GS kernel against a plain copy of the same bytes and against the
dense GEMM ``x @ Q^T`` measured in the same run; batched Cayley against ``torch.linalg.solve``.
Tolerances come from :mod:`gsops.tolerances`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BLOCKS = (8, 16, 24, 32, 64, 128)
ODD_BLOCKS = (8, 24, 128)  # also run with an odd token count (16383)


def _device(tiny: bool) -> torch.device:
    if tiny:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} sees no CUDA device (use --tiny for the CPU dry run)")
    return torch.device("cuda")


def _impls(backend: str):
    from gsops import backends
    from gsops.ops import dispatch

    ok, reason = backends.load(backend)
    if not ok:
        raise RuntimeError(f"backend {backend} unavailable: {reason}")
    return dispatch.impl("gs_apply", backend), dispatch.impl("gs_apply_backward", backend), \
        dispatch.impl("cayley_exact", backend)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _poison(shape, dtype, device, copies: int = 1):
    """Fill and free blocks of the size of an output: the caching allocator returns them to the next
    allocations of that size, so an output element the kernel never writes stays NaN."""
    if device.type != "cuda":
        return
    ts = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(copies)]
    del ts


def _err(got: torch.Tensor, want: torch.Tensor, dtype) -> dict:
    """Max |got - want| and its ratio to the allowed ``atol * max|want| + rtol * |want|`` (pass: <= 1)."""
    from gsops.tolerances import tol

    t = tol(dtype)
    g = got.double()
    finite = bool(torch.isfinite(g).all())
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    diff = (g - want).abs()
    allowed = t["atol"] * scale + t["rtol"] * want.abs()
    ratio = float((diff / allowed).max()) if want.numel() else 0.0
    return dict(finite=finite, max_abs=float(diff.max()) if want.numel() else 0.0, ratio=ratio if finite else math.inf)


def _orth_blocks(r, b, device, dtype, gen):
    A = torch.randn(r, b, b, dtype=torch.float64, device=device, generator=gen)
    return torch.linalg.qr(A)[0].to(dtype)


def gs_case(backend: str, dtype, b: int, tokens: int, d: int, device, seed: int = 0) -> dict:
    """One gs_apply forward + backward case, run twice, against float64 oracles."""
    from gsops.reference import gs as ref_gs
    from gsops.reference import gs_dense

    fwd, bwd, _ = _impls(backend)
    r = d // b
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, d, device=device, generator=gen).to(dtype)
    g = torch.randn(tokens, d, device=device, generator=gen).to(dtype)
    L, R = _orth_blocks(r, b, device, dtype, gen), _orth_blocks(r, b, device, dtype, gen)
    row = dict(op="gs_apply", backend=backend, dtype=str(dtype).replace("torch.", ""), b=b, tokens=tokens, d=d)
    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = []
        t0 = time.perf_counter()
        for _ in range(2):
            _poison((tokens, d), dtype, device, copies=2)
            y = fwd(x, L, R)
            _poison((tokens, d), dtype, device, copies=2)
            dx, dL, dR = bwd(g, x, L, R)
            _sync(device)
            outs.append((y, dx, dL, dR))
        row["kernel_s"] = time.perf_counter() - t0
        caught = [str(m.message) for m in w]
    if caught:
        row["warnings"] = caught[:3]
    Q = gs_dense(L.double(), R.double())
    (y, dx, dL, dR), (y2, dx2, dL2, dR2) = outs
    checks = {"y": _err(y, x.double() @ Q.T, dtype), "dx": _err(dx, g.double() @ Q, dtype)}
    del Q
    _, wL, wR = ref_gs.gs_apply_backward(g.double(), x.double(), L.double(), R.double())
    for name, got, want in (("dL", dL, wL), ("dR", dR, wR)):
        checks[name] = _err(got, want, dtype)
        checks[name + "_run2"] = _err(outs[1][2 if name == "dL" else 3], want, dtype)
    row["repeat_bitwise_y"] = bool(torch.equal(y, y2))
    row["repeat_bitwise_dx"] = bool(torch.equal(dx, dx2))
    row["repeat_max_diff_dLdR"] = float(max((dL - dL2).abs().max(), (dR - dR2).abs().max()))
    row["checks"] = checks
    row["max_ratio"] = max(c["ratio"] for c in checks.values())
    row["passed"] = bool(all(c["finite"] and c["ratio"] <= 1 for c in checks.values())
                         and row["repeat_bitwise_y"] and row["repeat_bitwise_dx"])
    return row


def big_case(backend: str, device, dtype=torch.bfloat16, b: int = 32, d: int = 4096) -> dict:
    """A forward and input gradient past 2^31 elements (64-bit offsets); rows at the start, the
    2^31 boundary and the end checked against the dense float64 Q."""
    from gsops.reference import gs_dense

    fwd, bwd, _ = _impls(backend)
    tokens = (2**31) // d + 129  # 2^31 + 129 d elements
    r = d // b
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(tokens, d, device=device, generator=gen).to(dtype)
    L, R = _orth_blocks(r, b, device, dtype, gen), _orth_blocks(r, b, device, dtype, gen)
    row = dict(op="gs_apply (past 2^31 elements)", backend=backend, dtype=str(dtype).replace("torch.", ""), b=b,
               tokens=tokens, d=d, elements=tokens * d)
    _poison((tokens, d), dtype, device, copies=2)
    y = fwd(x, L, R)
    _poison((tokens, d), dtype, device, copies=2)
    dx = bwd(x, x, L, R)[0]  # dy = x: dx = Q^T x (one random tensor of 2^31 elements is enough)
    _sync(device)
    Q = gs_dense(L.double(), R.double())
    boundary = (2**31) // d
    rows = torch.cat([torch.arange(0, 64), torch.arange(boundary - 64, boundary + 64), torch.arange(tokens - 64, tokens)])
    rows = rows.to(device)
    xs = x[rows].double()
    checks = {"y": _err(y[rows], xs @ Q.T, dtype), "dx": _err(dx[rows], xs @ Q, dtype)}
    row["checks"] = checks
    row["max_ratio"] = max(c["ratio"] for c in checks.values())
    row["passed"] = bool(all(c["finite"] and c["ratio"] <= 1 for c in checks.values()))
    return row


def cayley_case(backend: str, b: int, n_mats: int, device) -> dict:
    _, _, cay = _impls(backend)
    gen = torch.Generator(device=device).manual_seed(b)
    A = 0.3 * torch.randn(n_mats, b, b, device=device, generator=gen, dtype=torch.float64)
    K = (A - A.transpose(-1, -2)).float()
    Q1, Q2 = cay(K), cay(K)
    _sync(device)
    eye = torch.eye(b, dtype=torch.float64, device=device)
    Kd = K.double()
    want = torch.linalg.solve(eye - Kd, eye + Kd, left=False)
    e = _err(Q1, want, torch.float32)
    row = dict(op="cayley_exact", backend=backend, dtype="float32", b=b, tokens=n_mats, d=b, checks={"Q": e},
               repeat_bitwise_y=bool(torch.equal(Q1, Q2)), max_ratio=e["ratio"])
    row["passed"] = bool(e["finite"] and e["ratio"] <= 1 and row["repeat_bitwise_y"])
    return row


def correctness(opts) -> int:
    device = _device(opts.tiny)
    out = open(opts.out, "a")
    n_fail = 0

    def emit(row):
        nonlocal n_fail
        n_fail += not row.get("passed", False) and not row.get("skipped")
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"{'skip' if row.get('skipped') else 'ok  ' if row.get('passed') else 'FAIL'} {row['op']} {row['backend']} {row['dtype']} b={row['b']} "
              f"tokens={row['tokens']} max err/tol={row.get('max_ratio', float('nan')):.3g}"
              + (f" error={row['error']}" if "error" in row else ""), flush=True)

    def guarded(fn, desc, *args):
        try:
            emit(fn(*args))
        except Exception as e:  # noqa: BLE001 - recorded in the row; later cases still run
            emit(dict(desc, error=f"{type(e).__name__}: {str(e)[:300]}", passed=False))
            if device.type == "cuda":  # a fault poisons the CUDA context: the cases after it cannot run
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    return False
        return True

    if opts.big:
        if opts.tiny:
            emit(dict(op="gs_apply (past 2^31 elements)", backend=opts.backend, dtype="bfloat16", b=32, tokens=0,
                      d=4096, skipped="needs 2^31 elements (8 GiB of bf16 in and out): GPU only", passed=None))
        else:
            guarded(big_case, dict(op="gs_apply (past 2^31 elements)", backend=opts.backend, dtype="bfloat16", b=32,
                                   tokens=0, d=4096), opts.backend, device)
        out.close()
        return 1 if n_fail else 0
    if opts.tiny:
        blocks, tokens_list = (8, 24), (16, 7)
    else:
        blocks, tokens_list = BLOCKS, (16384, 16383)
    if opts.blocks:
        blocks = [int(b) for b in opts.blocks.split(",")]
    for dname in opts.dtypes.split(","):
        dtype = DTYPES[dname]
        for b in blocks:
            d = 3 * b if opts.tiny else 4096 if 4096 % b == 0 else 4080  # 24 does not divide 4096: 170 blocks
            # the odd count (a ragged last tile) for three block sizes: a token count that is not a multiple
            # of 16 is a separate Triton compile, and the tile masks do not depend on b
            odd_too = opts.tiny or b in ODD_BLOCKS
            for tokens in (tokens_list if odd_too else tokens_list[:1]):
                desc = dict(op="gs_apply", backend=opts.backend, dtype=str(dtype).replace("torch.", ""), b=b,
                            tokens=tokens, d=d)
                if not guarded(gs_case, desc, opts.backend, dtype, b, tokens, d, device):
                    out.close()
                    return 1
    if "fp32" in opts.dtypes.split(","):
        for b in blocks:
            n_mats = 4 if opts.tiny else 4096 // b
            guarded(cayley_case, dict(op="cayley_exact", backend=opts.backend, dtype="float32", b=b, tokens=n_mats,
                                      d=b), opts.backend, b, n_mats, device)
    out.close()
    return 1 if n_fail else 0


# ----------------------------------------------------------------------------- timings
def _time_ms(fn, device, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock on the CPU), after 2 warm-ups."""
    for _ in range(2):
        fn()
    _sync(device)
    ts = []
    if device.type == "cuda":
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


def timings(opts) -> int:
    from gsops import backends
    from gsops.reference import gs_dense

    from .micro import cayley_setup, solve_note

    device = _device(opts.tiny)
    dtype = DTYPES[opts.dtype]
    tokens, d = (64, 96) if opts.tiny else (16384, 4096)
    blocks = (8,) if opts.tiny else (8, 16, 32, 64, 128)
    reps = 2 if opts.tiny else 20
    names = [n for n in ("cuda", "triton") if backends.load(n)[0]]
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d, device=device, generator=gen).to(dtype)
    g = torch.randn(tokens, d, device=device, generator=gen).to(dtype)
    y = torch.empty_like(x)
    moved = 2 * x.numel() * x.element_size()  # read x + write y
    copy_ms = _time_ms(lambda: y.copy_(x), device, reps)
    rows.append(dict(op="copy y <- x", backend="torch", b=0, ms=copy_ms, gbps=moved / copy_ms / 1e6, copy_pct=100.0))

    def add(op, backend, b, ms, gemm_ms=None, bytes_=moved, note=""):
        gbps = bytes_ / ms / 1e6
        rows.append(dict(op=op, backend=backend, b=b, ms=ms, gbps=gbps, copy_pct=100 * gbps / rows[0]["gbps"],
                         x_dense_gemm=(ms / gemm_ms) if gemm_ms else None, note=note))
        print(f"{op:28s} {backend:7s} b={b:<4d} {ms:9.4f} ms {gbps:8.1f} GB/s "
              f"{rows[-1]['copy_pct']:5.0f}% of copy" + (f"  {ms / gemm_ms:.2f}x dense GEMM" if gemm_ms else ""),
              flush=True)

    print(f"copy: {copy_ms:.4f} ms, {moved / copy_ms / 1e6:.1f} GB/s", flush=True)
    for b in blocks:
        if d % b:
            continue
        r = d // b
        L = _orth_blocks(r, b, device, dtype, gen)
        R = _orth_blocks(r, b, device, dtype, gen)
        QT = gs_dense(L.double(), R.double()).T.contiguous().to(dtype)
        gemm_ms = _time_ms(lambda: x @ QT, device, reps)
        add("dense GEMM x @ Q^T", "torch", b, gemm_ms, gemm_ms)
        for be in names:
            fwd, bwd, _ = _impls(be)
            try:
                add("gs_apply fwd", be, b, _time_ms(lambda: fwd(x, L, R), device, reps), gemm_ms)
                # backward reads g and x, writes dx (3 activation passes) and the block gradients
                add("gs_apply bwd", be, b, _time_ms(lambda: bwd(g, x, L, R), device, reps), 2 * gemm_ms,
                    bytes_=3 * moved // 2, note="x dense GEMM: vs the two GEMMs of a dense backward")
            except Exception as e:  # noqa: BLE001
                rows.append(dict(op="gs_apply", backend=be, b=b, error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(f"gs_apply {be} b={b}: {rows[-1]['error']}", flush=True)
    # batched Cayley fwd+bwd: gsops (each backend) vs torch.linalg.solve
    import gsops

    for cdtype in (torch.float32, dtype):
        r_, b_ = (4, 8) if opts.tiny else (128, 32)
        setup = cayley_setup(r_, b_, device, cdtype)
        solve_ms = _time_ms(setup["torch.linalg.solve"], device, reps)
        rows.append(dict(op=f"cayley fwd+bwd r={r_}", backend="torch.linalg.solve", b=b_, ms=solve_ms,
                         dtype=str(cdtype).replace("torch.", ""), note=solve_note(cdtype)))
        for be in names:
            try:
                with gsops.use_backend(be):
                    ms = _time_ms(setup["gsops.cayley"], device, reps)
                rows.append(dict(op=f"cayley fwd+bwd r={r_}", backend=be, b=b_, ms=ms, x_solve=ms / solve_ms,
                                 dtype=str(cdtype).replace("torch.", "")))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(op=f"cayley fwd+bwd r={r_}", backend=be, b=b_, error=f"{type(e).__name__}: {e}"))
        print(f"cayley {cdtype}: solve {solve_ms:.4f} ms; " + ", ".join(
            f"{r['backend']} {r['ms']:.4f} ms" for r in rows[-len(names):] if "ms" in r), flush=True)
    doc = dict(device=str(device), dtype=opts.dtype, tokens=tokens, d=d, rows=rows,
               timing="CUDA events, median" if device.type == "cuda" else "CPU wall clock (dry run: not a timing)")
    Path(opts.out).write_text(json.dumps(doc, indent=1))
    return 0 if not any("error" in r for r in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.gpu_checks", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("correctness")
    c.add_argument("--backend", required=True, choices=["cuda", "triton"])
    c.add_argument("--dtypes", default="bf16,fp16,fp32")
    c.add_argument("--big", action="store_true", help="only the case past 2^31 elements")
    c.add_argument("--blocks", default=None, help="comma list of block sizes (default 8,16,24,32,64,128)")
    c.add_argument("--tiny", action="store_true")
    c.add_argument("--out", required=True)
    t = sub.add_parser("timings")
    t.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    t.add_argument("--tiny", action="store_true")
    t.add_argument("--out", required=True)
    opts = p.parse_args(argv)
    return correctness(opts) if opts.cmd == "correctness" else timings(opts)


if __name__ == "__main__":
    sys.exit(main())

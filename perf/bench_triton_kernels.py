"""``python -m perf.bench_triton_kernels``: the Triton kernels against their GPU targets (needs a CUDA GPU).

1. Fused GS apply (``gsops.gs_apply``, GSOFT's ``P^T L P R x``), bf16, d = 4096,
   16k tokens, b in {16, 32, 64}: time of the forward against a plain copy of
   the same tensors (read x, write y); ``bandwidth_fraction = t_copy / t_gs``
   (target >= 0.70).  Forward+backward time is reported too, which path ran
   (``triton_kernels.gs_apply.pair_path``: onepass, chunked, row or the two-launch
   fallback) and the two-launch path itself, with its
   largest difference from the default path.
2. Batched Cayley, r = 128 blocks of b = 32 (float32): forward+backward of
   ``gsops.cayley`` on the Triton backend against the same transform through
   ``torch.linalg.solve`` (the reference backend; autograd backward)
   (target >= 5x).  The Neumann kernel (5 terms) is listed for comparison.

Prints a table and writes ``perf/results/triton_kernels_<device>_<commit>.{csv,json}``
with the device name, dtype, shapes, versions and git commit.  Without a CUDA
device it says so and exits 0 (the Triton interpreter is far too slow to time).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

from .provenance import git_commit

ROOT = Path(__file__).resolve().parent.parent


def _bench(fn, warmup=10, rep=50) -> float:
    """Median milliseconds of ``fn()`` over ``rep`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _orth(r, b, dtype, device):
    return torch.linalg.qr(torch.randn(r, b, b, device=device, dtype=torch.float32))[0].to(dtype)


def bench_gs_apply(d, tokens, block_sizes, dtype, device, rows):
    import gsops
    from gsops.triton_kernels import gs_apply as kernels

    x = torch.randn(tokens, d, device=device, dtype=dtype)
    y = torch.empty_like(x)
    g = torch.randn_like(x)
    t_copy = _bench(lambda: y.copy_(x))
    nbytes = 2 * x.numel() * x.element_size()
    for b in block_sizes:
        r = d // b
        L, R = _orth(r, b, dtype, device), _orth(r, b, dtype, device)
        with gsops.use_backend("triton"):
            fwd = lambda: gsops.gs_apply(x, L, R)  # noqa: E731
            t_fwd = _bench(fwd)
            xl, Ll, Rl = x.clone().requires_grad_(), L.clone().requires_grad_(), R.clone().requires_grad_()

            def step():
                gsops.gs_apply(xl, Ll, Rl).backward(g)

            t_step = _bench(step, warmup=5, rep=20)
        with gsops.use_backend("torch"):
            t_ref = _bench(lambda: gsops.gs_apply(x, L, R))
        path = kernels.pair_path(r, b, kernels.dot_bytes(x.dtype, L.dtype))
        t_two = _bench(lambda: kernels._forward(x, [R, L], True))  # the fallback path, for comparison
        err = (kernels._forward(x, [R, L], True).float() - kernels.gs_apply(x, L, R).float()).abs().max().item()
        rows.append({
            "kernel": "gs_apply_fwd", "dtype": str(dtype).replace("torch.", ""), "shape": f"N={tokens} d={d} r={r} b={b}",
            "ms": round(t_fwd, 4), "baseline": "plain copy", "baseline_ms": round(t_copy, 4),
            "ratio": round(t_copy / t_fwd, 3), "target": ">= 0.70 of copy bandwidth",
            "GB/s": round(nbytes / t_fwd / 1e6, 1), "fwd_bwd_ms": round(t_step, 4), "torch_ref_fwd_ms": round(t_ref, 4),
            "path": path,
        })
        rows.append({
            "kernel": "gs_apply_two_launch_fwd", "dtype": str(dtype).replace("torch.", ""),
            "shape": f"N={tokens} d={d} r={r} b={b}", "ms": round(t_two, 4), "baseline": "plain copy",
            "baseline_ms": round(t_copy, 4), "ratio": round(t_copy / t_two, 3),
            "target": ">= 0.70 of copy bandwidth", "GB/s": round(nbytes / t_two / 1e6, 1),
            "max_abs_diff_vs_default": err,
        })


def bench_cayley(r, b, device, rows, terms=5):
    import gsops
    from gsops import reference as ref

    A = torch.randn(r, b, b, device=device) * 0.005  # ||K|| ~ 0.1: the Neumann series is accurate too
    K0 = A - A.transpose(-1, -2)
    G = torch.randn(r, b, b, device=device)

    def step_triton(method):
        K = K0.clone().requires_grad_()
        with gsops.use_backend("triton"):
            gsops.cayley(K, method=method, terms=terms).backward(G)

    def step_solve():
        K = K0.clone().requires_grad_()
        eye = torch.eye(b, device=device)
        M = torch.linalg.solve(eye - K, eye.expand_as(K))
        (2 * M - eye).backward(G)

    def step_ref():
        K = K0.clone().requires_grad_()
        ref.cayley_exact(K).backward(G)

    from gsops.triton_kernels import cayley as kernels

    def step_kernels():  # the two launches alone, without the public op's checks and autograd
        Q = kernels.cayley_exact(K0)
        kernels.cayley_exact_backward(G, Q)

    t_solve = _bench(step_solve)
    for label, fn in [("cayley_exact_fwd_bwd", lambda: step_triton("exact")),
                      ("cayley_neumann_fwd_bwd", lambda: step_triton("neumann")),
                      ("cayley_exact_kernels_only_fwd_bwd", step_kernels),
                      ("cayley_reference_fwd_bwd", step_ref)]:
        t = _bench(fn)
        rows.append({
            "kernel": label, "dtype": "float32", "shape": f"r={r} b={b}" + (f" terms={terms}" if "neumann" in label else ""),
            "ms": round(t, 4), "baseline": "torch.linalg.solve + autograd", "baseline_ms": round(t_solve, 4),
            "ratio": round(t_solve / t, 3), "target": ">= 5x faster" if label == "cayley_exact_fwd_bwd" else "",
        })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block-sizes", default="16,32,64")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--cayley-r", type=int, default=128)
    ap.add_argument("--cayley-b", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "perf" / "results"))
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton_kernels: no CUDA device here (torch.cuda.is_available() is False); "
              "these are GPU kernel benchmarks, nothing was measured.")
        return 0
    import triton

    import gsops

    gsops.set_check_finite(False)  # the parameter NaN scan syncs the device; not part of the kernel time
    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    rows: list[dict] = []
    bench_gs_apply(args.d, args.tokens, [int(s) for s in args.block_sizes.split(",")], dtype, device, rows)
    bench_cayley(args.cayley_r, args.cayley_b, device, rows)

    name = torch.cuda.get_device_name(device)
    meta = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": git_commit(ROOT).sha,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    keys = sorted({k for row in rows for k in row}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    print(f"# {name}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}")
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"triton_kernels_{re.sub(r'[^A-Za-z0-9]+', '_', name)}_{meta['commit']}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {stem}.csv and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

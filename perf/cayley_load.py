"""``python -m perf.cayley_load``: the exact batched Cayley transform on a quiet and on a busy CPU.

Times ``gsops.cayley(K)`` forward + backward for 64 skew blocks of 32x32 (float32) with torch's
thread count, quiet and while one other process keeps a core busy, and the same with a plain
``torch.linalg.inv`` of ``I - K`` on every thread (what the transform ran on before it pinned its
LAPACK call to one thread). Prints median / 95th percentile / max in ms and writes
``perf/results/cayley_load_<device>_<commit>.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_SPIN = "import time\nt = time.time()\nwhile time.time() - t < {s}:\n    sum(range(10000))\n"


def _stats(ts):
    ts = sorted(ts)
    return {"median_ms": 1e3 * ts[len(ts) // 2], "p95_ms": 1e3 * ts[int(0.95 * (len(ts) - 1))], "max_ms": 1e3 * ts[-1]}


def _time(fn, reps):
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(blocks=64, b=32, reps=200, busy_seconds=30.0) -> list[dict]:
    import gsops

    g = torch.Generator().manual_seed(0)
    A = torch.randn(blocks, b, b, generator=g)
    K = (A - A.transpose(-1, -2)).requires_grad_()
    eye = torch.eye(b)

    def gsops_step():
        gsops.cayley(K).sum().backward()

    def inv_all_threads():
        torch.linalg.inv(eye - K.detach())

    rows = []
    for load in ("quiet", "one busy process"):
        spinner = None
        if load != "quiet":
            spinner = subprocess.Popen([sys.executable, "-c", _SPIN.format(s=busy_seconds)])
            time.sleep(0.5)
        try:
            for name, fn in (("gsops.cayley fwd+bwd", gsops_step), ("torch.linalg.inv (all threads)", inv_all_threads)):
                rows.append(dict(load=load, impl=name, threads=torch.get_num_threads(), shape=f"{blocks}x{b}x{b}",
                                 **_stats(_time(fn, reps))))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out-dir", default=str(ROOT / "perf" / "results"))
    opts = p.parse_args(argv)
    rows = measure(reps=opts.reps)
    for r in rows:
        print(f"{r['load']:18s} {r['impl']:32s} {r['shape']:10s} threads={r['threads']}  "
              f"median {r['median_ms']:8.3f}  p95 {r['p95_ms']:8.3f}  max {r['max_ms']:8.3f} ms")
    from .provenance import git_commit

    sha = git_commit().sha
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cayley_load_cpu_{sha}.json"
    path.write_text(json.dumps({"commit": sha, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()

"""torch.compile of gsops-adapted models: compiled == eager, graph breaks, and where they come from.

For every gsops method, a small MLP (64-128-128-16, float32) is adapted on all Linears, its
adapter parameters are moved off the identity, and

* ``torch._dynamo.explain`` reports the graph count, the graph-break count and each break's
  reason and source line (with gsops' finiteness scan on, the default, and off);
* ``torch.compile`` (inductor) runs forward + backward; outputs and gradients are compared
  with eager, and the median step time of both is measured.

Outputs a printed table and ``examples/results/compile_check.json``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/compile_check.py
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time

import torch
from torch import nn

import gsops

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "gsoft": dict(method="gsoft", block_size=8),
    "double_gsoft": dict(method="double_gsoft", block_size=8),
    "oft": dict(method="oft", block_size=8),
    "boft": dict(method="boft", block_size=8, n_factors=2),
    "sorsa": dict(method="sorsa", rank=4),
    "loldu": dict(method="loldu", rank=4),
}


def model_for(cfg):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16))
    gsops.apply_(m, gsops.AdapterConfig(**cfg), verbose=False)
    with torch.no_grad():
        for p in gsops.trainable_parameters(m):
            p.add_(0.05 * torch.randn_like(p))
    return m


def explain(m, x) -> dict:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(x)
    breaks = []
    for b in ex.break_reasons:
        fr = b.user_stack[-1] if b.user_stack else None
        where = f"{os.path.relpath(fr.filename, os.path.dirname(HERE))}:{fr.lineno}: {fr.line}" if fr else "?"
        breaks.append({"reason": str(b.reason).splitlines()[0][:160], "where": where})
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count, "breaks": breaks}


def step_time(fn, m, x, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x).square().mean().backward()
        ts.append(time.perf_counter() - t0)
        m.zero_grad(set_to_none=True)
    return 1e3 * statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="*", default=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    torch._logging.set_logs(dynamo=logging.ERROR)
    x = torch.randn(32, 64)
    rows = {}
    for name in args.methods:
        row = {}
        for finite in (True, False):
            gsops.set_check_finite(finite)
            row[f"explain_check_finite_{finite}"] = explain(model_for(CONFIGS[name]), x)
        gsops.set_check_finite(True)
        eager = model_for(CONFIGS[name])
        comp = copy.deepcopy(eager)
        torch._dynamo.reset()
        fn = torch.compile(comp)
        ye, yc = eager(x), fn(x)
        ye.square().mean().backward()
        yc.square().mean().backward()
        gdiff = max(float((pe.grad - pc.grad).abs().max()) for pe, pc in zip(eager.parameters(), comp.parameters())
                    if pe.requires_grad)
        row["max_abs_output_diff"] = float((ye - yc).detach().abs().max())
        row["max_abs_grad_diff"] = gdiff
        eager.zero_grad(set_to_none=True), comp.zero_grad(set_to_none=True)
        row["eager_ms"] = step_time(eager, eager, x, args.reps)
        row["compiled_ms"] = step_time(fn, comp, x, args.reps)
        rows[name] = row
        e1, e0 = row["explain_check_finite_True"], row["explain_check_finite_False"]
        print(f"{name:13s} graphs/breaks {e1['graphs']}/{e1['graph_breaks']} (finite scan off: "
              f"{e0['graphs']}/{e0['graph_breaks']})  |dy| {row['max_abs_output_diff']:.1e}  |dgrad| {gdiff:.1e}  "
              f"eager {row['eager_ms']:.1f} ms  compiled {row['compiled_ms']:.1f} ms", flush=True)
    where = sorted({b["where"] for r in rows.values() for k in r if k.startswith("explain")
                    for b in r[k]["breaks"]})
    print("\ngraph-break sites:\n  " + "\n  ".join(where))
    os.makedirs(args.out, exist_ok=True)
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=HERE).stdout.strip()
        except OSError:
            return None

    with open(os.path.join(args.out, "compile_check.json"), "w") as f:
        json.dump({"torch": torch.__version__, "gsops": gsops.__version__, "input": list(x.shape),
                   "git_commit": git("rev-parse", "--short", "HEAD"),
                   "uncommitted_gsops_changes": (git("status", "--porcelain", "--", "gsops") or "").splitlines(),
                   "model": "MLP 64-128-128-16, every Linear adapted", "break_sites": where, "methods": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()

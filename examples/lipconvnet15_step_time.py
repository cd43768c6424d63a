"""Time one LipConvnet-15 training step at 32x32x3 (100 classes): SOC vs the GS-SOC rows of Table 3.

The GS paper reports a 1.64x step speed-up of GS-SOC (4, -) over SOC on a V100.
Prints a table and writes ``examples/results/lipconvnet15_step_time_<device>.json``.

    .venv/bin/python examples/lipconvnet15_step_time.py --device cuda --batch-size 128
    OMP_NUM_THREADS=1 .venv/bin/python examples/lipconvnet15_step_time.py --device cpu --batch-size 8 --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F

import gsops
from gsops.models import LipConvnet

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [("soc", None), ("gssoc", (4, None)), ("gssoc", (4, 1)), ("gssoc", (4, 2)), ("gssoc", (4, 4))]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="all", help="'all' or comma list of indices into " + str(ROWS))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    results = []
    for conv, groups in rows:
        model = LipConvnet(15, 32, conv, groups or (4, None), num_classes=100).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        times = []
        for i in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        results.append({
            "conv": conv, "groups": "-" if groups is None else f"({groups[0]}, {groups[1] or '-'})",
            "params": sum(p.numel() for p in model.parameters()), "median_step_ms": 1e3 * times[len(times) // 2],
            "min_step_ms": 1e3 * times[0],
        })
        del model, opt
    base = results[0]["median_step_ms"] if results[0]["conv"] == "soc" else None
    print(f"{'conv':6s} {'groups':7s} {'params':>9s} {'median ms':>10s} {'speed-up':>9s}")
    for r in results:
        r["speedup_vs_soc"] = base / r["median_step_ms"] if base else None
        su = f"{r['speedup_vs_soc']:.2f}x" if base else "-"
        print(f"{r['conv']:6s} {r['groups']:7s} {r['params']:9d} {r['median_step_ms']:10.1f} {su:>9s}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        commit = "unknown"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"lipconvnet15_step_time_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "gsops": gsops.__version__, "git_commit": commit,
                   "args": vars(args), "input": "32x32x3, 100 classes, fwd+bwd+SGD step", "rows": results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

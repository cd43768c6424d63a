"""LipConvnet with SOC vs GS-SOC on scikit-learn's handwritten digits (no download), on CPU.

Trains the same small LipConvnet twice (``conv="soc"`` with MaxMin and
``conv="gssoc"`` with groups ``(4, -)`` and MaxMinPermuted, Section 7.3 of the
GS paper) and reports clean accuracy, certified accuracy at l2 radius
``eps = 36/255`` (the SOC/GS papers' CIFAR radius; images here are in [0, 1]
like CIFAR's, so no rescaling is needed) and the mean training-step time.
Outputs a printed table and ``examples/results/lipconvnet_digits.{csv,json,png}``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/lipconvnet_digits.py            # ~5 min on 1 shared core
    .venv/bin/python examples/lipconvnet_digits.py --epochs 2 --out /tmp/smoke  # quick smoke run
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F

import gsops
from gsops.models import LipConvnet

HERE = os.path.dirname(os.path.abspath(__file__))


def load_digits_32(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    n_test = len(y) // 4
    te, tr = idx[:n_test], idx[n_test:]
    mean = x[tr].mean(0, keepdim=True)  # centring is a translation: eps is unchanged
    return (x[tr] - mean, y[tr]), (x[te] - mean, y[te])


def margin_ce(logits, y, offset):
    """Cross-entropy with the true logit lowered by ``offset`` (pushes margins past sqrt(2) eps)."""
    return F.cross_entropy(logits - offset * F.one_hot(y, logits.shape[1]), y)


def evaluate(model, x, y, eps):
    model.eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    cert = gsops.certified_accuracy(model, x, y, eps, batch_size=256)
    model.train()
    return clean, cert


def train_one(conv, groups, args, train, test, eps):
    torch.manual_seed(args.seed)
    model = LipConvnet(args.depth, args.base_channels, conv, groups, num_classes=10, in_channels=1)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(train[1]) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    step_times, curve = [], []
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train[1]), generator=g)
        for s in range(0, len(perm), args.batch_size):
            b = perm[s:s + args.batch_size]
            t0 = time.perf_counter()
            loss = margin_ce(model(train[0][b]), train[1][b], args.offset)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            sched.step()
        clean, cert = evaluate(model, test[0], test[1], eps)
        curve.append({"epoch": epoch + 1, "loss": loss.item(), "clean": clean, "certified": cert})
        print(f"  {conv:5s} epoch {epoch + 1:2d}  loss {loss.item():.3f}  clean {clean:.3f}  certified {cert:.3f}",
              flush=True)
    warm = step_times[steps_per_epoch:] or step_times  # leave out the first epoch (warm-up)
    return {
        "conv": conv, "groups": "-" if conv == "soc" else f"({groups[0]}, {groups[1] or '-'})",
        "activation": "MaxMin" if conv == "soc" else "MaxMinPermuted", "params": n_params,
        "clean_acc": curve[-1]["clean"], "certified_acc": curve[-1]["certified"],
        "step_ms": 1e3 * sum(warm) / len(warm), "curve": curve,
    }


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--base-channels", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--offset", type=float, default=0.5, help="margin offset of the training loss")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    eps = 36 / 255
    train, test = load_digits_32(args.seed)
    print(f"digits: {len(train[1])} train / {len(test[1])} test, 1x32x32 in [0,1]; eps = 36/255 = {eps:.4f}; "
          f"LipConvnet-{args.depth}, base_channels={args.base_channels}, {args.epochs} epochs, "
          f"{args.threads} thread(s)")
    rows = [train_one("soc", (4, None), args, train, test, eps), train_one("gssoc", (4, None), args, train, test, eps)]
    speedup = rows[0]["step_ms"] / rows[1]["step_ms"]

    head = f"{'conv':6s} {'groups':7s} {'activation':15s} {'params':>8s} {'clean':>7s} {'certified':>10s} {'step ms':>8s}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['conv']:6s} {r['groups']:7s} {r['activation']:15s} {r['params']:8d} {r['clean_acc']:7.3f} "
              f"{r['certified_acc']:10.3f} {r['step_ms']:8.1f}")
    print(f"GS-SOC step speed-up over SOC: {speedup:.2f}x (CPU, {args.threads} thread(s))")

    os.makedirs(args.out, exist_ok=True)
    fields = ["conv", "groups", "activation", "params", "clean_acc", "certified_acc", "step_ms"]
    with open(os.path.join(args.out, "lipconvnet_digits.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})
    meta = {
        "dataset": "sklearn digits, bilinear 8x8 -> 32x32, [0,1], mean-centred", "eps": eps,
        "args": vars(args), "speedup_step": speedup, "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "gsops": gsops.__version__, "git_commit": git_commit(), "rows": rows,
    }
    with open(os.path.join(args.out, "lipconvnet_digits.json"), "w") as f:
        json.dump(meta, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in rows:
        ep = [c["epoch"] for c in r["curve"]]
        label = f"{r['conv'].upper()} {r['groups']}"
        ax[0].plot(ep, [c["clean"] for c in r["curve"]], marker="o", label=label)
        ax[1].plot(ep, [c["certified"] for c in r["curve"]], marker="o", label=label)
    ax[0].set(title="clean test accuracy", xlabel="epoch")
    ax[1].set(title=f"certified accuracy, eps=36/255", xlabel="epoch")
    for a in ax[:2]:
        a.grid(alpha=0.3)
        a.legend()
    names = [f"{r['conv'].upper()}\n{r['params'] / 1e3:.0f}k params" for r in rows]
    ax[2].bar(names, [r["step_ms"] for r in rows], color=["tab:blue", "tab:orange"])
    ax[2].set(title=f"train step time (CPU, batch {args.batch_size}), {speedup:.2f}x", ylabel="ms")
    fig.suptitle(f"LipConvnet-{args.depth} on sklearn digits (32x32): SOC vs GS-SOC (4, -)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lipconvnet_digits.png"), dpi=110)
    print(f"wrote {args.out}/lipconvnet_digits.csv, .json, .png")


if __name__ == "__main__":
    main()

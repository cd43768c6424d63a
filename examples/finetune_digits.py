"""Fine-tune a pre-trained digits classifier to rotated digits with every gsops method and PEFT LoRA/OFT/BOFT.

Data: scikit-learn's handwritten digits (8x8, shipped with the package, no download).
A random half of the images (upright) pre-trains an MLP 64-128-128-10. The other half
is rotated by 90 degrees (a domain shift the pre-trained model fails on) and split into
a fine-tuning set and a test set. Each method adapts all three Linear layers of the
frozen pre-trained model and trains for the same number of Adam steps on the same
batches; the table reports rotated-test accuracy (mean +- std over seeds), trainable
parameters, and median time per training step (forward + backward + optimizer, CPU).
Afterwards every adapter is merged into the weights, the plain merged MLP is written
(safetensors), read back into a fresh MLP, and its test accuracy is reported again.

Outputs: a printed table and ``examples/results/finetune_digits.{csv,json,png}``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/finetune_digits.py              # ~2 min on 1 core
    .venv/bin/python examples/finetune_digits.py --seeds 1 --steps 50 --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import sys
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gsops

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["fc1", "fc2", "fc3"]
BLOCK = 8      # Cayley block size of the orthogonal methods
RANK = 4       # rank of LoRA / SORSA / LoLDU


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def load_split(seed: int):
    """(pre-train upright), (fine-tune rotated), (test rotated), (test upright); pixels in [0, 1], centred."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, y = d.images / 16.0, d.target
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    half = len(y) // 2
    pre, rest = idx[:half], idx[half:]
    n_ft = int(0.6 * len(rest))
    ft, te = rest[:n_ft], rest[n_ft:]
    rot = np.rot90(images, k=1, axes=(1, 2))
    mean = images[pre].reshape(len(pre), -1).mean(0)

    def pack(imgs, ids):
        return (torch.tensor(imgs[ids].reshape(len(ids), -1) - mean, dtype=torch.float32),
                torch.tensor(y[ids], dtype=torch.long))

    return pack(images, pre), pack(rot, ft), pack(rot, te), pack(images, te)


def accuracy(model, data) -> float:
    X, y = data
    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def train(model, params, data, *, steps, batch, lr, seed, timed=False):
    X, y = data
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    times, losses = [], []
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(X), (batch,), generator=g)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses


def pretrain(data, seed):
    torch.manual_seed(seed)
    model = MLP()
    train(model, list(model.parameters()), data, steps=600, batch=64, lr=2e-3, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- methods
def gsops_method(method, targets=TARGETS, **kw):
    def build(base):
        m = copy.deepcopy(base)
        gsops.apply_(m, gsops.AdapterConfig(method=method, target_modules=list(targets), **kw),
                     verbose=False)
        return m

    def merged(model):
        gsops.merge_(model)
        # the merged weights live in each adapter's base layer: strip ".base_layer" to get a plain MLP's state
        return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                if ".base_layer." in k or not any(k.startswith(t + ".") for t in targets)}

    return build, merged


def peft_method(kind):
    def build(base):
        import peft

        if kind == "lora":
            cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, lora_dropout=0.0)
        elif kind == "oft":
            cfg = peft.OFTConfig(oft_block_size=BLOCK, r=0, target_modules=TARGETS)
        else:
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # perf/ beside examples/
            from perf import peft_boft

            peft_boft.enable_cpu_fbd()  # PEFT's BOFT keeps m = 2 factors on CPU only with this stand-in
            cfg = peft.BOFTConfig(boft_block_size=BLOCK, boft_n_butterfly_factor=2, target_modules=TARGETS,
                                  boft_dropout=0.0)
        m = peft.get_peft_model(copy.deepcopy(base), cfg)
        if kind == "boft":
            peft_boft.check_boft_factors(m, 2, block_size=BLOCK)
        return m

    def merged(model):
        return model.merge_and_unload().state_dict()

    return build, merged


def full_method():
    def build(base):
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    return build, lambda model: model.state_dict()


METHODS = {
    # name: (builder, merger, learning rate, note)
    "full fine-tune": (*full_method(), 1e-3, "all weights"),
    "gsops gsoft": (*gsops_method("gsoft", block_size=BLOCK), 1e-2, f"b={BLOCK}, m=2"),
    # Q_out of fc3 would be 10 x 10: block size 8 does not divide 10, so the head is left frozen
    "gsops double_gsoft": (*gsops_method("double_gsoft", targets=["fc1", "fc2"], block_size=BLOCK), 1e-2,
                           f"b={BLOCK}, Q_in and Q_out; fc1, fc2 only (8 does not divide fc3's 10 outputs)"),
    "gsops oft": (*gsops_method("oft", block_size=BLOCK), 1e-2, f"b={BLOCK}, m=1"),
    "gsops boft": (*gsops_method("boft", block_size=BLOCK, n_factors=2), 1e-2, f"b={BLOCK}, m=2"),
    "gsops sorsa": (*gsops_method("sorsa", rank=RANK), 1e-2, f"rank {RANK}"),
    # LoLDU trains only rank diagonal numbers + 1 scale per layer: rank 10 is the most fc3 (10 outputs) allows
    "gsops loldu": (*gsops_method("loldu", rank=10), 1e-1, "rank 10 (its maximum here), lr 0.1"),
    "peft lora": (*peft_method("lora"), 1e-2, f"rank {RANK}"),
    "peft oft": (*peft_method("oft"), 1e-2, f"b={BLOCK}, peft defaults"),
    "peft boft": (*peft_method("boft"), 1e-2, f"b={BLOCK}, m=2, torch fbd stand-in"),
}


def run(args):
    rows = {name: {"acc": [], "merged_acc": [], "merge_max_logit_diff": [], "step_ms": [], "loss": []}
            for name in METHODS}
    base_rows = {"upright": [], "rotated": []}
    params = {}
    for seed in range(args.seeds):
        pre, ft, te, upright_test = load_split(seed)
        base = pretrain(pre, seed)
        base_rows["upright"].append(accuracy(base, upright_test))
        base_rows["rotated"].append(accuracy(base, te))
        for name, (build, merged, lr, _) in METHODS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            torch.manual_seed(seed)
            model = build(base)
            trainable = [p for p in model.parameters() if p.requires_grad]
            params[name] = sum(p.numel() for p in trainable)
            times, losses = train(model, trainable, ft, steps=args.steps, batch=args.batch, lr=lr, seed=seed)
            acc = accuracy(model, te)
            with torch.no_grad():
                logits = model(te[0])
            state = merged(model)
            with tempfile.TemporaryDirectory() as tmp:
                from safetensors.torch import load_file, save_file

                path = os.path.join(tmp, "merged.safetensors")
                save_file({k: v.contiguous() for k, v in state.items()}, path)
                plain = MLP()
                plain.load_state_dict(load_file(path), strict=True)
            with torch.no_grad():
                diff = float((plain(te[0]) - logits).abs().max())
            r = rows[name]
            r["acc"].append(acc)
            r["merged_acc"].append(accuracy(plain, te))
            r["merge_max_logit_diff"].append(diff)
            r["step_ms"].append(1e3 * statistics.median(times[5:] if len(times) > 10 else times))
            r["loss"].append(losses)
            print(f"seed {seed} {name:20s} acc {acc:.4f} merged {r['merged_acc'][-1]:.4f} "
                  f"(max |logit diff| {diff:.2e}) {r['step_ms'][-1]:.2f} ms/step", flush=True)
    return rows, base_rows, params


def mean_std(v):
    return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)


def write(args, rows, base_rows, params):
    os.makedirs(args.out, exist_ok=True)
    table = []
    for name, r in rows.items():
        if not r["acc"]:
            continue
        m, s = mean_std(r["acc"])
        mm, _ = mean_std(r["merged_acc"])
        table.append({
            "method": name, "note": METHODS[name][3], "lr": METHODS[name][2], "trainable_params": params[name],
            "test_acc_mean": m, "test_acc_std": s, "merged_reloaded_acc_mean": mm,
            "merged_equals_adapted": all(a == b for a, b in zip(r["acc"], r["merged_acc"])),
            "merge_max_abs_logit_diff": max(r["merge_max_logit_diff"]),
            "step_ms_median": statistics.median(r["step_ms"]),
        })
    bu, br = mean_std(base_rows["upright"]), mean_std(base_rows["rotated"])
    header = (f"pre-trained MLP: upright test acc {bu[0]:.3f}, rotated test acc before fine-tuning "
              f"{br[0]:.3f} +- {br[1]:.3f}  ({args.seeds} seeds, {args.steps} steps, batch {args.batch})")
    print("\n" + header)
    fmt = "{:<20} {:>9} {:>15} {:>13} {:>10} {:>13}  {}"
    print(fmt.format("method", "trainable", "test acc", "merged+reload", "ms/step", "merge |dlogit|", "note"))
    for t in table:
        print(fmt.format(t["method"], f"{t['trainable_params']:,}",
                         f"{t['test_acc_mean']:.3f} +- {t['test_acc_std']:.3f}",
                         f"{t['merged_reloaded_acc_mean']:.3f}", f"{t['step_ms_median']:.2f}",
                         f"{t['merge_max_abs_logit_diff']:.1e}", t["note"]))
    stem = os.path.join(args.out, "finetune_digits")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    from _common import git_commit, pyplot_or_none, write_json  # examples/_common.py, beside this script

    commit = git_commit()
    meta = {
        "description": "MLP 64-128-128-10 pre-trained on upright digits, fine-tuned on 90-degree rotated digits",
        "base_upright_test_acc": bu, "base_rotated_acc_before_finetune": br, "seeds": args.seeds, "steps": args.steps,
        "batch": args.batch, "torch": torch.__version__, "gsops": gsops.__version__, "git_commit": commit,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": table,
    }
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        pass
    write_json(stem + ".json", meta)
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [t["method"] for t in table]
    colors = ["tab:blue" if n.startswith("gsops") else "tab:orange" if n.startswith("peft") else "tab:gray"
              for n in names]
    axes[0].barh(names, [t["test_acc_mean"] for t in table], xerr=[t["test_acc_std"] for t in table], color=colors)
    axes[0].axvline(br[0], color="k", ls="--", lw=1)
    axes[0].text(br[0] + 0.01, len(names) - 0.5, "before\nfine-tuning", fontsize=8, va="bottom")
    axes[0].set_xlabel("rotated-digits test accuracy")
    axes[0].invert_yaxis()
    axes[0].set_xlim(0, 1.05)
    for name, r in rows.items():
        if r["loss"]:
            curve = np.mean(np.array(r["loss"]), axis=0)
            k = max(1, len(curve) // 30)
            smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
            axes[1].plot(smooth, label=name, ls="-" if name.startswith("gsops") else "--",
                         lw=2.5 if name == "gsops boft" else 1.5)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (smoothed)")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7, title="gsops boft and peft boft overlap", title_fontsize=7)
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    print(f"wrote {stem}.csv/.json/.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of method names to run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    rows, base_rows, params = run(args)
    write(args, rows, base_rows, params)


if __name__ == "__main__":
    main()

"""A byte-level language model on Python's own standard library, adapted with GSOFT vs PEFT LoRA vs PEFT BOFT.

No download: the model is a tiny Hugging Face ``LlamaForCausalLM`` built from a config
(random init) and the text is the ``.py`` source of the standard library of the running
Python (``sysconfig.get_paths()["stdlib"]``), read as bytes (vocabulary 256).

1. "Pre-train" the model on the library's top-level modules (``<stdlib>/*.py``).
2. Freeze it and adapt it to a different code style, the library's own test suite
   (``<stdlib>/test/test_*.py``; held-out test files give the validation loss), with
   ``gsops.apply_`` (GSOFT; also gsops BOFT) on every attention and MLP Linear
   (``q/k/v/o_proj``, ``gate/up/down_proj``), and with PEFT LoRA and PEFT BOFT on the
   same layers. Every method sees the same batches.
3. Check that at step 0 every adapted model has the unadapted model's loss (all
   adapters start at the identity), and plot training / validation loss curves.

Outputs a printed table and ``examples/results/lm_stdlib.{csv,json,png}``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/lm_stdlib.py                 # a few minutes on 1 core
    .venv/bin/python examples/lm_stdlib.py --pretrain-steps 20 --steps 20 --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import copy
import csv
import glob
import os
import platform
import sys
import sysconfig
import time

import numpy as np
import torch
import torch.nn.functional as F

import gsops

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_REGEX = r".*\.(q|k|v|o|gate|up|down)_proj"  # one regex, re.fullmatch on the full name
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- data
def stdlib_files(pattern: str) -> list:
    root = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(root, pattern)))


def read_bytes(files, max_bytes: int) -> torch.Tensor:
    """Concatenated bytes of ``files`` (separated by a NUL) as a uint8 tensor, at most ``max_bytes``."""
    chunks, n = [], 0
    for f in files:
        with open(f, "rb") as fh:
            b = fh.read() + b"\0"
        chunks.append(b)
        n += len(b)
        if n >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    if len(data) < 1024:
        raise RuntimeError(f"only {len(data)} bytes of standard-library source found in {len(files)} files")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def corpora(max_bytes: int = 2_000_000):
    """(pre-train, adapt-train, adapt-validation) byte streams from the standard library."""
    pre = read_bytes(stdlib_files("*.py"), max_bytes)
    tests = stdlib_files(os.path.join("test", "test_*.py"))
    if len(tests) < 4:  # some distributions strip the test suite: fall back to a package of the library
        tests = stdlib_files(os.path.join("email", "*.py")) + stdlib_files(os.path.join("json", "*.py"))
    n_val = max(1, len(tests) // 10)
    val_files, train_files = tests[::len(tests) // n_val][:n_val], None
    train_files = [f for f in tests if f not in set(val_files)]
    return pre, read_bytes(train_files, max_bytes), read_bytes(val_files, max_bytes // 4)


def batch_at(data: torch.Tensor, g: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    start = torch.randint(len(data) - seq - 1, (batch,), generator=g)
    return torch.stack([data[s:s + seq + 1] for s in start.tolist()])


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------- model
def tiny_llama(hidden=64, layers=2, heads=4, intermediate=128, seq=128, seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=seq, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def pretrain(model, data, *, steps, batch, seq, lr, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, batch_at(data, g, batch, seq))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def adapt(base, method: str, block_size: int = 8, rank: int = 4):
    """A copy of ``base`` with the adapter ``method`` on every attention / MLP Linear."""
    m = copy.deepcopy(base)
    if method.startswith("gsops "):
        name = method.split()[1]
        kw = dict(rank=rank) if name in ("sorsa", "loldu") else dict(block_size=block_size)
        if name == "boft":
            kw["n_factors"] = 2
        gsops.apply_(m, gsops.AdapterConfig(method=name, target_modules=TARGET_REGEX, **kw), verbose=False)
        return m
    import peft

    if method == "peft lora":
        cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGETS, lora_dropout=0.0)
    elif method == "peft boft":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # perf/ beside examples/
        from perf import peft_boft

        peft_boft.enable_cpu_fbd()
        cfg = peft.BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=2, target_modules=PEFT_TARGETS,
                              boft_dropout=0.0)
    else:
        raise ValueError(f"method={method!r} unknown")
    m = peft.get_peft_model(m, cfg)
    if method == "peft boft":
        peft_boft.check_boft_factors(m, 2, block_size=block_size)
    return m


@torch.no_grad()
def eval_loss(model, batches) -> float:
    model.eval()
    return float(np.mean([lm_loss(model, b).item() for b in batches]))


def finetune(model, data, val_batches, *, steps, batch, seq, lr, seed, eval_every):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    train_losses, val, times = [], [(0, eval_loss(model, val_batches))], []
    for step in range(1, steps + 1):
        model.train()
        tokens = batch_at(data, g, batch, seq)
        t0 = time.perf_counter()
        loss = lm_loss(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        train_losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            val.append((step, eval_loss(model, val_batches)))
    return train_losses, val, times, sum(p.numel() for p in params)


# ---------------------------------------------------------------------------- main
METHODS = {"gsops gsoft": 1e-2, "gsops boft": 1e-2, "peft lora": 1e-2, "peft boft": 1e-2}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    pre, train_data, val_data = corpora()
    print(f"corpus: pre-train {len(pre):,} bytes (stdlib *.py), adapt {len(train_data):,} bytes "
          f"(stdlib test/test_*.py), validation {len(val_data):,} bytes (held-out test files)")
    base = tiny_llama(seq=args.seq + 1, seed=args.seed)
    t0 = time.perf_counter()
    pre_losses = pretrain(base, pre, steps=args.pretrain_steps, batch=args.batch, seq=args.seq, lr=3e-3,
                          seed=args.seed)
    print(f"pre-training: {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"loss {pre_losses[0] if pre_losses else float('nan'):.3f} -> {pre_losses[-1] if pre_losses else float('nan'):.3f}")
    gv = torch.Generator().manual_seed(12345)
    val_batches = [batch_at(val_data, gv, args.batch, args.seq) for _ in range(8)]
    probe = batch_at(train_data, torch.Generator().manual_seed(777), args.batch, args.seq)
    with torch.no_grad():
        base.eval()
        base_probe = lm_loss(base, probe).item()
    base_val = eval_loss(base, val_batches)

    results = {}
    for method in args.methods:
        model = adapt(base, method)
        model.eval()
        with torch.no_grad():
            step0 = lm_loss(model, probe).item()
        tr, val, times, n_params = finetune(model, train_data, val_batches, steps=args.steps, batch=args.batch,
                                            seq=args.seq, lr=METHODS.get(method, 1e-2), seed=args.seed,
                                            eval_every=args.eval_every)
        results[method] = {
            "trainable_params": n_params, "lr": METHODS.get(method, 1e-2),
            "step0_loss": step0, "base_loss": base_probe, "step0_abs_diff": abs(step0 - base_probe),
            "val_loss_start": val[0][1], "val_loss_end": val[-1][1], "train_loss_last25": float(np.mean(tr[-25:])),
            "step_ms_median": 1e3 * float(np.median(times)), "train_losses": tr, "val_losses": val,
        }
        r = results[method]
        print(f"{method:12s} params {n_params:>7,}  step-0 loss {step0:.6f} (base {base_probe:.6f}, "
              f"|diff| {r['step0_abs_diff']:.1e})  val {val[0][1]:.3f} -> {val[-1][1]:.3f}  "
              f"{r['step_ms_median']:.1f} ms/step", flush=True)

    if "gsops boft" in results and "peft boft" in results:
        # same algorithm (BOFT, b=8, m=2), same zero init, same batches: the curves must coincide
        a, b = (np.array(results[m]["train_losses"]) for m in ("gsops boft", "peft boft"))
        results["gsops boft"]["max_abs_train_loss_diff_vs_peft_boft"] = float(np.abs(a - b).max())
        print(f"gsops boft vs peft boft: max |train loss difference| over {len(a)} steps = {np.abs(a - b).max():.1e}")
    n_base = sum(p.numel() for p in base.parameters())
    print(f"\ntiny Llama ({n_base:,} parameters, byte-level), adapted {args.steps} steps, batch {args.batch}x{args.seq}")
    fmt = "{:<12} {:>9} {:>12} {:>10} {:>10} {:>10} {:>9}"
    print(fmt.format("method", "trainable", "step0 |diff|", "val start", "val end", "train end", "ms/step"))
    for m, r in results.items():
        print(fmt.format(m, f"{r['trainable_params']:,}", f"{r['step0_abs_diff']:.1e}", f"{r['val_loss_start']:.3f}",
                         f"{r['val_loss_end']:.3f}", f"{r['train_loss_last25']:.3f}", f"{r['step_ms_median']:.1f}"))

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "lm_stdlib")
    cols = ["trainable_params", "lr", "step0_loss", "base_loss", "step0_abs_diff", "val_loss_start", "val_loss_end",
            "train_loss_last25", "step_ms_median"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method"] + cols)
        for m, r in results.items():
            w.writerow([m] + [r[c] for c in cols])
    from _common import git_commit, pyplot_or_none, write_json  # examples/_common.py, beside this script

    commit = git_commit()
    import transformers

    meta = {"model": "LlamaForCausalLM hidden 64, 2 layers, 4 heads, MLP 128, vocab 256 (bytes)",
            "base_parameters": n_base, "pretrain_steps": args.pretrain_steps, "pretrain_loss": pre_losses[-1:],
            "base_val_loss": base_val, "steps": args.steps, "batch": args.batch, "seq": args.seq,
            "python_stdlib": sysconfig.get_paths()["stdlib"], "torch": torch.__version__,
            "transformers": transformers.__version__, "gsops": gsops.__version__, "git_commit": commit,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "methods": results}
    write_json(stem + ".json", meta)
    plt = pyplot_or_none()
    if plt is None:
        return results
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, r in results.items():
        tr = np.array(r["train_losses"])
        k = max(1, min(25, len(tr) // 5))
        style = dict(ls="--" if m.startswith("peft") else "-", lw=2.5 if m == "gsops boft" else 1.5)
        axes[0].plot(np.arange(k, len(tr) + 1), np.convolve(tr, np.ones(k) / k, mode="valid"), label=m, **style)
        s, v = zip(*r["val_losses"])
        axes[1].plot(s, v, marker="o", ms=3, label=m, **style)
    axes[1].axhline(base_val, color="k", ls="--", lw=1, label="unadapted model")
    axes[0].set_title(f"training loss (running mean of {k})")
    axes[1].set_title("validation loss (held-out stdlib test files)")
    for ax in axes:
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.legend()
    fig.suptitle("tiny byte-level Llama, pre-trained on stdlib modules, adapted to stdlib tests "
                 "(gsops BOFT and PEFT BOFT coincide: same algorithm, init and batches)", fontsize=10)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    print(f"wrote {stem}.csv/.json/.png")
    return results


if __name__ == "__main__":
    main()

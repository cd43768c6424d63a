"""Data-parallel adapter fine-tuning with PyTorch's own engines: DDP, or FSDP2 ``fully_shard``.

Fine-tunes a small MLP on scikit-learn's digits (no download) with a gsops adapter
(GSOFT by default) in ``world_size`` processes, each taking its own slice of every
global batch. Afterwards rank 0 repeats the same fine-tuning in ONE process with
the whole global batch and reports the largest parameter difference: data
parallelism must not change the result (up to floating-point reduction order).

CPU, 2 processes (gloo)::

    torchrun --nproc_per_node 2 examples/ddp_finetune.py               # DDP, then FSDP2
    torchrun --nproc_per_node 2 examples/ddp_finetune.py --engine ddp

Multi-GPU node (NCCL; one process per GPU)::

    torchrun --nproc_per_node 8 examples/ddp_finetune.py --backend nccl

The batch per process is ``--batch``; the global batch is ``batch * world_size``.
Writes ``--out`` (JSON) on rank 0 when given; exits with status 1 when the
parameters differ from the single-process run by more than ``--tol``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gsops


def load_digits_tensors(dtype=torch.float32):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=dtype)
    return X, torch.tensor(y, dtype=torch.long)


def make_model(seed: int, method: str, block_size: int, dtype=torch.float32) -> nn.Module:
    """A fixed 'pre-trained' MLP (deterministic from ``seed``) with a gsops adapter on both Linears."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    cfg = gsops.AdapterConfig(method=method, block_size=block_size) if method not in ("sorsa", "loldu") \
        else gsops.AdapterConfig(method=method, rank=block_size)
    gsops.apply_(model, cfg, verbose=False)
    return model


def batches(n_data: int, global_batch: int, steps: int, seed: int):
    """Index of every global batch: the same on every rank (a seeded permutation, reshuffled each epoch)."""
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < global_batch:
            order = torch.cat([order, torch.randperm(n_data, generator=g)])
        yield order[:global_batch]
        order = order[global_batch:]


def train(model, X, y, *, steps, global_batch, rank, world_size, lr, seed, device):
    params = gsops.trainable_parameters(model)
    opt = torch.optim.Adam(params, lr=lr)
    per = global_batch // world_size
    losses = []
    for idx in batches(len(X), global_batch, steps, seed):
        mine = idx[rank * per:(rank + 1) * per]
        xb, yb = X[mine].to(device), y[mine].to(device)
        loss = F.cross_entropy(model(xb), yb)  # mean over the local batch; DDP/FSDP average over ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def full_state(model) -> dict:
    """Adapter parameters by name, gathered to plain CPU tensors (FSDP2 DTensors included)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name.replace("module.", "", 1) if name.startswith("module.") else name] = t.cpu().double()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["ddp", "fsdp2", "both"], default="both")
    ap.add_argument("--backend", default=None, help="gloo (default on CPU) or nccl (default with CUDA)")
    ap.add_argument("--method", default="gsoft")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="batch per process")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--tol", type=float, default=None, help="max |param difference| allowed (default by dtype)")
    ap.add_argument("--out", default=None, help="JSON report written by rank 0")
    args = ap.parse_args(argv)

    use_cuda = torch.cuda.is_available() and (args.backend in (None, "nccl"))
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else (1e-5 if dtype == torch.float32 else 1e-10)

    X, y = load_digits_tensors(dtype)
    global_batch = args.batch * world
    engines = ["ddp", "fsdp2"] if args.engine == "both" else [args.engine]
    results, unavailable = {}, {}
    for engine in engines:
        if engine == "fsdp2":
            try:
                from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
            except ImportError as e:
                unavailable[engine] = f"torch {torch.__version__}: torch.distributed.fsdp.fully_shard missing ({e})"
                print(f"rank {rank}: skipping fsdp2: {unavailable[engine]}", file=sys.stderr)
                continue
        model = make_model(args.seed, args.method, args.block_size, dtype).to(device)
        if engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[local_rank] if use_cuda else None)
        else:
            from torch.distributed.fsdp import fully_shard

            for _, layer in gsops.adapters.adapter_layers(model):
                fully_shard(layer)  # one all-gather / reduce-scatter group per adapted layer
            wrapped = fully_shard(model)
        t0 = time.perf_counter()
        losses = train(wrapped, X, y, steps=args.steps, global_batch=global_batch, rank=rank, world_size=world,
                       lr=args.lr, seed=args.seed, device=device)
        results[engine] = (full_state(wrapped), losses, time.perf_counter() - t0)  # FSDP2: collective

    status = 0
    if rank == 0:
        ref = make_model(args.seed, args.method, args.block_size, dtype).to(device)
        t0 = time.perf_counter()
        ref_losses = train(ref, X, y, steps=args.steps, global_batch=global_batch, rank=0, world_size=1,
                           lr=args.lr, seed=args.seed, device=device)
        ref_seconds = time.perf_counter() - t0
        ref_state = full_state(ref)
        report = {
            "backend": backend, "world_size": world, "method": args.method, "block_size": args.block_size,
            "steps": args.steps, "batch_per_process": args.batch, "global_batch": global_batch,
            "dtype": args.dtype, "device": str(device), "tol": tol, "torch": torch.__version__,
            "single_process": {"loss_first_last": [ref_losses[0], ref_losses[-1]], "seconds": ref_seconds},
            "engines": {}, "unavailable": unavailable,
        }
        for engine, (state, losses, seconds) in results.items():
            assert set(ref_state) == set(state), (sorted(ref_state), sorted(state))
            diff = max(float((ref_state[k] - state[k]).abs().max()) for k in ref_state)
            change = max(float((ref_state[k] - init).abs().max()) for k, init in
                         full_state(make_model(args.seed, args.method, args.block_size, dtype)).items())
            report["engines"][engine] = {
                "max_abs_param_diff_vs_single_process": diff, "max_abs_param_change_from_init": change,
                "rank0_local_loss_first_last": [losses[0], losses[-1]], "seconds": seconds,
            }
            if not diff <= tol:
                print(f"FAIL {engine}: parameters differ by {diff:.3g} > tol={tol:.3g}", file=sys.stderr)
                status = 1
        print(json.dumps(report, indent=1))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    code = main()
    # The process group is destroyed and every result written: leave without the interpreter's
    # finalisation, during which gloo's worker threads can still abort the process
    # ("terminate called without an active exception", SIGABRT) after a successful run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

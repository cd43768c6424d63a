"""GS-SOC vs SOC in the harness: one LipConvnet-15-width layer and a whole LipConvnet-15 training step.

Rows: SOC and GS-SOC with groups (4, -), (4, 1), (4, 2) (Table 3 of the GS
paper), at CIFAR size (batch 32, 32x32x3 input, 100 classes), float32:

* ``layer``: one convolution of LipConvnet-15's first level (32 -> 32
  channels, 3x3, 32x32 pixels) and one of its fourth level (256 -> 256, 3x3,
  4x4), forward + backward with an input that requires grad (as inside the
  network), training mode (5-term series, one power-iteration step).
* ``step``: the whole LipConvnet-15 (base 32 channels): forward,
  cross-entropy, backward and an SGD step, with one power-iteration step per
  layer (the 50-iteration refresh that training does every 200 steps is
  left out: construction already ran it). Each model's first step is a
  warm-up and not timed.

Rows of a case are interleaved in rounds, so load drift hits them alike. Per
row: median and min time, speed-up = SOC median / row median measured in the
same run (goal: >= 2x at equal channels), trainable parameters, saved-activation
bytes of one forward (``saved_tensors_hooks``) and, on CUDA, the peak memory of
one step. ``python -m perf.harness`` runs this after its own rows
(``--no-soc`` leaves it out, ``--only soc`` runs only this); alone:
``python -m perf.soc``. Writes ``perf/results/soc_<device>_fp32_<commit>[_quick].{csv,json}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .timing import Step, median, peak_memory_bytes, saved_activation_bytes, trainable_parameters

ROWS = [("soc", None), ("gssoc", (4, None)), ("gssoc", (4, 1)), ("gssoc", (4, 2))]
GOAL = 2.0
# (name, channels, pixels): LipConvnet-15 convolutions (base 32) that keep their width
LAYERS = [("L15 level 1 conv 32ch 32x32", 32, 32), ("L15 level 4 conv 256ch 4x4", 256, 4)]
CSV_FIELDS = ["case", "conv", "groups", "batch", "time_ms", "time_ms_min", "n_samples", "speedup_vs_soc", "goal",
              "met", "trainable_params", "saved_act_bytes", "peak_mem_bytes"]


def _label(conv, groups):
    if conv == "soc":
        return "SOC"
    return f"GS-SOC ({groups[0]}, {groups[1] or '-'})"


def _layer(conv, groups, channels):
    import gsops

    if conv == "soc":
        return gsops.SOCConv2d(channels, 3, 1, out_channels=channels)
    return gsops.GSSOC(channels, 3, groups, out_channels=channels)


def _net(conv, groups, depth, base):
    import gsops
    from gsops.models import LipConvnet

    model = LipConvnet(depth, base, conv, groups or (4, None), num_classes=100)
    for m in model.modules():  # construction ran the 50-iteration power-iteration start: the warm-up
        if isinstance(m, gsops.SOCConv2d):  # step need not repeat it (every step here is an ordinary one)
            m.steps.fill_(1)
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NetStep:
    """One training step of a LipConvnet: forward, cross-entropy, backward, SGD."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.device = x.device

    def __call__(self):
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def timed(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self()
        _sync(self.device)
        return time.perf_counter() - t0

    def saved_bytes(self) -> int:
        persistent = {t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in persistent and st.data_ptr() != 0:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(self.model(self.x), self.y)
        del loss
        return int(sum(seen.values()))

    def peak(self):
        if self.device.type != "cuda":
            return None
        _sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self()
        _sync(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - before)


def _interleaved(steps, warmup, rounds, reps, progress):
    """Median/min seconds per step for each of ``steps``, warm-ups first, then ``rounds`` rounds of ``reps``."""
    for s in steps:
        for _ in range(warmup):
            s.timed()
    times = [[] for _ in steps]
    for r in range(rounds):
        for i, s in enumerate(steps):
            for _ in range(reps):
                times[i].append(s.timed())
            progress(f"round {r + 1}/{rounds} row {i + 1}/{len(steps)}")
    return [(median(t), min(t), len(t)) for t in times]


def _records(case, rows, steps, timing, batch, saved, peaks):
    out = []
    base = timing[0][0]
    for (conv, groups), s, (med, mn, n), sb, pk in zip(rows, steps, timing, saved, peaks):
        model = s.module if isinstance(s, Step) else s.model
        speed = base / med
        out.append(dict(case=case, conv=conv, groups="-" if groups is None else f"({groups[0]}, {groups[1] or '-'})",
                        label=_label(conv, groups), batch=batch, time_ms=1e3 * med, time_ms_min=1e3 * mn,
                        n_samples=n, speedup_vs_soc=speed, goal=GOAL if conv != "soc" else None,
                        met=(speed >= GOAL) if conv != "soc" else None,
                        trainable_params=trainable_parameters(model), saved_act_bytes=sb, peak_mem_bytes=pk))
    return out


def run(device=torch.device("cpu"), *, batch=32, depth=15, base=32, layers=LAYERS, step_rounds=2, layer_rounds=2,
        layer_reps=2, warmup=1, include_step=True, progress=None) -> list[dict]:
    """Time the rows; returns one record per (case, row). The sizes are parameters so tests can shrink them."""
    progress = progress or (lambda s: None)
    torch.manual_seed(0)
    records = []
    for name, channels, hw in layers:
        x = torch.randn(batch, channels, hw, hw, device=device)
        steps = [Step(_layer(c, g, channels).to(device).train(), x) for c, g in ROWS]
        timing = _interleaved(steps, warmup + 1, layer_rounds, layer_reps, lambda s, n=name: progress(f"{n}: {s}"))
        saved = [saved_activation_bytes(s) for s in steps]
        peaks = [peak_memory_bytes(s) for s in steps]
        records += _records(name, ROWS, steps, timing, batch, saved, peaks)
        del steps
    if include_step:
        name = f"LipConvnet-{depth} training step"
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 100, (batch,), device=device)
        steps = [NetStep(_net(c, g, depth, base).to(device).train(), x, y) for c, g in ROWS]
        timing = _interleaved(steps, warmup, step_rounds, 1, lambda s: progress(f"{name}: {s}"))
        saved = [s.saved_bytes() for s in steps]
        peaks = [s.peak() for s in steps]
        records += _records(name, ROWS, steps, timing, batch, saved, peaks)
        del steps
    return records


def _fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / 2 ** 20:.1f}M"


def format_table(records) -> str:
    lines = ["", "== GS-SOC vs SOC (fwd+bwd; speed-up = SOC time / row time, same run; goal >= "
             f"{GOAL:g}x at equal channels)"]
    head = f"{'case':34s} {'conv':16s} {'params':>10s} {'median ms':>10s} {'min ms':>9s} {'speed-up':>9s} " \
           f"{'goal':>10s} {'saved act':>10s} {'peak':>8s}"
    lines.append(head)
    for r in records:
        goal = "-" if r["met"] is None else ("MET" if r["met"] else "MISS") + f" {r['goal']:g}x"
        lines.append(f"{r['case']:34s} {r['label']:16s} {r['trainable_params']:10d} {r['time_ms']:10.1f} "
                     f"{r['time_ms_min']:9.1f} {r['speedup_vs_soc']:8.2f}x {goal:>10s} "
                     f"{_fmt_bytes(r['saved_act_bytes']):>10s} {_fmt_bytes(r['peak_mem_bytes']):>8s}")
    return "\n".join(lines)


def write(records, out_dir: Path, stem: str, meta: dict) -> dict:
    from .harness import write_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"soc_csv": out_dir / f"{stem}.csv", "soc_json": out_dir / f"{stem}.json"}
    write_csv(paths["soc_csv"], records, CSV_FIELDS)
    with open(paths["soc_json"], "w") as f:
        json.dump(dict(meta, rows=records), f, indent=1, default=str)
    return paths


# ----------------------------------------------------------------------------- the harness's hook and CLI
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-soc", dest="soc", action="store_false", help="leave out the GS-SOC vs SOC rows (perf/soc.py)")
    p.add_argument("--only", choices=["soc"], default=None, help="run only these rows (soc: GS-SOC vs SOC)")
    p.add_argument("--soc-rounds", type=int, default=None,
                   help="timed LipConvnet-15 steps per row (default 2, quick 1; one warm-up step before)")


def run_from_harness(opts, device: torch.device) -> dict:
    """Run, print and write the rows with the harness's options (``--quick``, ``--tiny``, ``--out-dir``, ...)."""
    from gsops.ops import dispatch

    from . import harness as H
    from .provenance import git_commit

    c = git_commit()
    commit, dirty = c.sha, c.dirty
    stem = f"soc_{H.device_tag(device)}_fp32_{commit}" + ("_quick" if getattr(opts, "quick", False) else "") + \
        ("_tiny" if getattr(opts, "tiny", False) else "")
    if getattr(opts, "threads", None):
        torch.set_num_threads(opts.threads)  # also under --only soc, which returns before the harness sets it
    load_start = H._loadavg()
    tiny = getattr(opts, "tiny", False)
    quick = getattr(opts, "quick", False)
    rounds = opts.soc_rounds or (1 if quick or tiny else 2)
    kw = dict(step_rounds=rounds, layer_rounds=1 if quick or tiny else 2, layer_reps=1 if tiny else 2)
    if tiny:  # smoke-test shapes
        kw.update(batch=2, depth=5, base=8, layers=[("tiny conv 8ch 8x8", 8, 8)])
    bar = None if getattr(opts, "quiet", False) else (lambda s: print(f"  soc: {s}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    records = run(device, progress=bar, **kw)
    meta = dict(command=" ".join(["python -m perf.harness"] + sys.argv[1:]), device=str(device),
                device_name=H.device_name(device), git_commit=commit, git_dirty=dirty, versions=H.versions(),
                load_average_start=load_start, load_average_end=H._loadavg(), created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                seconds=time.perf_counter() - t0, dtype="fp32", threads=torch.get_num_threads(),
                gsops_backend=dispatch.requested(), options=kw,
                timing="median of per-step wall times (device synchronised); rows interleaved in rounds",
                goal=f"GS-SOC >= {GOAL:g}x faster than SOC at equal channels")
    paths = write(records, Path(opts.out_dir), stem, meta)
    print(f"\nGS-SOC vs SOC: {meta['device_name']} ({device}), fp32, torch {torch.__version__}, "
          f"{meta['threads']} threads, commit {commit}{' (dirty)' if dirty else ''}, "
          f"load average {meta['load_average_start']} -> {meta['load_average_end']}, {meta['seconds']:.0f} s")
    print(format_table(records))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return dict(records=records, paths=paths)


def main(argv=None) -> dict:
    from . import harness

    return harness.main(["--only", "soc"] + list(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()

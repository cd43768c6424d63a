"""``python -m perf.harness``: one training step (forward + backward) of an adapted layer, per method.

Rows: the frozen base layer (the floor), full fine-tuning, PEFT LoRA / OFT /
BOFT (BOFT at its dense factor count and at m = 2), gsops GSOFT / Double GSOFT /
OFT / BOFT on every backend that runs on the device, SORSA and LoLDU; for
``nn.Linear`` at d in {768, 1024, 4096} and one ``nn.Conv2d`` case. Per row:
median fwd+bwd time (warm-up excluded; methods interleaved in rounds so drift
hits all rows alike), its ratio to the frozen base of the same case measured in
the same run, saved-activation bytes, CUDA peak memory, trainable parameters
and the density of Q. Also micro-benchmarks (:mod:`perf.micro`).

Writes ``perf/results/harness_<device>_<dtype>_<commit>[_quick].{csv,json,png}``
(+ ``micro_...csv``) and prints a table. Examples::

    python -m perf.harness                   # CPU fp32, full sizes
    python -m perf.harness --quick           # about a minute on a 2-core CPU
    python -m perf.harness --device cuda --dtype bf16,fp32
    python -m perf.harness --methods base,gsoft,peft_boft --sizes 1024
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import sys
import warnings
from pathlib import Path

import torch

from . import methods as M
from . import soc as SOC
from .provenance import git_commit
from .timing import Step, host_syncs, median, peak_memory_bytes, saved_activation_bytes, trainable_parameters

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


GSOPS_VARIANTS = {  # key -> (method, label)
    "gsoft_noscale": ("gsoft", "gsops GSOFT without scale s"),
    "oft_neumann": ("oft", "gsops OFT configured as PEFT OFT (Cayley-Neumann 5 terms, no scale)"),
}


def _gsops_rows() -> dict:
    """key -> (label, method) of the gsops rows: every method of ``gsops.methods.METHODS``, then its variants."""
    from gsops.methods import METHODS as REGISTRY

    rows = {}
    for name, spec in REGISTRY.items():
        label = f"gsops {spec.title}"
        if "rank" in spec.params:
            label += f" r={M.LORA_RANK}"
        elif spec.family == "orthogonal" and M.follows_n_factors(spec):
            label += " dense m"
        rows[name] = (label, name)
        rows.update({k: (lab, m) for k, (m, lab) in GSOPS_VARIANTS.items() if m == name})
    return rows


def _gsops_family(method: str) -> str:
    from gsops.methods import registry

    return registry.get(method).family


_GSOPS = _gsops_rows()
GSOPS_ORTHO = tuple(k for k, (_, m) in _GSOPS.items() if _gsops_family(m) == "orthogonal")  # one row per GS backend
# key -> (label, family)
METHODS = {
    "base": ("frozen base (floor)", "torch"),
    "full": ("full fine-tuning", "torch"),
    "lora": (f"PEFT LoRA r={M.LORA_RANK}", "peft"),
    "peft_oft": ("PEFT OFT", "peft"),
    "peft_boft": ("PEFT BOFT dense m", "peft"),
    "peft_boft_m2": ("PEFT BOFT m=2", "peft"),
    **{k: (label, "gsops") for k, (label, _) in _GSOPS.items()},
}
ALIASES = {
    "all": list(METHODS),
    "peft": ["lora", "peft_oft", "peft_boft", "peft_boft_m2"],
    "gsops": list(_GSOPS),
}
CSV_FIELDS = [
    "case", "kind", "d", "tokens", "method", "label", "backend", "impl", "note", "status", "block_size", "n_factors",
    "time_ms", "time_ms_min", "n_samples", "ratio_to_base", "saved_act_bytes", "peak_mem_bytes", "trainable_params",
    "density_q", "host_syncs", "layers",
]


# ----------------------------------------------------------------------------- options and environment
def parse_methods(spec) -> list[str]:
    items = []
    for part in (spec or ["all"]):
        items += [s for s in re.split(r"[,\s]+", part) if s]
    out = []
    for it in items:
        for k in ALIASES.get(it, [it]):
            if k not in METHODS:
                raise ValueError(f"--methods: unknown method {k!r}; choose from {list(METHODS)} or {list(ALIASES)}")
            if k not in out:
                out.append(k)
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    return "cpu"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "peft", "gsops", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - record why, never fail on a version lookup
            out[mod] = f"unavailable ({type(e).__name__})"
    out["cuda"] = torch.version.cuda
    return out


def gsops_backends(device: torch.device, unavailable: list | None = None) -> list[tuple[str, str]]:
    """(backend, reason) for every gsops backend that runs gs_apply on ``device``; the others go to ``unavailable``.

    Triton's CPU interpreter is never timed (it measures the interpreter, not a kernel).
    """
    from gsops import backends
    from gsops.ops import dispatch

    found = []
    for name in backends.NAMES:
        why = dispatch.why_not(name, ("gs_apply",), (torch.empty(0, device=device),))
        ok, reason = (True, backends.load(name)[1]) if why is None else (False, why)
        if ok and name == "triton" and device.type != "cuda":
            ok, reason = False, "only the Triton CPU interpreter runs here; its timings mean nothing"
        if ok:
            found.append((name, reason))
        elif unavailable is not None:
            unavailable.append((name, reason))
    return found


STACK_LAYERS, STACK_D, STACK_TOKENS = 24, 128, 64


def default_cases(device: torch.device, quick: bool, sizes, tokens, block: int, conv: bool) -> list[M.Case]:
    """Linear cases at each d (tokens sized to the device), many small layers, and one Conv2d case."""
    cuda = device.type == "cuda"
    if sizes is None:
        sizes = [1024] if quick else [768, 1024, 4096]
    cases = []
    for d in sizes:
        if tokens is not None:
            t = tokens
        elif cuda:
            t = 8 * 1024 if quick else 16 * 1024
        else:  # the CPU reference point: 8 x 512 tokens at d = 1024; fewer where d^2 grows
            t = 2048 if quick else (4096 if d <= 1024 else 1024)
        cases.append(M.Case("linear", d, t, M.block_size_for(d, block), (t, d)))
    # many small layers, few tokens: the fixed cost (Python, dispatch, tiny ops) of one adapted layer
    cases.append(M.Case("stack", STACK_D, STACK_TOKENS, M.block_size_for(STACK_D, block), (STACK_TOKENS, STACK_D),
                        layers=STACK_LAYERS))
    if conv:
        ch, hw, n = (128, 16, 8) if not cuda else (256, 32, 32)
        if quick and not cuda:
            ch, n = 64, 4
        d = ch * 9
        cases.append(M.Case("conv", d, n * hw * hw, M.block_size_for(d, block), (n, ch, hw, hw),
                            conv=dict(in_channels=ch, out_channels=ch, kernel=3, padding=1)))
    return cases


def tiny_cases() -> list[M.Case]:
    """Seconds-long shapes for the smoke test."""
    return [
        M.Case("linear", 16, 8, 4, (8, 16)),
        M.Case("stack", 16, 8, 4, (8, 16), layers=3),
        M.Case("conv", 36, 2 * 4 * 4, 18, (2, 4, 4, 4), conv=dict(in_channels=4, out_channels=4, kernel=3, padding=1)),
    ]


# ----------------------------------------------------------------------------- one case
@dataclasses.dataclass
class Row:
    case: M.Case
    method: str
    label: str
    backend: str
    builder: object
    status: str = "ok"
    built: M.Built | None = None
    step: Step | None = None
    samples: list = dataclasses.field(default_factory=list)
    reps: int = 1
    saved: int | None = None
    peak: int | None = None
    params: int | None = None
    density: float | None = None
    syncs: int | None = None

    @property
    def key(self) -> str:
        return self.method if self.backend in ("", "-") else f"{self.method}[{self.backend}]"


def plan_rows(case: M.Case, method_keys, backends) -> list[Row]:
    rows = []
    for key in ["base"] + [k for k in method_keys if k != "base"]:
        label, family = METHODS[key]
        if key == "base":
            rows.append(Row(case, key, label, "-", M.build_base))
        elif key == "full":
            rows.append(Row(case, key, label, "-", M.build_full))
        elif key == "lora":
            rows.append(Row(case, key, label, "-", M.build_lora))
        elif key == "peft_oft":
            rows.append(Row(case, key, label, "-", M.build_peft_oft))
        elif key in ("peft_boft", "peft_boft_m2"):
            variant = "dense" if key == "peft_boft" else "m2"
            rows.append(Row(case, key, label, "-", functools.partial(M.build_peft_boft, variant=variant)))
        elif key in GSOPS_ORTHO:
            for be, _ in backends:
                rows.append(Row(case, key, label, be, functools.partial(M.build_gsops, method=key, backend=be)))
        else:  # the low-rank methods (sorsa, loldu): plain matmuls, no GS kernel
            rows.append(Row(case, key, label, "-", functools.partial(M.build_gsops, method=key, backend="torch")))
    return rows


def _backend_ctx(row: Row):
    import contextlib

    if row.backend in ("", "-"):
        return contextlib.nullcontext()
    import gsops

    return gsops.use_backend(row.backend)


def make_input(case: M.Case, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(case.input_shape, generator=g).to(device=device, dtype=dtype)


def run_case(case, method_keys, backends, device, dtype, opts, bar) -> list[Row]:
    rows = plan_rows(case, method_keys, backends)
    torch.manual_seed(0)
    base = case.make_base(device, dtype)
    x = make_input(case, device, dtype)
    rate = None  # FLOP/s of this device on the base layer's GEMMs, to estimate slow rows before building them
    for row in rows:
        bar.set_postfix_str(f"{case.name}: build {row.key}"[:60])
        if row.method in ("peft_boft", "peft_boft_m2") and rate is not None:
            est = M.peft_boft_step_flops(case, "dense" if row.method == "peft_boft" else "m2") / rate
            if est > opts.max_step_seconds:
                row.status = (f"skipped: estimated {est:.0f} s per step (> --max-step-seconds "
                              f"{opts.max_step_seconds:g}); PEFT BOFT builds dense d x d factors")
                bar.update(opts.rounds + 1)
                continue
        why = M.gsops_unfit(base, case, _GSOPS[row.method][1]) if row.method in GSOPS_ORTHO else None
        if why:  # the method's own rule (its registry entry): the case's block size does not fit its layer
            row.status = f"n/a: {why}"
            bar.update(opts.rounds + 1)
            continue
        try:
            with _backend_ctx(row):
                row.built = row.builder(base, case, rank=opts.rank)
                row.step = Step(row.built.module, x)
                for _ in range(opts.warmup):
                    row.step()
                probe = row.step.timed()
        except ImportError:
            raise  # a missing baseline package is an error of the run, never a dropped row
        except Exception as e:  # noqa: BLE001 - recorded in the row, shown in the table
            row.status = f"error: {type(e).__name__}: {e}"
            row.built = row.step = None
            bar.update(opts.rounds + 1)
            continue
        if row.method == "base":
            base_flops = 2 * 2 * case.tokens * case.d * _d_out(case) * case.base_layers
            rate = base_flops / max(probe, 1e-9)
        row.reps = int(max(1, min(opts.max_reps, round(opts.row_seconds / opts.rounds / max(probe, 1e-9)))))
        bar.update(1)
    live = [r for r in rows if r.step is not None]
    for rnd in range(opts.rounds):
        for row in live:
            bar.set_postfix_str(f"{case.name}: round {rnd + 1}/{opts.rounds} {row.key}"[:60])
            with _backend_ctx(row):
                for _ in range(row.reps):
                    row.samples.append(row.step.timed())
            bar.update(1)
    for row in live:
        with _backend_ctx(row):
            row.saved = saved_activation_bytes(row.step)
            row.peak = peak_memory_bytes(row.step)
            row.params = trainable_parameters(row.built.module)
            row.syncs = host_syncs(row.step)
            if row.built.orthogonal and opts.density:
                try:
                    row.density = M.density_of_q(row.builder, case, device=device, rank=opts.rank)
                except Exception as e:  # noqa: BLE001
                    row.built.note = (row.built.note + f"; density failed: {type(e).__name__}: {e}").strip("; ")
        row.step = None  # free activations before the next case
    return rows


def _d_out(case: M.Case) -> int:
    return case.conv["out_channels"] if case.kind == "conv" else case.d


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    out = []
    base_t = {}
    for r in rows:
        if r.method == "base" and r.samples:
            base_t[r.case.name] = median(r.samples)
    for r in rows:
        t = median(r.samples) if r.samples else None
        bt = base_t.get(r.case.name)
        b = r.built
        out.append({
            "case": r.case.name, "kind": r.case.kind, "d": r.case.d, "tokens": r.case.tokens,
            "method": r.key, "label": r.label, "backend": r.backend,
            "impl": b.impl if b else "", "note": b.note if b else "", "status": r.status,
            "block_size": (b.block_size if b else None), "n_factors": (b.n_factors if b else None),
            "time_ms": None if t is None else 1e3 * t,
            "time_ms_min": min(r.samples) * 1e3 if r.samples else None,
            "n_samples": len(r.samples),
            "ratio_to_base": (t / bt) if (t is not None and bt) else None,
            "saved_act_bytes": r.saved, "peak_mem_bytes": r.peak, "trainable_params": r.params,
            "density_q": r.density, "host_syncs": r.syncs, "layers": r.case.base_layers,
        })
    return out


# ----------------------------------------------------------------------------- targets, table, files
def targets(records: list[dict], d: int = 1024) -> list[dict]:
    """The CPU targets at the Linear case with ``d`` and at the many-small-layers case (measured, never asserted)."""
    out = []
    for kind in ("linear", "stack"):
        case = [r for r in records if r["kind"] == kind and r["status"] == "ok" and (kind == "stack" or r["d"] == d)]
        if not case:
            continue
        where = "" if kind == "linear" else f" ({case[0]['case']})"

        def get(method):
            return next((r for r in case if r["method"] == method), None)

        gs_rows = [r for r in case if r["method"].startswith(("gsoft[", "gsoft_noscale["))]
        boft, peft_oft = get("peft_boft"), get("peft_oft")
        for g in gs_rows:
            out.append(dict(target=f"{g['method']} fwd+bwd <= 1.3x frozen{where}", value=g["ratio_to_base"],
                            limit=1.3, met=g["ratio_to_base"] <= 1.3))
            if boft and kind == "linear":
                sp = boft["time_ms"] / g["time_ms"]
                out.append(dict(target=f"{g['method']} >= 6x faster than PEFT BOFT m={boft['n_factors']} (both dense)",
                                value=sp, limit=6.0, met=sp >= 6.0))
            if peft_oft and peft_oft["saved_act_bytes"] is not None and kind == "linear":
                out.append(dict(target=f"{g['method']} saved activations <= PEFT OFT's",
                                value=g["saved_act_bytes"] / max(peft_oft["saved_act_bytes"], 1), limit=1.0,
                                met=g["saved_act_bytes"] <= peft_oft["saved_act_bytes"],
                                detail=f"{g['saved_act_bytes']:,} B vs {peft_oft['saved_act_bytes']:,} B "
                                       f"({g['saved_act_bytes'] - peft_oft['saved_act_bytes']:+,} B)"))
        if peft_oft:
            for o in [r for r in case if r["method"].startswith(("oft[", "oft_neumann["))]:
                ratio = o["time_ms"] / peft_oft["time_ms"]
                out.append(dict(target=f"{o['method']} time <= PEFT OFT's{where}", value=ratio, limit=1.0,
                                met=ratio <= 1.0))
        for r in case:
            if r["impl"].startswith("gsops") and r.get("host_syncs") is not None:
                out.append(dict(target=f"{r['method']} host syncs per step == 0{where}", value=r["host_syncs"],
                                limit=0, met=r["host_syncs"] == 0))
    return out


def _fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}"


def format_table(records: list[dict], cuda: bool) -> str:
    hdr = ["method", "impl / note", "b", "m", "ms (median)", "x base", "saved MiB"]
    if cuda:
        hdr.append("peak MiB")
    hdr += ["params", "density", "syncs"]
    lines = []
    by_case: dict[str, list] = {}
    for r in records:
        by_case.setdefault(r["case"], []).append(r)
    for case, rs in by_case.items():
        body = []
        for r in rs:
            impl = r["impl"] + (f" ({r['note']})" if r["note"] else "")
            if r["status"] != "ok":
                body.append([r["method"], r["status"][:90]] + [""] * (len(hdr) - 2))
                continue
            row = [r["method"], impl, str(r["block_size"] or "-"), str(r["n_factors"] or "-"),
                   f"{r['time_ms']:.2f}", f"{r['ratio_to_base']:.2f}", _fmt_bytes(r["saved_act_bytes"])]
            if cuda:
                row.append(_fmt_bytes(r["peak_mem_bytes"]))
            row += [f"{r['trainable_params']:,}", "-" if r["density_q"] is None else f"{r['density_q']:.3f}",
                    "-" if r.get("host_syncs") is None else str(r["host_syncs"])]
            body.append(row)
        widths = [max(len(h), *(len(b[i]) for b in body if len(b) > i)) for i, h in enumerate(hdr)]
        widths[1] = min(widths[1], 60)
        lines.append(f"\n== {case}")
        lines.append("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for b in body:
            if len(b) == 2 or (b[2] == "" and b[1]):
                lines.append(f"{b[0].ljust(widths[0])}  {b[1]}")
            else:
                lines.append("  ".join(c[:w].ljust(w) if i == 1 else c.rjust(w) if i >= 4 else c.ljust(w)
                                       for i, (c, w) in enumerate(zip(b, widths))))
    return "\n".join(lines)


def format_micro(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["\n== micro-benchmarks"]
    for r in rows:
        extra = f"  {r['gbps']:.2f} GB/s ({100 * r['copy_fraction']:.0f}% of copy)" if "gbps" in r else ""
        extra += f"  [{r['note']}]" if r.get("note") else ""
        lines.append(f"{r['benchmark']:15s} {r['shape']:26s} {r['impl']:20s} {r['ms']:9.3f} ms{extra}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for r in records:
        if r["kind"] == "linear" and r["status"] == "ok" and r["ratio_to_base"] is not None:
            series.setdefault(r["method"], []).append((r["d"], r["ratio_to_base"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab20")
    markers = "osD^vP*Xh<>p"
    for i, (name, pts) in enumerate(series.items()):
        pts.sort()
        style = "--" if METHODS.get(name.split("[")[0], ("", ""))[1] == "peft" else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=markers[i % len(markers)],
                color=cmap(i % 20), label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(1.3, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ds = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("d (features)")
    ax.set_ylabel("fwd+bwd time / frozen base")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_csv(path: Path, records, fields) -> None:
    """``records`` (dicts) as CSV rows of the columns ``fields``; a missing or None value is an empty cell."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def write_outputs(out_dir: Path, stem: str, records, micro, meta) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json"}
    write_csv(paths["csv"], records, CSV_FIELDS)
    if micro:
        paths["micro_csv"] = out_dir / f"micro_{stem.split('_', 1)[1]}.csv"
        keys = ["benchmark", "shape", "impl", "ms", "reps", "gbps", "copy_fraction", "note"]
        write_csv(paths["micro_csv"], micro, keys)
    doc = dict(meta, rows=records, micro=micro, targets=targets(records))
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return paths


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.harness", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about a minute on a 2-core CPU: d=1024 + conv, fewer repeats")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 | fp64, comma list (default fp32)")
    p.add_argument("--methods", nargs="*", default=None,
                   help=f"methods or groups (default all): {', '.join(METHODS)}; groups {', '.join(ALIASES)}")
    p.add_argument("--sizes", default=None, help="comma list of d for the Linear cases (default 768,1024,4096)")
    p.add_argument("--tokens", type=int, default=None, help="rows per step for every Linear case (default: per device)")
    p.add_argument("--block-size", type=int, default=32, help="smallest block size (adjusted per d, see methods.py)")
    p.add_argument("--rank", type=int, default=M.LORA_RANK, help="rank of LoRA, SORSA, LoLDU")
    p.add_argument("--no-conv", dest="conv", action="store_false", help="leave out the Conv2d case")
    p.add_argument("--no-micro", dest="micro", action="store_false", help="leave out the micro-benchmarks")
    p.add_argument("--no-density", dest="density", action="store_false", help="do not compute the density of Q")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds over the methods (default 6, 3 with --quick)")
    p.add_argument("--row-seconds", type=float, default=None, help="target timing seconds per row (default 4, quick 1)")
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row before timing (default 2, quick 1)")
    p.add_argument("--max-step-seconds", type=float, default=None,
                   help="skip (and say so) PEFT BOFT rows estimated slower than this per step (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out-dir", default=str(ROOT / "perf" / "results"))
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test shapes
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--replot", metavar="JSON", default=None, help="only redraw the PNG of a saved results JSON")
    SOC.add_args(p)  # --no-soc, --only soc, --soc-rounds
    return p


def main(argv=None) -> dict:
    opts = build_parser().parse_args(argv)
    if opts.replot:
        src = Path(opts.replot)
        doc = json.loads(src.read_text())
        png = src.with_suffix(".png")
        plot(doc["rows"], png, f"{src.stem}  ({doc.get('device_name', '?')}, {doc.get('threads', '?')} threads)")
        print(f"wrote {png}")
        return {}
    method_keys = parse_methods(opts.methods)
    if any(METHODS[k][1] == "peft" for k in method_keys):
        M._require_peft()  # fail before timing anything
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {opts.device}: torch {torch.__version__} sees no CUDA device")
    if opts.only == "soc":
        return {"soc": SOC.run_from_harness(opts, device)}
    dtype_names = [s for s in re.split(r"[,\s]+", opts.dtype or "fp32") if s]
    for n in dtype_names:
        if n not in DTYPES:
            raise SystemExit(f"--dtype {n!r} must be one of {list(DTYPES)}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.rounds = opts.rounds or (3 if opts.quick else 6)
    if opts.warmup is None:
        opts.warmup = 1 if opts.quick else 2
    opts.row_seconds = opts.row_seconds if opts.row_seconds is not None else (1.0 if opts.quick else 4.0)
    opts.max_step_seconds = opts.max_step_seconds or 30.0
    if opts.tiny:
        opts.warmup, opts.row_seconds, opts.rank = 1, 0.0, 2
    sizes = [int(s) for s in opts.sizes.split(",")] if opts.sizes else None
    cases = tiny_cases() if opts.tiny else default_cases(device, opts.quick, sizes, opts.tokens, opts.block_size,
                                                         opts.conv)
    if opts.tiny and not opts.conv:
        cases = [c for c in cases if c.kind != "conv"]
    not_run: list = []
    backends = gsops_backends(device, not_run)
    c = git_commit()
    commit, dirty = c.sha, c.dirty
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    results = {}
    load_start = _loadavg()
    for dname in dtype_names:
        dtype = DTYPES[dname]
        n_rows = sum(len(plan_rows(c, method_keys, backends)) for c in cases)
        total = n_rows * (opts.rounds + 1)
        bar = tqdm(total=total, desc=f"perf {device.type} {dname}", disable=opts.quiet or tqdm is None,
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5) if tqdm else _NoBar()
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's and gsops' one-off notices would break the bar
            for case in cases:
                rows += run_case(case, method_keys, backends, device, dtype, opts, bar)
        bar.close()
        records = rows_to_dicts(rows)
        micro = []
        if opts.micro:
            micro = run_micro_safe(device, dtype, opts)
        stem = f"harness_{device_tag(device)}_{dname}_{commit}" + ("_quick" if opts.quick else "") + \
            ("_tiny" if opts.tiny else "")
        meta = dict(
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(["python -m perf.harness"] + list(argv if argv is not None else sys.argv[1:])),
            load_average_start=load_start, load_average_end=_loadavg(),
            device=str(device), device_name=device_name(device), dtype=dname, git_commit=commit,
            git_dirty=dirty, versions=versions(), threads=torch.get_num_threads(),
            gsops_backends=[dict(name=n, reason=r) for n, r in backends],
            gsops_backends_not_run=[dict(name=n, reason=r) for n, r in not_run], quick=opts.quick,
            cases=[dict(name=c.name, kind=c.kind, d=c.d, tokens=c.tokens, block_size=c.block_size,
                        input_shape=list(c.input_shape), conv=c.conv) for c in cases],
            timing=dict(rounds=opts.rounds, warmup=opts.warmup, row_seconds=opts.row_seconds,
                        statistic="median of per-step wall times, device synchronised"),
            columns=dict(
                saved_act_bytes="distinct storages saved for backward in one forward (saved_tensors_hooks), "
                                "parameters and buffers excluded",
                peak_mem_bytes="CUDA only: peak allocated during one step above what was allocated before it",
                density_q="fraction of nonzeros of the dense Q (Double GSOFT: of Q_out Q_in)",
                ratio_to_base="median time / median time of the frozen base of the same case, same run"),
        )
        paths = write_outputs(Path(opts.out_dir), stem, records, micro, meta)
        if opts.plot:
            png = Path(opts.out_dir) / f"{stem}.png"
            if plot(records, png, f"{stem}  ({device_name(device)}, {torch.get_num_threads()} threads)"):
                paths["png"] = png
        print(f"\nperf harness: {device_name(device)} ({device}), {dname}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, commit {commit}{' (dirty)' if dirty else ''}, "
              f"load average {meta['load_average_start']} -> {meta['load_average_end']}")
        print(format_table(records, device.type == "cuda"))
        for n, r in not_run:
            print(f"gsops backend {n}: not run here ({r})")
        print(format_micro(micro))
        tg = targets(records)
        if tg:
            print("\n== targets (d=1024 and the many-small-layers case)")
            for t in tg:
                detail = f"; {t['detail']}" if t.get("detail") else ""
                print(f"{'MET ' if t['met'] else 'MISS'}  {t['target']}: {t['value']:.4g} (limit {t['limit']:g}{detail})")
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
        results[dname] = dict(records=records, micro=micro, paths=paths)
    if opts.soc:
        results["soc"] = SOC.run_from_harness(opts, device)  # GS-SOC vs SOC rows (perf/soc.py)
    return results


def _loadavg():
    """1-minute load average (other processes compete for the CPU: a figure to read timings by), or None."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_micro_safe(device, dtype, opts) -> list[dict]:
    from .micro import run_micro

    sizes = None
    if opts.tiny:
        sizes = {"cayley": [(4, 4)], "gs_apply": [(8, 16, 4)]}
    try:
        return run_micro(device, dtype, quick=opts.quick or opts.tiny, sizes=sizes)
    except Exception as e:  # noqa: BLE001
        return [dict(benchmark="micro", shape="-", impl=f"error: {type(e).__name__}: {e}", ms=float("nan"), reps=0)]


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


if __name__ == "__main__":
    main()

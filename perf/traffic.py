"""Memory-traffic simulation of the Triton kernels (and, with ``--backend cuda``, the CUDA kernels under the
CPU CUDA emulator: :func:`measure` with ``backend="cuda"``, see ``perf/README.md``) on the CPU
(``python -m perf.traffic``).

Every Triton kernel runs under the interpreter (``TRITON_INTERPRET=1``) with the
interpreter's loads and stores counted.  One access is one ``tl.load`` /
``tl.store`` of one program; it touches the set of 32-byte sectors that hold its
unmasked elements, and moves ``unmasked elements x element size`` bytes.  There is
no reuse between accesses (no cache model): a strided access that reads one 2-byte
element per sector costs a whole sector, which is what a GPU's DRAM does when the
line is not hit again soon.  Accesses are split by the role of the pointer they go
through: activations (the kernel arguments named in :data:`ACTIVATION_ARGS`: the
tokens' features and any per-token scratch) and weights (blocks, block gradients,
everything else).

The figures are compared with the minimum of an op over ``N`` tokens of ``d``
features (``T = N d`` element bytes; SPEC "What a GS apply must move"): a forward
reads ``x`` and writes ``y`` (``2T``), a backward reads ``x`` and ``dy`` and writes
``dx`` (``3T``); the minimal sector count is the same bytes in whole sectors.  The
ratio is per token, so a handful of tokens suffices.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import types
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gsops.flags import env_flag  # noqa: E402

SECTOR = 32
ACTIVATION_ARGS = frozenset({"x_ptr", "y_ptr", "g_ptr", "dx_ptr", "dy_ptr", "z_ptr", "out_ptr_act", "scratch_ptr"})


@dataclass
class Access:
    kernel: str
    arg: str
    kind: str       # "load" or "store"
    activation: bool
    sectors: int
    bytes: int


@dataclass
class Traffic:
    accesses: list = field(default_factory=list)
    launches: list = field(default_factory=list)  # kernel names, in launch order

    def total(self, activation: bool | None = True, kind: str | None = None) -> tuple[int, int]:
        """(sectors, bytes) of the accesses of a role (None: all) and kind (None: both)."""
        sel = [a for a in self.accesses if (activation is None or a.activation == activation)
               and (kind is None or a.kind == kind)]
        return sum(a.sectors for a in sel), sum(a.bytes for a in sel)


class _Current:
    traffic: Traffic | None = None
    ranges: list = []  # (start, end, arg name) of the running launch's tensor arguments
    kernel: str = ""


def _arg_of(addr: int) -> str:
    for start, end, name in _Current.ranges:
        if start <= addr < end:
            return name
    return "?"


def _record(kind: str, ptrs, mask) -> None:
    tr = _Current.traffic
    if tr is None:
        return
    addrs = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        addrs = addrs[m]
    else:
        addrs = addrs.reshape(-1)
    if addrs.size == 0:
        return
    esize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    arg = _arg_of(int(addrs[0]))  # an access goes through one pointer argument
    sectors = int(np.unique(addrs // np.uint64(SECTOR)).size)
    tr.accesses.append(Access(_Current.kernel, arg, kind, arg in ACTIVATION_ARGS, sectors, int(addrs.size) * esize))


@contextlib.contextmanager
def count():
    """Count the loads and stores of every interpreted Triton launch inside the block.

    Yields a :class:`Traffic`. Needs ``TRITON_INTERPRET=1`` before Triton kernels are first defined.
    """
    from triton.runtime import interpreter as itp

    if not env_flag("TRITON_INTERPRET", False):
        raise RuntimeError("perf.traffic counts interpreted launches: set TRITON_INTERPRET=1 before importing triton")
    B = itp.InterpreterBuilder
    orig_load, orig_store, orig_call = B.create_masked_load, B.create_masked_store, itp.GridExecutor.__call__

    def load(self, ptrs, mask, other, *a, **k):
        _record("load", ptrs, mask)
        return orig_load(self, ptrs, mask, other, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        _record("store", ptrs, mask)
        return orig_store(self, ptrs, value, mask, *a, **k)

    def call(self, *args, **kwargs):
        sig = inspect.signature(self.fn)
        bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        ranges = []
        for name, v in bound.arguments.items():
            if isinstance(v, torch.Tensor):
                st = v.untyped_storage()
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes(), name))
        prev = (_Current.ranges, _Current.kernel)
        _Current.ranges, _Current.kernel = ranges, self.fn.__name__
        _Current.traffic.launches.append(self.fn.__name__)
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _Current.ranges, _Current.kernel = prev

    tr = Traffic()
    _Current.traffic = tr
    B.create_masked_load, B.create_masked_store, itp.GridExecutor.__call__ = load, store, call
    try:
        yield tr
    finally:
        B.create_masked_load, B.create_masked_store, itp.GridExecutor.__call__ = orig_load, orig_store, orig_call
        _Current.traffic = None


# ----------------------------------------------------------------------------- cases

@dataclass
class Figures:
    name: str
    d: int
    b: int
    n_tokens: int
    launches: int
    sectors: int
    bytes: int
    min_sectors: int
    min_bytes: int
    weight_sectors: int
    weight_bytes: int
    kernels: str = ""  # the launched kernels, in order

    @property
    def sector_ratio(self) -> float:
        return self.sectors / self.min_sectors

    @property
    def byte_ratio(self) -> float:
        return self.bytes / self.min_bytes


def _figures(name, d, b, n, tr: Traffic, passes: int, esize: int) -> Figures:
    s, by = tr.total(True)
    ws, wb = tr.total(False)
    t_bytes = n * d * esize
    return Figures(name, d, b, n, len(tr.launches), s, by, passes * math.ceil(t_bytes / SECTOR), passes * t_bytes, ws, wb,
                   _kernel_names(tr.launches))


def _kernel_names(launches) -> str:
    return "+".join(k.strip("_").removesuffix("_kernel") for k in launches)


def _blocks(r, b, dtype, gen):
    q, _ = torch.linalg.qr(torch.randn(r, b, b, generator=gen, dtype=torch.float64))
    return q.to(dtype)


# ----------------------------------------------------------------------------- the CUDA kernels, emulated

class _CudaTraffic:
    """What :func:`count_cuda` yields: totals of one counted region of emulated CUDA launches."""

    def __init__(self):
        self.stats = None    # int64 [role (activations, float32, other), kind (load, store), (sectors, bytes, accesses)]
        self.launches = []

    def total(self, activation: bool | None = True, kind: str | None = None) -> tuple[int, int]:
        roles = [0, 1, 2] if activation is None else ([0] if activation else [1, 2])
        kinds = [0, 1] if kind is None else [("load", "store").index(kind)]
        sel = self.stats[roles][:, kinds]
        return int(sel[..., 0].sum()), int(sel[..., 1].sum())


def cuda_traffic_module(build: bool = True):
    """Installs the traffic build of the CUDA emulator extension as ``gsops._C`` (built from the current ``csrc/``
    with ``build``, else the existing build) and returns it; RuntimeError when it cannot (no C++ compiler, the cuda
    backend already loaded)."""
    import sys
    from pathlib import Path

    from tools.cuda_emu import loader, run  # the repository's emulator (perf/ runs from the repository too)

    current = sys.modules.get("gsops._C")
    if current is not None and hasattr(torch.ops, "gsops_emu") and hasattr(torch.ops.gsops_emu, "traffic_start"):
        return current
    if build:  # (re)built from the current csrc/: objects are cached by content, so an unchanged tree is quick
        return loader.install(Path(run.build_extension(traffic=True).__file__))
    path = run._build_dir(None) / "traffic" / "gsops_emu_traffic_C.so"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: build it with tools/cuda_emu/run.py (build_extension(traffic=True))")
    return loader.install(path)


@contextlib.contextmanager
def count_cuda():
    """Count the global-memory accesses of every emulated CUDA launch inside the block (per warp-wide access, see
    ``tools/cuda_emu/include/gsops_emu_traffic.h``); needs :func:`cuda_traffic_module` first."""
    ops = torch.ops.gsops_emu
    tr = _CudaTraffic()
    ops.traffic_start()
    try:
        yield tr
    finally:
        tr.stats = ops.traffic_stop()
        names = ops.traffic_launches()
        tr.launches = names.split("+") if names else []


def _cuda_ops():
    from gsops import backends

    ok, why = backends.load("cuda")
    if not ok:
        raise RuntimeError(f"the cuda backend did not load: {why}")
    from gsops.backends import cuda_backend

    return cuda_backend.KERNELS


def measure(op: str, d: int, b: int, n_tokens: int = 4, dtype=torch.float16, m: int = 3,
            backend: str = "triton") -> tuple[Figures, Figures]:
    """(forward, backward) figures of ``op`` in {"block_diag_mm", "gs_apply", "gs_chain"} on one shape, for the
    Triton kernels (interpreted) or the CUDA kernels (``backend="cuda"``: emulated, after :func:`cuda_traffic_module`;
    blocks in float32, as the CUDA kernels take them)."""
    if backend == "cuda":
        kernels = types.SimpleNamespace(**_cuda_ops())  # the kernel contract's functions, as attributes
        return _measure_with(kernels, count_cuda, op, d, b, n_tokens, dtype, m, torch.float32)
    if backend != "triton":
        raise ValueError(f"backend={backend!r} must be 'triton' or 'cuda'")
    from gsops.triton_kernels import gs_apply as gs

    return _measure_with(gs, count, op, d, b, n_tokens, dtype, m, dtype)


def _measure_with(gs, counter, op, d, b, n_tokens, dtype, m, block_dtype):
    r = d // b
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, d, generator=gen).to(dtype)
    dy = torch.randn(n_tokens, d, generator=gen).to(dtype)
    esize = x.element_size()
    if op == "block_diag_mm":
        B = _blocks(r, b, block_dtype, gen)
        fwd, bwd = (lambda: gs.block_diag_mm(x, B)), (lambda: gs.block_diag_mm_backward(dy, x, B))
    elif op == "gs_apply":
        L, R = _blocks(r, b, block_dtype, gen), _blocks(r, b, block_dtype, gen)
        fwd, bwd = (lambda: gs.gs_apply(x, L, R)), (lambda: gs.gs_apply_backward(dy, x, L, R))
    elif op == "gs_chain":
        blocks = [_blocks(r, b, block_dtype, gen) for _ in range(m)]
        fwd, bwd = (lambda: gs.gs_chain(x, blocks)), (lambda: gs.gs_chain_backward(dy, x, blocks))
    else:
        raise ValueError(f"op={op!r} must be one of block_diag_mm, gs_apply, gs_chain")
    label = op if op != "gs_chain" else f"gs_chain(m={m})"
    with counter() as tf:
        fwd()
    with counter() as tb:
        bwd()
    return _figures(label, d, b, n_tokens, tf, 2, esize), _figures(label + " bwd", d, b, n_tokens, tb, 3, esize)


def measure_cayley(r: int, b: int, dtype=torch.float32) -> list:
    """Cayley (exact, forward and backward): all buffers against reading the inputs and writing the outputs."""
    from gsops.triton_kernels import cayley as ck

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(r, b, b, generator=gen, dtype=dtype) * 0.1
    K = A - A.transpose(1, 2)
    out = []
    with count() as tf:
        Q = ck.cayley_exact(K)
    nbytes = K.numel() * K.element_size()
    out.append(_all_figures(f"cayley_exact r={r}", b * r, b, tf, 2 * nbytes))
    G = torch.randn(r, b, b, generator=gen, dtype=dtype)
    with count() as tb:
        ck.cayley_exact_backward(G, Q)
    out.append(_all_figures(f"cayley_exact bwd r={r}", b * r, b, tb, 3 * nbytes))
    return out


def _all_figures(name, d, b, tr: Traffic, min_bytes) -> Figures:
    s, by = tr.total(None)
    return Figures(name, d, b, 0, len(tr.launches), s, by, math.ceil(min_bytes / SECTOR), min_bytes, 0, 0,
                   _kernel_names(tr.launches))


def measure_conv_exp(c: int = 16, hw: int = 8, k: int = 3, terms: int = 4, dtype=torch.float32) -> Figures:
    """conv_exp forward (``terms`` Taylor terms): activation traffic against reading x and writing y once."""
    from gsops.backends.triton_backend import KERNELS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, hw, hw, generator=gen, dtype=dtype)
    L = torch.randn(c, c, k, k, generator=gen, dtype=dtype) * 0.05
    with count() as tf:
        KERNELS["conv_exp"](x, L, terms, 1)
    s, by = tf.total(None)
    nbytes = x.numel() * x.element_size()
    return Figures(f"conv_exp C={c} {hw}x{hw} k={k} terms={terms}", c * hw * hw, k, 1, len(tf.launches), s, by,
                   2 * math.ceil(nbytes / SECTOR), 2 * nbytes, 0, 0, _kernel_names(tf.launches))


SHAPES = [(d, b) for d in (768, 1024, 4096) for b in (16, 24, 32, 64) if d % b == 0]


def table(rows) -> str:
    lines = [f"{'kernel':26s} {'d':>5s} {'b':>4s} {'launch':>6s} {'sectors/min':>11s} {'bytes/min':>9s} "
             f"{'weight kB':>9s}  kernels"]
    for f in rows:
        lines.append(f"{f.name:26s} {f.d:5d} {f.b:4d} {f.launches:6d} {f.sector_ratio:11.2f} {f.byte_ratio:9.2f} "
                     f"{f.weight_bytes / 1024:9.1f}  {f.kernels}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--ops", default="block_diag_mm,gs_apply,gs_chain")
    ap.add_argument("--sizes", default="768,1024,4096")
    ap.add_argument("--blocks", default="16,24,32,64")
    ap.add_argument("--no-extra", action="store_true", help="skip cayley and conv_exp")
    ap.add_argument("--backend", choices=["triton", "cuda"], default="triton",
                    help="cuda: the CUDA kernels under the CPU CUDA emulator (its traffic build, rebuilt from csrc/)")
    a = ap.parse_args(argv)
    if a.backend == "cuda":
        cuda_traffic_module()
    sizes = [int(s) for s in a.sizes.split(",")]
    blocks = [int(s) for s in a.blocks.split(",")]
    rows = []
    for op in a.ops.split(","):
        for d in sizes:
            for b in blocks:
                if d % b:
                    continue
                rows += list(measure(op, d, b, a.tokens, backend=a.backend))
    print("%s kernels, activations, fp16, %d tokens (minimum: fwd read x + write y, bwd read x, dy + write dx)"
          % ("Triton" if a.backend == "triton" else "CUDA (emulated)", a.tokens))
    print(table(rows))
    if not a.no_extra and a.backend == "triton":
        extra = measure_cayley(4, 32) + [measure_conv_exp()]
        print("\nall buffers, fp32 (minimum: read the inputs, write the outputs once)")
        print(table(extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

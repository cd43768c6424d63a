"""Ahead-of-time compile of the Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter checks the arithmetic but not that a kernel compiles for a GPU (layouts, dot
shapes, dtypes, constexpr control flow) or fits its shared memory; ``triton.compile`` with a
``GPUTarget`` runs the whole compiler, ptxas included, without a device.  It runs in a child
process with ``TRITON_INTERPRET=0`` (this session's kernels are interpreter objects), over a
representative set of the launchers' constexpr configurations.  Timing is not measured here.
"""
import json
import os
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 227 * 1024


class _Stub:
    """Stands in for a tensor where a launcher helper only reads its dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


def _configs():
    import torch
    import triton.language as tl

    import gsops.triton_kernels.cayley as C
    import gsops.triton_kernels.gs_apply as G

    ptr = {tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float32: "*fp32", tl.float64: "*fp64"}
    out = []
    nbytes = {tl.bfloat16: 2, tl.float16: 2, tl.float32: 4, tl.float64: 8}
    # (the packed tiles of b = 24 and b = 20 in half precision: two and four blocks per 64- and 128-wide tile)
    for b, dt, load in [(3, tl.float32, 1), (16, tl.bfloat16, 1), (128, tl.bfloat16, 0), (24, tl.float16, 0),
                        (20, tl.bfloat16, 0)]:
        bb, g, tile = G._tiling(b, nbytes[dt], load == 0)
        c = dict(TILES_PER_PROG=4, LOAD=load, STORE=load, TRANS=bool(load), BB=bb, G=g, TILE=tile,
                 BLOCK_N=64 if tile <= 64 else 32, DOT_DTYPE=dt, IEEE=dt == tl.float32, ACC_DTYPE=tl.float32)
        out.append((f"block_step b={b} {dt}", G._block_step_kernel,
                    {"x_ptr": ptr[dt], "w_ptr": "*fp32", "y_ptr": ptr[dt]}, c, G._num_warps(tile)))
    for b, dt, layout in [(2, tl.float16, 1), (32, tl.bfloat16, 1), (128, tl.float32, 1), (24, tl.bfloat16, 0)]:
        bb, g, tile = G._tiling(b, nbytes[dt], layout == 0)
        c = dict(TILES_PER_SPLIT=8, G_LAYOUT=layout, X_LAYOUT=layout, BB=bb, G=g, TILE=tile,
                 BLOCK_N=64 if tile <= 64 else 32, DOT_DTYPE=dt, IEEE=dt == tl.float32, WITH_DX=True)
        out.append((f"block_grad+dx b={b} {dt}", G._block_grad_kernel,
                    {"g_ptr": ptr[dt], "x_ptr": ptr[dt], "out_ptr": "*fp32", "w_ptr": "*fp32", "dx_ptr": ptr[dt]},
                    c, G._num_warps(tile)))
    # one-pass GS apply: band tilings (b | r), whole-row tilings (gather), b < 16 (no tensor-core dot),
    # the fused backward and the two backward kernels of larger tiles
    for b, r, dt, kind in [(16, 32, tl.bfloat16, "fwd"), (16, 32, tl.bfloat16, "bwd"), (8, 16, tl.float16, "fwd"),
                           (32, 64, tl.bfloat16, "fwd"), (32, 64, tl.bfloat16, "dx"), (32, 64, tl.bfloat16, "grads"),
                           (24, 32, tl.bfloat16, "fwd"), (24, 32, tl.bfloat16, "grads"), (24, 8, tl.float32, "bwd"),
                           (16, 32, tl.float32, "fwd"), (24, 4, tl.float64, "bwd")]:
        plan = G.onepass_plan(r, b, nbytes[dt])
        assert plan is not None and (kind != "bwd" or plan.fused_backward)
        old = G._interpreting
        G._interpreting = lambda: False
        try:
            bn = G._onepass_block_n(plan, 1 << 20)
        finally:
            G._interpreting = old
        c = dict(TILES=4, BAND=plan.band, LINEAR_OUT=False, NR=plan.nr, BB=plan.bb, BN=bn, DOT_DTYPE=dt,
                 IEEE=dt in (tl.float32, tl.float64), ACC=tl.float64 if dt == tl.float64 else tl.float32,
                 USE_DOT=plan.bb >= 16)
        name = f"gs_onepass {kind} b={b} r={r} {'band' if plan.band else 'rows'} {dt}"
        if kind == "fwd":
            out.append((name, G._onepass_fwd_kernel,
                        {"x_ptr": ptr[dt], "l_ptr": "*fp32", "r_ptr": "*fp32", "y_ptr": ptr[dt]},
                        c, G._onepass_warps(plan, bn)))
        else:
            c.update(WITH_DX=kind != "grads", WITH_GRADS=kind != "dx")
            out.append((name, G._onepass_bwd_kernel,
                        {"g_ptr": ptr[dt], "x_ptr": ptr[dt], "l_ptr": "*fp32", "r_ptr": "*fp32", "dx_ptr": ptr[dt],
                         "dl_ptr": "*fp32", "dr_ptr": "*fp32"}, c, G._onepass_warps(plan, bn)))
    # b = 64: the chunked band kernel (forward and transposed), the row kernel with blocks in pieces (a GSOFT
    # pair and a 3-factor chain, forward and backward)
    for transposed in (False, True):
        plan = G.chunk_plan(64, 64, 2)
        c = dict(TILES=4, TRANSPOSED=transposed, LINEAR_OUT=False, UC=plan.uc, KS=plan.ks, BB=plan.bb, BN=16,
                 DOT_DTYPE=tl.bfloat16, IEEE=False, ACC=tl.float32, USE_DOT=True)
        out.append((f"gs_chunked b=64 transposed={transposed}", G._chunk_kernel,
                    {"x_ptr": "*bf16", "w1_ptr": "*fp32", "w2_ptr": "*fp32", "y_ptr": "*bf16"}, c, (16, 1)))
    for r, b, m, kind, dt in [(16, 64, 2, "fwd", tl.bfloat16), (16, 64, 2, "bwd", tl.bfloat16),
                              (48, 16, 3, "bwd", tl.bfloat16), (8, 32, 3, "bwd", tl.float32)]:
        esize = 2 if dt == tl.bfloat16 else 4
        tdt = torch.bfloat16 if dt == tl.bfloat16 else torch.float32
        plan = G.row_plan(r, b, esize)
        old = G._interpreting
        G._interpreting = lambda: False
        try:
            bn = G._row_block_n(plan.nr * plan.bb, esize, 1 << 20)
            consts = G._row_consts(plan, _Stub(tdt), _Stub(tdt), m > 2, m, bn, 4)
        finally:
            G._interpreting = old
        c = dict(TILES=4, M=m, LINEAR_OUT=m > 2, KS=plan.ks, NR=plan.nr, BB=plan.bb, BN=bn, DOT_DTYPE=dt,
                 IEEE=consts["IEEE"], ACC=tl.float32, USE_DOT=plan.bb >= 16)
        warps = (consts["num_warps"], consts["num_stages"])
        name = f"gs_row {kind} m={m} r={r} b={b} ks={plan.ks} {dt}"
        if kind == "fwd":
            out.append((name, G._row_fwd_kernel, {"x_ptr": ptr[dt], "w_ptr": "*fp32", "y_ptr": ptr[dt]}, c, warps))
        else:
            groups = G.row_backward_groups(r, b, m, esize)
            c.update(GRADS=sum(1 << f for f in groups[0]), LOW=0, WITH_DX=True)
            out.append((name + f" grads={groups[0]}", G._row_bwd_kernel,
                        {"g_ptr": ptr[dt], "x_ptr": ptr[dt], "w_ptr": "*fp32", "dx_ptr": ptr[dt], "dw_ptr": "*fp32"},
                        c, warps))
    # the fallback's coalesced permuted step (runs of G blocks), forward and gradient
    for b, r, dt, grad in [(64, 64, tl.bfloat16, False), (64, 64, tl.bfloat16, True), (128, 32, tl.bfloat16, True),
                           (64, 64, tl.float32, True), (8, 512, tl.bfloat16, True), (128, 128, tl.float32, True)]:
        old = G._interpreting
        G._interpreting = lambda: False
        try:
            g, bb, bn = G._strided_plan(r, b, nbytes[dt], 1 << 20)
        finally:
            G._interpreting = old
        c = dict(TILES=4, OUT_STRIDED=True, G=g, BB=bb, BN=bn, DOT_DTYPE=dt, IEEE=dt == tl.float32, ACC=tl.float32,
                 USE_DOT=bb >= 16)
        name = f"strided_step{' grad' if grad else ''} b={b} G={g} {dt}"
        if grad:
            out.append((name, G._strided_grad_kernel, {"g_ptr": ptr[dt], "x_ptr": ptr[dt], "w_ptr": "*fp32",
                                                       "dx_ptr": ptr[dt], "db_ptr": "*fp32"},
                        c, 4 if g * bb * bn <= 8192 else 8))
        else:
            out.append((name, G._strided_step_kernel, {"x_ptr": ptr[dt], "w_ptr": "*fp32", "y_ptr": ptr[dt]},
                        c, 4 if g * bb * bn <= 8192 else 8))
    for b in (3, 32):
        bb, bbd = C._pad(b, dot=False), C._pad(b, dot=True)
        out.append((f"cayley_exact b={b}", C._cayley_exact_kernel, {"k_ptr": "*fp32", "q_ptr": "*fp32"},
                    dict(b=b, BB=bb), C._warps(bb)))
        out.append((f"cayley_exact_backward b={b}", C._cayley_exact_backward_kernel,
                    {"g_ptr": "*fp32", "q_ptr": "*fp32", "dk_ptr": "*fp32"}, dict(b=b, BB=bbd), C._warps(bbd)))
        out.append((f"cayley_neumann b={b}", C._cayley_neumann_kernel, {"k_ptr": "*bf16", "q_ptr": "*bf16"},
                    dict(b=b, BB=bbd, TERMS=3, ACC=tl.float32), C._warps(bbd)))
        out.append((f"cayley_neumann_backward b={b}", C._cayley_neumann_backward_kernel,
                    {"g_ptr": "*bf16", "k_ptr": "*bf16", "dk_ptr": "*bf16"},
                    dict(b=b, BB=bbd, TERMS=2, ACC=tl.float32), C._warps(bbd)))
    return out


def _compile_all():
    """Child process: compile every configuration, print one JSON line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, fn, ptrs, constexprs, num_warps in _configs():
        warps, stages = num_warps if isinstance(num_warps, tuple) else (num_warps, 3)
        sig = {a: ptrs.get(a) or ("constexpr" if a in constexprs else ("i64" if a.startswith("stride") else "i32"))
               for a in fn.arg_names}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
            rec = {"name": name, "ok": bool(k.asm.get("ptx")), "shared": k.metadata.shared}
        except Exception as e:  # noqa: BLE001 - reported to the parent test
            rec = {"name": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(json.dumps(rec), flush=True)


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not records and ("ptxas" in proc.stderr or "libcuda" in proc.stderr):
        pytest.skip(f"the CUDA tool chain bundled with triton is unusable here: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and records, proc.stderr[-2000:]
    failed = [r for r in records if not r["ok"]]
    assert not failed, failed
    too_big = [r for r in records if r["shared"] > H100_SHARED_BYTES]
    assert not too_big, too_big


if __name__ == "__main__":
    _compile_all()

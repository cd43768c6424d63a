"""The CUDA kernels of csrc/ executed on the CPU under the gsops CUDA emulator (tools/cuda_emu).

No GPU in CI, so ``csrc/tests/gpu_test_driver.cu`` (every launcher against naive double
loops) is compiled with g++ against ``tools/cuda_emu/include`` and run:

* three ways: sm_90 with the WMMA tensor-core path for fp16/bf16, the fp32-FMA path
  (GSOPS_CUDA_NO_MMA=1), and threads run last-to-first between barriers;
* with AddressSanitizer and UBSan on the kernels (out-of-bounds global or shared memory,
  signed overflow in index arithmetic), and the emulator's own checks (barrier divergence,
  launch limits, WMMA alignment and warp uniformity; see tools/cuda_emu/include/gsops_emu.h).

The emulator must be able to fail: its self-test kernels break each rule, and three
mutations of the real kernels (a missing barrier in gs_apply.cu and in cayley.cu, shared
memory one float too small) must be caught by the same driver. A GPU run stays the final word.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = ROOT / "tools" / "cuda_emu"
BUILD = ROOT / "build" / "emu"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"gsops_tools_cuda_emu_{name}", EMU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu = _load_tool("run")
emu_loader = _load_tool("loader")
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found: the CUDA emulator needs a C++17 compiler")

# (file, text to replace, replacement, driver group, mode, what the driver/emulator must print)
MUTATIONS = {
    "gs_missing_barrier": (
        "gs_apply.cu",
        "  __syncthreads();\n  bdp_store_tile(",
        "  bdp_store_tile(",
        "gs", "fma", "FAIL: block_diag_perm",
    ),
    "cayley_missing_barrier": (
        "cayley.cu",
        "    gj_scale_row(A, col, b, p, threadIdx.x, blockDim.x);\n    __syncthreads();\n",
        "    gj_scale_row(A, col, b, p, threadIdx.x, blockDim.x);\n",
        # in forward order the thread that scaled A[p][j] always ran first: only the reverse order shows it
        "cayley", "reverse", "FAIL: cayley",
    ),
    "gs_smem_too_small": (
        "gs_apply.cu",
        "const size_t smem = sizeof(float) * ((size_t)b * b + (size_t)tile * b);",
        "const size_t smem = sizeof(float) * ((size_t)b * b + (size_t)tile * b - 1);",
        "gs", "fma", "AddressSanitizer",
    ),
}


def _mutated_tree(tmp: Path, name: str) -> Path:
    fname, old, new, *_ = MUTATIONS[name]
    tree = tmp / name / "csrc"
    shutil.copytree(CSRC, tree)
    text = (tree / fname).read_text()
    assert text.count(old) == 1, f"mutation {name}: the text to replace is not in csrc/{fname} exactly once"
    (tree / fname).write_text(text.replace(old, new))
    return tree


def _require_sanitizers(tmp):
    """The kernels are built with AddressSanitizer + UBSan: say so and skip where g++ cannot link them."""
    probe = tmp / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    flags = [f for f in emu._flags(CSRC, True) if f.startswith("-fsanitize") or f.startswith("-fno-sanitize")]
    res = subprocess.run([CXX, *flags, str(probe), "-o", str(tmp / "probe")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"g++ cannot build with {' '.join(flags)}: {res.stderr.strip()[:300]}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds the driver, the self-test and the mutants (objects cached in build/emu), then runs
    every driver mode and mutant at once (the runs are independent processes)."""
    tmp = tmp_path_factory.mktemp("emu")
    _require_sanitizers(tmp)
    exe = emu.build(build_dir=BUILD)  # first: the mutants reuse its objects except the mutated file
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        selftest = pool.submit(
            emu.build, build_dir=BUILD, sources=[EMU / "selftest.cu"], exe_name="gsops_emu_selftest"
        )
        mutants = {
            name: pool.submit(emu.build, csrc=_mutated_tree(tmp, name), build_dir=BUILD,
                              exe_name=f"gsops_emu_mutant_{name}")
            for name in MUTATIONS
        }
        selftest = selftest.result()
        mutants = {name: f.result() for name, f in mutants.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        modes = {m: pool.submit(emu.run, exe, m, (), 900, {"GSOPS_EMU_STATS": "1"}) for m in emu.MODES}
        mut = {n: pool.submit(emu.run, mutants[n], MUTATIONS[n][4], (MUTATIONS[n][3],)) for n in MUTATIONS}
        return {
            "selftest": selftest,
            "modes": {m: f.result() for m, f in modes.items()},
            "mutants": {n: f.result() for n, f in mut.items()},
        }


@pytest.mark.parametrize("mode", sorted(emu.MODES))
def test_driver_passes_under_emulation(built, mode):
    res = built["modes"][mode]
    out = res.stdout
    assert "gsops CPU emulator" in out, out[-2000:]
    m = re.search(r"(\d+) checks, (\d+) failures", out)
    assert m, out[-3000:]
    checks, failures = int(m.group(1)), int(m.group(2))
    assert failures == 0 and res.returncode == 0, out[-6000:]
    assert checks >= 400, f"only {checks} checks ran"
    assert "emulator error" not in out and "AddressSanitizer" not in out.replace("ASan doesn't fully support", "")
    stats = re.search(r"launches=(\d+) blocks=(\d+) barrier_rounds=(\d+) mma_sync=(\d+)", out)
    assert stats, out[-2000:]
    launches, blocks, rounds, mma = map(int, stats.groups())
    assert launches > 100 and blocks > launches and rounds > 0
    # fp16/bf16 with b % 16 == 0 ran on the tensor-core path in the sm_90 modes, never with NO_MMA
    if mode == "fma":
        assert mma == 0
    else:
        assert mma > 0


def test_emulator_selftest_passes(built):
    res = emu.run(built["selftest"], "mma", ("ok",))
    assert res.returncode == 0 and "selftest ok" in res.stdout, res.stdout[-3000:]


@pytest.mark.parametrize(
    "case, message",
    [
        ("divergent", r"32 of 64 threads wait at __syncthreads\(\) \(.*selftest.cu:\d+\) while 32 exited"),
        ("two_sites", r"threads wait at two different __syncthreads\(\)"),
        ("late_barrier", r"in block 1 but not in block 0"),
        ("wmma_divergent", r"lanes of warp 0 issue wmma::mma_sync call 0 with different fragments"),
        ("wmma_misaligned", r"wmma::load_matrix_sync pointer 0x[0-9a-f]+ is not 256-bit aligned"),
    ],
)
def test_emulator_detects(built, case, message):
    res = emu.run(built["selftest"], "mma", (case,))
    assert res.returncode != 0, res.stdout[-3000:]
    assert re.search("gsops emulator error: .*" + message, res.stdout), res.stdout[-3000:]


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutated_kernel_is_caught(built, name):
    res = built["mutants"][name]
    expected = MUTATIONS[name][5]
    assert res.returncode != 0, f"mutant {name} passed the driver:\n{res.stdout[-3000:]}"
    assert expected in res.stdout, res.stdout[-3000:]


def test_translation_rewrites_launches_and_dynamic_shared_memory():
    src = (
        "template <typename T> __global__ void k(T* y) { extern __shared__ __align__(16) unsigned char buf[]; }\n"
        "void f(float* y, cudaStream_t s) {\n"
        "  k<float><<<dim3(2), 64, 128,\n      s>>>(y);\n"
        "  other<<<1, 32>>>(y, 3);\n}\n"
    )
    out = emu.translate(src, "x.cu")
    assert out.startswith('#line 1 "x.cu"\n')
    assert 'unsigned char* buf = ::gsops_emu::dynamic_smem<unsigned char>();' in out
    assert '::gsops_emu::launch(k<float>, "k<float>", __FILE__, __LINE__, dim3(2), 64, 128,\n      s)(y);' in out
    assert '::gsops_emu::launch(other, "other", __FILE__, __LINE__, 1, 32)(y, 3);' in out
    assert out.count("\n") == src.count("\n") + 1  # line numbers kept
    with pytest.raises(ValueError, match="cannot rewrite"):
        emu.translate("extern __shared__ float a[3];\n", "bad.cu")


def test_gpu_test_module_passes_on_the_emulated_extension():
    """csrc/bindings.cpp built for the emulator (CPU tensors) over the same kernels: the whole GPU
    test module (tests/test_cuda_kernels.py: every op, dtype and block size against dense float64,
    the public ops on the cuda backend, the binding's argument checks, opcheck) runs on the CPU,
    the build installed as gsops._C by tools/cuda_emu/loader.py. Built and run in subprocesses so
    that this session's torch.ops.gsops_cuda stays unregistered."""
    build = subprocess.run([sys.executable, str(EMU / "run.py"), "--extension"], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    m = re.search(r"^extension: (\S+)$", build.stdout, re.M)
    assert m, build.stdout
    ext = m.group(1)
    env = dict(os.environ, GSOPS_BACKEND="auto", OMP_NUM_THREADS="1")
    info = subprocess.run([sys.executable, str(EMU / "loader.py"), ext, "-m", "gsops.info"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stdout[-3000:] + info.stderr[-3000:]
    line = next(ln for ln in info.stdout.splitlines() if ln.strip().startswith("cuda"))
    assert "unavailable" not in line and ext in line, info.stdout
    res = subprocess.run([sys.executable, str(EMU / "loader.py"), ext, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_cuda_kernels.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 80, out[-3000:]
    assert "skipped" not in out and "failed" not in out, out[-3000:]


BENCH_TINY = ("--tokens", "64", "--d", "128", "--blocks", "16", "--reps", "1", "--conv-batch", "1", "--cayley-mats", "2")


def test_gpu_bench_checks_its_launches_and_outputs(tmp_path):
    """csrc/bench/gpu_bench.cu on tiny shapes under the emulator: random inputs give finite, nonzero
    outputs and it finishes; a launcher that refuses its arguments (b=256 > 128) stops it with the
    launcher's error instead of a timing."""
    _require_sanitizers(tmp_path)
    exe = emu.build(build_dir=BUILD, sources=sorted(CSRC.glob("*.cu")) + [CSRC / "bench" / "gpu_bench.cu"],
                    exe_name="gsops_emu_bench")
    ok = emu.run(exe, "mma", BENCH_TINY, 600)
    assert ok.returncode == 0 and "gsops GPU bench: done" in ok.stdout, ok.stdout[-3000:]
    rows = [ln.split(",") for ln in ok.stdout.splitlines() if ln.startswith("csv,")]
    assert {r[1] for r in rows} >= {"copy", "block_diag (no permutation)", "block gradient (P P^T)"}, rows
    bad = emu.run(exe, "mma", ("--tokens", "8", "--d", "512", "--blocks", "256", "--reps", "1"), 600)
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "FAIL: block_diag_perm -> invalid argument" in bad.stdout, bad.stdout[-3000:]
    assert "csv,block_diag" not in bad.stdout


def test_the_loader_refuses_a_missing_file_and_a_module_that_is_not_the_emulator_build(tmp_path):
    bad = tmp_path / "nothing_here.so"
    with pytest.raises(ImportError, match=re.escape(f"the CUDA emulator build {bad} cannot be loaded")) as e:
        emu_loader.load(bad)
    assert "python tools/cuda_emu/run.py --extension" in str(e.value)
    # an importable extension module without device_type == "cpu" (here: one of Python's own)
    import _ctypes

    with pytest.raises(ImportError, match="is not an emulator build of csrc/bindings.cpp: its device_type is None"):
        emu_loader.load(_ctypes.__file__)


def test_the_loader_installs_only_before_the_cuda_backend_is_loaded(tmp_path):
    """A subprocess: installing after the cuda backend was imported would leave the old gsops._C in use."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from tools.cuda_emu.loader import install\n"
        "from gsops import backends\n"
        "backends.load('cuda')\n"
        "try:\n"
        "    install(sys.argv[2])\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "x.so")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "refused: install the CUDA emulator build before the cuda backend is loaded" in res.stdout, res.stdout


def test_the_binding_has_no_emulator_hook():
    """The emulator build differs only by its device header (tools/cuda_emu/binding/gsops/device.h, found
    ahead of csrc/include): csrc/ itself names no emulator macro, header or attribute."""
    sources = [p for p in CSRC.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]
    assert CSRC / "bindings.cpp" in sources
    for p in sources:
        text = p.read_text()
        for word in ("GSOPS_EMULATOR", "gsops_emu", "emulated\")"):
            assert word not in text, f"{p.relative_to(ROOT)} mentions {word}"
    ours, theirs = (CSRC / "include" / "gsops" / "device.h").read_text(), (EMU / "binding" / "gsops" / "device.h").read_text()
    names = lambda text: sorted(re.findall(r"^#define (\w+)", text, re.M))  # noqa: E731
    assert names(ours) == names(theirs) and "GSOPS_DEVICE_TYPE" in names(ours)
    assert '#define GSOPS_DEVICE_TYPE "cuda"' in ours and '#define GSOPS_DEVICE_TYPE "cpu"' in theirs


_TRAFFIC = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from perf import traffic
traffic.cuda_traffic_module()
from gsops import _C
out = {}
for op in ("block_diag_mm", "gs_apply", "gs_chain"):
    for d, b in traffic.SHAPES:
        fwd, bwd = traffic.measure(op, d, b, n_tokens=2, backend="cuda")
        out[f"{op} {d} {b}"] = {
            "plan": int(_C.gs_pair_grad_factors(d // b, b)) if _C.gs_pair_supported(d // b, b) else -1,
            "chain_per": int(_C.gs_chain_rows_grad_factors(d // b, b, 3)),
            **{f"{k}_{f.name.endswith('bwd') and 'bwd' or 'fwd'}": getattr(f, k) for f in (fwd, bwd)
               for k in ("sectors", "min_sectors", "bytes", "min_bytes", "launches", "kernels")}}
print(json.dumps(out))
"""


def test_cuda_kernels_global_memory_traffic_under_emulation():
    """The CUDA kernels' access shape, counted per warp-wide access by the emulator's traffic build
    (perf.traffic --backend cuda; fp16 activations, 2 tokens). One-pass gs_apply (gs_pair): forward <= 1.25x
    the minimal sectors and <= 1.1x the bytes on every shape of the grid; backward one launch (x and dy read
    once, dx written once) where both block-gradient accumulators fit (b <= 32), two where one does (5/3 of the
    minimum; b = 64 with d <= 1024, each accumulator half in registers), the two-pass kernels where none does
    (b = 64, d = 4096), whose permuted side the counter shows uncoalesced. A three-factor gs_chain forward is one pass over whole rows on every grid shape; its
    backward one launch per group of factors whose accumulators fit on chip together (all three at b = 16 and
    d <= 1024; one at d = 4096, b = 16, half of it in registers), each reading x and dy once, the pair's kernels
    and block steps where none fits."""
    res = subprocess.run([sys.executable, "-c", _TRAFFIC, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    for key, f in rows.items():
        op, d, b = key.split()
        if op == "block_diag_mm":  # contiguous runs: the minimal bytes forward (b = 24: 48-byte runs straddle
            # sectors), dx and dB in two launches
            assert f["bytes_fwd"] == f["min_bytes_fwd"] and f["sectors_fwd"] <= 1.5 * f["min_sectors_fwd"], key
            if int(b) % 16 == 0:
                assert f["sectors_fwd"] == f["min_sectors_fwd"], key
            assert 3 * f["bytes_bwd"] == 4 * f["min_bytes_bwd"], key
            continue
        if op == "gs_chain":  # three factors: one pass over whole rows forward
            assert f["launches_fwd"] == 1 and f["kernels_fwd"].startswith("gs_chain_rows_kernel"), key
            assert f["sectors_fwd"] <= 1.25 * f["min_sectors_fwd"] and f["bytes_fwd"] <= 1.1 * f["min_bytes_fwd"], key
            per = f["chain_per"]
            if per:  # backward over whole rows: each launch reads x and dy once, the first writes dx
                launches = -(-3 // per)
                assert f["launches_bwd"] == launches and f["kernels_bwd"].startswith("gs_chain_rows_grad"), key
                assert 3 * f["bytes_bwd"] == (2 * launches + 1) * f["min_bytes_bwd"], key
                assert 3 * f["sectors_bwd"] <= (2 * launches + 1) * f["min_sectors_bwd"] * 1.25, key
            else:  # a row's accumulators do not fit: the pair backward and one block step per further factor
                assert f["launches_bwd"] >= 4 and "gs_chain_rows_grad" not in f["kernels_bwd"], key
            continue
        assert f["plan"] >= 0, key  # every grid shape has a one-pass forward
        assert f["launches_fwd"] == 1 and f["kernels_fwd"].startswith("gs_pair_kernel"), key
        assert f["sectors_fwd"] <= 1.25 * f["min_sectors_fwd"] and f["bytes_fwd"] <= 1.1 * f["min_bytes_fwd"], key
        if f["plan"] == 2:
            assert f["launches_bwd"] == 1, key
            assert f["sectors_bwd"] <= 1.5 * f["min_sectors_bwd"] and f["bytes_bwd"] <= 1.4 * f["min_bytes_bwd"], key
        elif f["plan"] == 1:
            assert f["launches_bwd"] == 2 and 3 * f["bytes_bwd"] == 5 * f["min_bytes_bwd"], key
        else:  # two-pass fallback: 10 activation passes, the permuted side one sector per element
            assert f["launches_bwd"] == 5 and 3 * f["bytes_bwd"] == 10 * f["min_bytes_bwd"], key
            assert f["sectors_bwd"] >= 10 * f["min_sectors_bwd"], key
    assert sum(k.startswith("gs_chain") for k in rows) == sum(k.startswith("gs_apply") for k in rows) > 0
    plans = {k: f["plan"] for k, f in rows.items() if k.startswith("gs_apply")}
    # b = 64: one accumulator per launch, split between registers and shared memory (whole rows, d <= 1024),
    # none on chip (the 4096-feature band group); else one launch
    assert plans["gs_apply 1024 64"] == plans["gs_apply 768 64"] == 1 and plans["gs_apply 4096 64"] == 0, plans
    assert sorted(set(plans.values())) == [0, 1, 2], plans
    chain = {k: f["chain_per"] for k, f in rows.items() if k.startswith("gs_chain")}
    assert chain["gs_chain 768 16"] == chain["gs_chain 1024 16"] == 3 and chain["gs_chain 4096 16"] == 1, chain
    assert chain["gs_chain 4096 32"] == 0, chain  # 512 KiB of accumulator per factor
